"""Dynamic Latent Scale GAN (DLSGAN) -- GAN inversion with an encoder living in the discriminator.

Paper: J. Cho and A. Krzyzak, "Dynamic Latent Scale for GAN Inversion", ICPRAM 2022 (Algorithm 1).
The encoder is a latent head on the discriminator trunk. The generator is fed ``z * s`` where
``s = sqrt(d) * v^(1/2) / ||v^(1/2)||`` and v tracks the per-dimension variance of the encoder's
predictions, so dimensions the generator ignores shrink and the encoder's MSE loss can converge:

    L_enc = mean((z - z_hat)^2 * s^2)        added to D's loss, and to G's too with --dg

What it reproduces (paper Figs. 3-4, 7-15): without DLS (``--no-dls``, s = 1) L_enc stays near 1; with DLS it
falls well below. The CPU default is a DCGAN; the paper's StyleGAN2 is ``--arch stylegan2``. The measured tables,
with their dates, machines and commands, are in docs/dlsgan.md.

Usage:
    python dlsgan.py --dist uniform --dg                    # the main job: MNIST 32x32, 2000 steps
    python dlsgan.py --dist normal --dg --no-dls            # the plain-MSE ablation
    python dlsgan.py --ablation --dist normal               # {DLS, no DLS} x {D, DG}: table + L_enc plot
    torchrun --nproc_per_node=2 dlsgan.py --dist uniform --dg   # DDP (gloo on CPU, nccl on CUDA)
    python dlsgan.py --resume runs/<run>/checkpoint.pt      # continue exactly where it stopped
    # paper scale (GPU): CelebA 128x128, 50 epochs, batch 16, d = 512
    python dlsgan.py --arch stylegan2 --dataset celeba --resolution 128 --width 512 --batch-size 16 --epochs 50 \\
        --dist normal --dg --n-mapping 8 --eval-every 5000

Everything of a run goes to runs/{run_name}/: run.json, metrics.jsonl, samples.png, reconstructions.png,
fig17_top_dim.png, checkpoint.pt (rebuildable by eval.py without importing this file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

import common

METHOD = "dlsgan"


# ---------------------------------------------------------------------------------------------------------
# The method: the latent scale s, the tracked variance v, the encoder loss, entropy
# ---------------------------------------------------------------------------------------------------------
def latent_scale(v: torch.Tensor) -> torch.Tensor:
    """s = sqrt(d) * v^(1/2) / ||v^(1/2)||_2, so that sum(s^2) = d (s = 1 when all v are equal)."""
    return torch.sqrt(len(v) * v / v.sum())


class PredictedVariance:
    """v: per-dimension variance of the encoder's predicted codes. The predictions have mean ~0, so
    mean(z_hat^2) over a batch is a variance sample. 'window' averages the last N batch samples (paper),
    'ema' is the later variant. Fed with the global batch mean, so v is identical on every DDP rank."""

    def __init__(self, d, mode="window", window_batches=128, ema=0.999, device="cpu"):
        self.mode, self.ema = mode, ema
        self.window = torch.ones(window_batches if mode == "window" else 1, d, device=device)
        self.pointer = torch.zeros((), dtype=torch.long)

    @property
    def value(self):
        return self.window.mean(0) if self.mode == "window" else self.window[0]

    @torch.no_grad()
    def update(self, z_hat: torch.Tensor):
        batch_var = common.all_reduce_mean_(z_hat.detach().float().square().mean(0))
        if self.mode == "window":
            self.window[self.pointer % len(self.window)] = batch_var
            self.pointer += 1
        else:
            self.window[0].lerp_(batch_var, 1 - self.ema)

    def state_dict(self):
        return {"window": self.window.cpu(), "pointer": self.pointer}

    def load_state_dict(self, state):
        if state["window"].shape != self.window.shape:
            common.fail(
                f"the checkpoint's v buffer has shape {tuple(state['window'].shape)}, expected "
                f"{tuple(self.window.shape)}; keep --latent-dim, --v-update, --v-window and --batch-size"
            )
        self.window.copy_(state["window"])
        self.pointer = state["pointer"].clone()


def encoder_loss(z, z_hat, s):
    """L_enc = mean((z - z_hat)^2 * s^2): each dimension's error counts as much as G's input z * s lets it."""
    return ((z - z_hat.float()).square() * s.square()).mean()


def latent_entropy(s: torch.Tensor, dist: str) -> float:
    """Differential entropy (nats) of z * s with z i.i.d. N(0,1) or U(-sqrt3, sqrt3): a sum over dimensions."""
    s = s.double().clamp_min(1e-30)
    if dist == "normal":
        return float((0.5 * torch.log(2 * math.pi * math.e * s**2)).sum())
    return float(torch.log(2 * math.sqrt(3) * s).sum())


def scale_charts(s: torch.Tensor, dist: str) -> dict:
    """What the scale has done to the latent: its entropy, how many dimensions carry 90 % of it, its largest value."""
    return {
        "charts/latent_entropy": latent_entropy(s, dist),
        "charts/dims_90pct_scale": dims_carrying(s, 0.9),
        "charts/s_max": s.max().item(),
    }


def dims_carrying(s: torch.Tensor, fraction=0.9) -> int:
    """How many latent dimensions carry ``fraction`` of sum(s^2) (= d)."""
    share = torch.sort(s.double() ** 2, descending=True).values.cumsum(0) / (s.double() ** 2).sum()
    return int((share < fraction).sum()) + 1


# ---------------------------------------------------------------------------------------------------------
# Networks (from common.py): G(z * s), D(x) -> (adversarial logit, z_hat)
# ---------------------------------------------------------------------------------------------------------
def model_specs(args, img_channels):
    if args.arch == "stylegan2":
        g = common.model_spec(
            common.StyleGAN2Generator,
            z_dim=args.latent_dim,
            w_dim=args.w_dim,
            resolution=args.resolution,
            img_channels=img_channels,
            width=args.width,
            n_mapping=args.n_mapping,
            mapping_lr_mul=args.mapping_lr_mul,
            normalize_z=False,
        )  # pixel-norm of z would undo the scale s
        d = common.model_spec(
            common.StyleGAN2Discriminator,
            resolution=args.resolution,
            img_channels=img_channels,
            width=args.width,
            latent_dim=args.latent_dim,
            head_hidden=args.d_head_hidden or max(args.width, args.latent_dim),
        )
    else:
        g = common.model_spec(
            common.DCGANGenerator,
            z_dim=args.latent_dim,
            resolution=args.resolution,
            img_channels=img_channels,
            width=args.width,
        )
        d = common.model_spec(
            common.DCGANDiscriminator,
            resolution=args.resolution,
            img_channels=img_channels,
            width=args.width,
            latent_dim=args.latent_dim,
            norm="none",
        )
    return {"G": g, "D": d}


# ---------------------------------------------------------------------------------------------------------
# One training iteration: the D step (adversarial + L_enc on fakes, feeds v), lazy R1, the G step
# ---------------------------------------------------------------------------------------------------------
def step_kwargs(args) -> dict:
    """The flags the step functions read (their defaults are the script's)."""
    return {"dist": args.dist, "gan_loss": args.loss, "lambda_enc": args.lambda_enc, "amp": args.amp}


def d_step(G, D, opt_d, v, x_real, s, *, dist="normal", gan_loss="logistic", lambda_enc=1.0, amp=False, r1_weight=0.0):
    """D and its encoder head: adversarial loss on x_real / G(z * s) + lambda_enc * L_enc(z, E(G(z * s))), then v
    is fed with the predicted codes; z ~ ``dist`` has len(s) dimensions. ``r1_weight`` > 0 folds R1 into this
    step (--r1-interval 1)."""
    device = x_real.device
    D.requires_grad_(True)
    z = common.sample_z(len(x_real), len(s), dist, device)
    with torch.no_grad(), common.autocast(device, amp):
        x_fake = G(z * s)
    x_real = x_real.detach().requires_grad_(r1_weight > 0)
    with common.autocast(device, amp):
        real_logit, _ = D(x_real)
        fake_logit, z_hat = D(x_fake)
        l_enc = encoder_loss(z, z_hat, s)
        adv = common.d_adv_loss(gan_loss, real_logit.float(), fake_logit.float())
        loss = adv + lambda_enc * l_enc
    r1 = common.r1_penalty(real_logit.float(), x_real) if r1_weight > 0 else torch.zeros((), device=device)
    opt_d.zero_grad(set_to_none=True)
    (loss + r1_weight * r1).backward()
    common.sync_gradients(D)
    opt_d.step()
    v.update(z_hat)
    return {"losses/L_enc": l_enc.item(), "losses/D": loss.item(), **({"losses/R1": r1.item()} if r1_weight else {})}


def g_step(G, D, opt_g, s, batch, *, dg=False, dist="normal", gan_loss="logistic", lambda_enc=1.0, amp=False):
    """G: adversarial loss on G(z * s), plus lambda_enc * L_enc with ``dg`` (the encoder is D's, frozen here)."""
    device = s.device
    D.requires_grad_(False)
    z = common.sample_z(batch, len(s), dist, device)
    with common.autocast(device, amp):
        fake_logit, z_hat = D(G(z * s))
        l_enc = encoder_loss(z, z_hat, s)
        loss = common.g_adv_loss(gan_loss, fake_logit.float())
        if dg:
            loss = loss + lambda_enc * l_enc
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    common.sync_gradients(G)
    opt_g.step()
    D.requires_grad_(True)
    return {"losses/G": loss.item(), "losses/L_enc_G": l_enc.item()}


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
def train(args):
    run = common.Run(args, METHOD, test_split=args.eval_images)
    device, bs, x_test = run.device, args.batch_size, run.x_test
    specs = model_specs(args, run.img_channels)
    G, D = common.build(specs["G"], device), common.build(specs["D"], device)
    G_ema = common.EMA(G, half_life_kimg=args.ema_kimg, rampup=args.ema_rampup)
    # the mapper's 0.01 lr multiplier lives inside its equalized-lr layers (as in StyleGAN2): one Adam lr fits all
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=args.betas)
    d_lr, d_betas = common.lazy_regularization_adam(args.lr, args.betas, args.r1_interval if args.r1 > 0 else 1)
    plain = args.arch == "stylegan2" and args.d_lr_mode == "plain"
    opt_d = torch.optim.Adam(common.unequalized_lr_groups(D, d_lr) if plain else D.parameters(), lr=d_lr, betas=d_betas)
    for group in opt_g.param_groups + opt_d.param_groups:
        group["base_lr"] = group["lr"]  # saved with the optimizer; the per-epoch decay scales it
    v = PredictedVariance(args.latent_dim, args.v_update, max(1, args.v_window // bs), args.v_ema, device)
    run.restore({"G": G, "D": D, "G_ema": G_ema.model}, {"G": opt_g, "D": opt_d})
    if run.ckpt is not None:
        v.load_state_dict(run.ckpt["v"])
    run.banner(
        f"{args.dataset} {args.resolution}px | {args.arch} width {args.width} | d {args.latent_dim} | "
        f"{'no DLS' if args.no_dls else 'DLS'} {'DG' if args.dg else 'D'} {args.dist}"
    )

    def current_scale():
        return torch.ones(args.latent_dim, device=device) if args.no_dls else latent_scale(v.value)

    for epoch, x_real in run.batches():
        for group in opt_g.param_groups + opt_d.param_groups:
            group["lr"] = group["base_lr"] * (1 - args.lr_decay) ** epoch
        s = current_scale()
        do_r1 = args.r1 > 0 and run.step % args.r1_interval == 0
        r1_here = args.r1 if do_r1 and args.r1_interval == 1 else 0.0
        scalars = d_step(G, D, opt_d, v, x_real, s, **step_kwargs(args), r1_weight=r1_here)
        if do_r1 and args.r1_interval > 1:
            scalars.update(common.r1_step(D, opt_d, x_real, args.r1 * args.r1_interval, args.amp))
        scalars.update(g_step(G, D, opt_g, s, run.batch, dg=args.dg, **step_kwargs(args)))
        step = run.step_done(scalars, show=("losses/L_enc", "losses/D", "losses/G"))
        G_ema.update(G, step * bs, bs)

        if run.due("eval") or run.due("save"):
            s = current_scale()
            common.recalibrate_generator(G_ema.model, args.latent_dim, args.seed, device, args.dist, scale=s)
        if run.due("eval"):
            metrics, x_real_rec = evaluate(G_ema.model, D, s, x_test, args, device)
            charts = {"charts/lr": opt_g.param_groups[0]["lr"], "charts/ema_decay": G_ema.decay(step * bs, bs)}
            row = run.log({**metrics, **charts, **scale_charts(s, args.dist)})
            if run.is_main:
                save_figures(G_ema.model, D, s, x_test, x_real_rec, args, run.run_dir, device)
                print(
                    f"  eval @ {step}: L_enc {row['losses/L_enc']:.4f} | real PSNR {row['eval/real_psnr']:.2f} "
                    f"SSIM {row['eval/real_ssim']:.3f} | fake PSNR {row['eval/fake_psnr']:.2f} SSIM "
                    f"{row['eval/fake_ssim']:.3f} | entropy {row['charts/latent_entropy']:.1f} | "
                    f"dims(90%) {row['charts/dims_90pct_scale']}",
                    flush=True,
                )
        if run.due("save"):
            run.save(
                {"s": s},
                model_specs=specs,
                v=v.state_dict(),
                inversion={
                    "generator": "G_ema",
                    "encoder": "D",
                    "encoder_output": "latent_head",
                    "latent_scale": s.cpu(),
                    "latent_dist": args.dist,
                },
            )
    return run.finish(identical="parameters, BatchNorm statistics and latent scale")


# ---------------------------------------------------------------------------------------------------------
# Evaluation: reconstructions of fakes and of held-out real images, figures
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode(D, x, batch=250):
    return torch.cat([D(chunk)[1] for chunk in x.split(batch)])


@torch.no_grad()
def generate(G, z, batch=250):
    return torch.cat([G(chunk).clamp(-1, 1) for chunk in z.split(batch)])


@torch.no_grad()
def evaluate(G, D, s, x_test, args, device):
    """Fake: G(z*s) vs G(E(G(z*s))*s) on fresh z; real: x vs G(E(x)*s) on test images. Fixed seed, so
    evaluation never touches the training RNG streams."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 12345)
    z = common.sample_z(len(x_test), args.latent_dim, args.dist, device, gen)
    x_fake = generate(G, z * s)
    x_fake_rec = generate(G, encode(D, x_fake) * s)
    x_real_rec = generate(G, encode(D, x_test) * s)
    return {
        "eval/fake_psnr": common.psnr(x_fake, x_fake_rec).item(),
        "eval/fake_ssim": common.ssim(x_fake, x_fake_rec).item(),
        "eval/real_psnr": common.psnr(x_test, x_real_rec).item(),
        "eval/real_ssim": common.ssim(x_test, x_real_rec).item(),
        "eval/real_mse": common.mse(x_test, x_real_rec).item(),
    }, x_real_rec


def fig17_values(dist, device="cpu", n=9):
    """The sweep of Fig. 17: [-2, 2] for the normal prior, the uniform prior's support [-sqrt 3, sqrt 3] otherwise."""
    bound = 2.0 if dist == "normal" else math.sqrt(3)
    return torch.linspace(-bound, bound, n, device=device)


@torch.no_grad()
def save_figures(G, D, s, x_test, x_real_rec, args, run_dir, device):
    gen = torch.Generator(device=device).manual_seed(args.seed + 999)
    z = common.sample_z(64, args.latent_dim, args.dist, device, gen)
    common.save_image_grid(generate(G, z * s), os.path.join(run_dir, "samples.png"), nrow=8)
    # rows alternate: 8 test images, then their reconstructions G(E(x) * s)
    rows = max(1, min(4, len(x_test) // 8))
    real, rec = (t[: rows * 8].view(rows, -1, *t.shape[1:]) for t in (x_test, x_real_rec))
    common.save_image_grid(
        torch.stack([real, rec], 1).flatten(0, 2), os.path.join(run_dir, "reconstructions.png"), nrow=8
    )
    # paper Fig. 17: the most important element (largest s) swept, one row per base sample
    top = int(torch.argmax(s))
    values = fig17_values(args.dist, device)
    z = common.sample_z(6, args.latent_dim, args.dist, device, gen).repeat_interleave(len(values), 0)
    z[:, top] = values.repeat(6)
    common.save_image_grid(generate(G, z * s), os.path.join(run_dir, "fig17_top_dim.png"), nrow=len(values))


# ---------------------------------------------------------------------------------------------------------
# The paper's ablation: {DLS, no DLS} x {D, DG} for one prior, as four runs and one table + plot
# ---------------------------------------------------------------------------------------------------------
VARIANTS = {"DLS, DG": ["--dg"], "DLS, D": [], "no DLS, DG": ["--dg", "--no-dls"], "no DLS, D": ["--no-dls"]}


def ablation_plan(args, argv):
    """The four variants at the settings of ``argv``; runs are named by a digest of those settings, so an
    ablation with other settings never reuses (or overwrites) these."""
    slug = args.dataset.replace(":", "_").replace("/", "_")
    prefix = f"ablation__{slug}__{args.dist}__{args.seed}"
    return common.ablation_plan(
        os.path.abspath(__file__),
        parse_args,
        argv,
        VARIANTS,
        prefix,
        variant_flags=("--dg", "--no-dls"),
        variant_keys=("dg", "no_dls"),
    )


def run_ablation(args, argv):
    run_dirs, out_dir, recorded = common.ablation(ablation_plan(args, argv), jobs=args.jobs)
    results = {}
    for label, run_dir in run_dirs.items():
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            results[label] = [json.loads(line) for line in f]
    write_ablation_report(results, recorded, out_dir)  # titled from the settings the runs recorded


def write_ablation_report(results, args, out_dir):
    """table.md / table.json of each variant's final evaluation, and l_enc.png: L_enc and real PSNR over epochs."""
    columns = {
        "L_enc": "losses/L_enc",
        "real PSNR": "eval/real_psnr",
        "real SSIM": "eval/real_ssim",
        "fake PSNR": "eval/fake_psnr",
        "fake SSIM": "eval/fake_ssim",
        "latent entropy": "charts/latent_entropy",
        "dims (90% of s^2)": "charts/dims_90pct_scale",
    }
    title = (
        f"{args.dataset} {args.resolution}px, {args.arch} width {args.width}, {args.dist} prior, "
        f"d = {args.latent_dim}, final evaluation ({results[next(iter(results))][-1]['step']} steps of "
        f"{args.batch_size}, {args.eval_images} test images)"
    )
    cells = {label: {c: f"{rows[-1][k]:.4g}" for c, k in columns.items()} for label, rows in results.items()}
    common.write_ablation_table(out_dir, title, cells, {label: rows[-1] for label, rows in results.items()})
    panels = [
        ("losses/L_enc", "average L_enc", f"L_enc, {args.dataset}, {args.dist} prior"),
        ("eval/real_psnr", "dB", "real (test) reconstruction PSNR"),
    ]
    if common.plot_ablation_curves(os.path.join(out_dir, "l_enc.png"), results, panels):
        print(f"[ablation] wrote {out_dir}/table.md and l_enc.png")


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = common.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_run_arguments(p, "dlsgan", images=128_000, eval_every=200, log_every=50, amp=True)
    # model
    p.add_argument(
        "--arch",
        default="dcgan",
        choices=["stylegan2", "dcgan"],
        help="generator / discriminator family (paper: stylegan2; DCGAN learns to encode faster at CPU scale)",
    )
    p.add_argument("--width", type=int, default=32, help="max feature maps (paper-sized StyleGAN2: 512)")
    p.add_argument("--latent-dim", type=int, default=512, help="d, the latent dimension (paper: 512)")
    p.add_argument("--w-dim", type=int, default=256, help="StyleGAN2 intermediate latent width")
    p.add_argument("--n-mapping", type=int, default=4, help="StyleGAN2 mapping layers (paper: 8)")
    p.add_argument("--mapping-lr-mul", type=float, default=0.01, help="learning-rate multiplier of the mapper")
    p.add_argument(
        "--d-head-hidden",
        type=int,
        default=0,
        help="StyleGAN2 D: width of the dense layer before the heads (0: max(feature maps, d), the paper's ratio)",
    )
    p.add_argument(
        "--d-lr-mode",
        default="equalized",
        choices=["equalized", "plain"],
        help="StyleGAN2 D under Adam: equalized lr (StyleGAN2's), or plain steps as an nn layer would take",
    )
    # the method
    p.add_argument("--dist", default="normal", choices=["normal", "uniform"], help="latent prior, mean 0 variance 1")
    p.add_argument("--dg", action="store_true", help="add lambda_enc * L_enc to G's loss too (paper: 'DG')")
    p.add_argument("--no-dls", action="store_true", help="ablation: plain MSE encoder loss, s fixed at 1")
    p.add_argument("--lambda-enc", type=float, default=1.0, help="weight of L_enc")
    p.add_argument("--v-update", default="window", choices=["window", "ema"], help="how v is tracked")
    p.add_argument(
        "--v-window",
        type=int,
        default=2048,
        help="samples in v's moving window (paper: 512 x 16 of 630k steps; shorter for short runs)",
    )
    p.add_argument("--v-ema", type=float, default=0.999, help="EMA decay of v with --v-update ema")
    # optimization
    p.add_argument("--loss", default="logistic", choices=common.GAN_LOSSES, help="adversarial loss (paper: NSGAN)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (split over DDP ranks)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--betas", type=float, nargs=2, default=[0.0, 0.99], help="Adam betas")
    p.add_argument("--lr-decay", type=float, default=0.02, help="learning-rate decay per epoch (paper: 2%%)")
    p.add_argument("--r1", type=float, default=10.0, help="R1 weight (paper: 10, i.e. gamma = 20)")
    p.add_argument("--r1-interval", type=int, default=4, help="lazy R1 every k steps (1 = every step)")
    p.add_argument("--ema-kimg", type=float, default=10.0, help="half-life of the EMA generator in thousands of images")
    p.add_argument(
        "--ema-rampup",
        type=float,
        default=0.05,
        help="EMA half-life capped at this fraction of the images seen (0: off)",
    )
    # ablation driver
    p.add_argument("--ablation", action="store_true", help="run {DLS, no DLS} x {D, DG} for --dist; write a table")
    p.add_argument("--jobs", type=int, default=1, help="ablation runs at once (CPU threads are split between them)")
    return common.parse_run_args(p, argv, validate_args, METHOD)


def validate_args(args):
    """Every flag checked here, before anything is read or created: a refused run leaves nothing behind."""
    common.check_args(
        args,
        positive=(
            "latent_dim",
            "width",
            "w_dim",
            "batch_size",
            "lr",
            "mapping_lr_mul",
            "v_window",
            "ema_kimg",
            "r1_interval",
            "eval_every",
            "eval_images",
            "save_every",
            "log_every",
            "jobs",
        ),
        nonnegative=("n_mapping", "lambda_enc", "r1", "epochs", "images", "workers", "ema_rampup", "d_head_hidden"),
        fraction=("betas", "lr_decay", "v_ema"),
    )
    common.check_resolution(args.resolution, minimum=16)  # the evaluation's SSIM needs an 11 x 11 window
    if args.batch_size < 2:
        common.fail("--batch-size must be at least 2")
    if args.epochs == 0 and args.images < args.batch_size:
        common.fail(f"--images {args.images} is less than one batch of {args.batch_size}: nothing would be trained")


if __name__ == "__main__":
    args = parse_args()
    if args.ablation:
        run_ablation(args, sys.argv[1:])
    else:
        train(args)

"""Latently Invertible Autoencoder (LIA) -- a GAN whose mapping network is invertible, then an encoder to its y-space.

Paper: J. Zhu, D. Zhao, B. Zhang, B. Zhou, "Disentangled Inference for GANs with Latently Invertible Autoencoder",
IJCV 2022 (arXiv:1906.08090). The mapping MLP of the generator is replaced by an invertible network phi (coupling
layers, Eqs. 5-6), so the intermediate latent y and the prior's z are exact inverses, z = phi(y), y = phi^-1(z):

    stage gan       z -> phi^-1 -> y -> g -> x~          a GAN (Eq. 10); no likelihood term on phi
    stage encoder   x -> f -> y -> g* -> x~              g and phi frozen; f and the discriminator c trained with
                    L = ||x - x~||^2 + beta1 ||VGG16 conv4_3(x) - conv4_3(x~)||^2 + beta2 softplus(-c(x~))  (Eqs. 7, 12)
    stage refine    y* = argmin_y L(x, g(y))   (Eq. 13), from three inits (random, mean y, f(x)), in y and in z

Two choices a reader copying this should know (docs/lia.md measures both): VGG16 is torchvision's ImageNet network
(trained on std-normalised RGB) fed the authors' Caffe-style input, [0, 255] minus the mean (their Keras VGG16's),
so that beta1 = 5e-5 keeps its weight (``--vgg-input``); phi is plain layers at lr x 0.01 (``--mapping-lr-mul``), so
at CPU budgets it stays within ~2 % of its random initialisation (logged as eval/phi_*_change), and "y versus z"
compares g's input with a near-random bijection.

What it reproduces (docs/lia.md): Fig. 11 (the encoder's init converges faster and lower), Fig. 10 / section 6.4
(refinement in y beats refinement in z from the same start), Table 2 (perceptual path length in z and in y), Table 3
(reconstruction of held-out images against the "StyleGAN + encoder" arm, ``--mapping mlp``, and eval.py's
optimization baseline), exactness of phi, real-image interpolation in y and style mixing (``--arch stylegan2``).

Usage:
    python lia.py                                   # all three stages on MNIST 32x32 (DCGAN g)
    python lia.py --mapping mlp --stage all         # the comparison arm: a GAN with an MLP mapping, encoder to z
    python lia.py --stage gan                       # one stage at a time ...
    python lia.py --stage encoder --gan runs/<gan run>/checkpoint.pt
    python lia.py --stage refine --ckpt runs/<encoder run>/checkpoint.pt
    python lia.py --resume runs/<run>/checkpoint.pt # continue any stage exactly where it stopped
    torchrun --nproc_per_node=2 lia.py --run-name x # DDP (gloo on CPU, nccl on CUDA), every stage
    python eval.py --ckpt runs/<lia encoder run>/checkpoint.pt --ckpt runs/<mlp encoder run>/checkpoint.pt \\
        --baselines opt-w-mean                      # Table 3: FID / SWD / MSE of the reconstructions
    # paper scale (GPU): FFHQ-like data at 128px, StyleGAN2, d = 512, 8 coupling steps
    python lia.py --arch stylegan2 --dataset folder:/data/ffhq128 --resolution 128 --width 512 --latent-dim 512 \\
        --stage gan --epochs 50 --batch-size 32

Everything of a run goes to runs/{run_name}/ (``--stage all`` makes {name}__gan, {name}__encoder, {name}__refine):
metrics.jsonl, samples.png, ppl.json (gan); reconstructions.png, interpolation_y.png, style_mixing.png (encoder);
refine.json, fig11_inits.png, fig10_y_vs_z.png, refine_grid.png (refine); checkpoint.pt (rebuildable by eval.py
without importing this file: ``inversion.encoder_space`` says the encoder outputs y, G.mapping.inverse gives z).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import common

METHOD = "lia"
STAGES = ("gan", "encoder", "refine")


# ---------------------------------------------------------------------------------------------------------
# The method: the prior, phi (G.mapping in the z -> y direction), the reconstruction loss (Eq. 7)
# ---------------------------------------------------------------------------------------------------------
def phi(G, y):
    """z = phi(y): G.mapping runs phi^-1 (z -> y, as the generator uses it); its inverse is phi."""
    return G.mapping.inverse(y)


def phi_inverse(G, z):
    return G.mapping(z)


class ReconstructionLoss(torch.nn.Module):
    """Eq. 7 per image: ||x - x~||^2 + beta1 ||VGG16 conv4_3(x) - conv4_3(x~)||^2, each as a mean over its elements
    (the code's MSE form). Returns (pixel, perceptual) per image, so a batch of independent codes can be optimized
    at once (their sum's gradient for one code is that code's own)."""

    def __init__(self, vgg_input="0-255"):
        super().__init__()
        self.perceptual = common.VGGPerceptualLoss("relu4_3", input_range=vgg_input)

    def target_features(self, x):
        with torch.no_grad():
            return self.perceptual.features(x)

    def forward(self, x, x_rec, x_features=None):
        pixel = (x - x_rec).square().flatten(1).mean(1)
        x_features = self.target_features(x) if x_features is None else x_features
        perceptual = (self.perceptual.features(x_rec) - x_features).square().flatten(1).mean(1)
        return pixel, perceptual


# ---------------------------------------------------------------------------------------------------------
# Networks (from common.py): g with phi^-1 (or an MLP) as its mapping, the discriminator c, the encoder f
# ---------------------------------------------------------------------------------------------------------
def gan_specs(args, img_channels):
    mapping = {"mapping": args.mapping, "n_mapping": args.n_mapping}
    if args.mapping == "invertible":
        mapping["coupling"] = args.coupling
    if args.arch == "stylegan2":
        g = common.model_spec(
            common.StyleGAN2Generator,
            z_dim=args.latent_dim,
            w_dim=args.latent_dim,
            resolution=args.resolution,
            img_channels=img_channels,
            width=args.width,
            **mapping,
        )
        d = common.model_spec(
            common.StyleGAN2Discriminator, resolution=args.resolution, img_channels=img_channels, width=args.width
        )
    else:
        g = common.model_spec(
            common.DCGANMappingGenerator,
            z_dim=args.latent_dim,
            w_dim=args.latent_dim,
            resolution=args.resolution,
            img_channels=img_channels,
            width=args.width,
            **mapping,
        )
        d = common.model_spec(
            common.DCGANDiscriminator,
            resolution=args.resolution,
            img_channels=img_channels,
            width=args.width,
            norm="none",
        )
    return {"G": g, "D": d}


# ---------------------------------------------------------------------------------------------------------
# Shared by the stages
# ---------------------------------------------------------------------------------------------------------
GAN_FLAGS = ("dataset", "resolution", "arch", "mapping", "coupling", "n_mapping", "latent_dim", "width")


def take_source_flags(args, source_args, path, flags):
    """Stages 2 and 3 work on the generator of an earlier stage: its data and network flags are taken from it, and
    one written on the command line with another value is refused (the encoder would train on other data)."""
    for flag in flags:
        if flag in getattr(args, "_given", ()) and getattr(args, flag) != source_args[flag]:
            common.fail(
                f"--{flag.replace('_', '-')} is {getattr(args, flag)!r} but '{path}' was trained with "
                f"{source_args[flag]!r}; drop --{flag.replace('_', '-')} (it is taken from there)"
            )
        setattr(args, flag, source_args[flag])


def load_stage_checkpoint(path, stage, flag):
    """A lia checkpoint of ``stage``; a checkpoint of another stage or method is a one-line error naming the fix."""
    ckpt = common.load_method_checkpoint(path, METHOD)
    if ckpt.get("stage") != stage:
        common.fail(
            f"'{path}' is a {ckpt.get('stage')!r}-stage lia checkpoint, not a {stage!r}-stage one; pass the "
            f"{stage} stage's checkpoint as {flag}"
        )
    return ckpt


@torch.no_grad()
def generate_batched(G, z, batch=250):
    return torch.cat([G(chunk).clamp(-1, 1) for chunk in z.split(batch)])


# ---------------------------------------------------------------------------------------------------------
# Stage 1: the GAN with phi^-1 as its mapping (Eq. 10); Table 2's path lengths on the result
# ---------------------------------------------------------------------------------------------------------
def gan_step(G, D, opt_g, opt_d, x_real, args, r1_weight):
    """One D step (adversarial, plus R1 folded in when ``r1_weight`` > 0 with --r1-interval 1) and one G step."""
    device, n = x_real.device, len(x_real)
    D.requires_grad_(True)
    with torch.no_grad():
        x_fake = G(common.sample_z(n, args.latent_dim, "normal", device))
    x_real = x_real.detach().requires_grad_(r1_weight > 0)
    real_logit, _ = D(x_real)
    fake_logit, _ = D(x_fake)
    d_loss = common.d_adv_loss(args.loss, real_logit, fake_logit)
    r1 = common.r1_penalty(real_logit, x_real) if r1_weight > 0 else torch.zeros((), device=device)
    opt_d.zero_grad(set_to_none=True)
    (d_loss + r1_weight * r1).backward()
    common.sync_gradients(D)
    opt_d.step()

    D.requires_grad_(False)
    fake_logit, _ = D(G(common.sample_z(n, args.latent_dim, "normal", device)))
    g_loss = common.g_adv_loss(args.loss, fake_logit)
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    common.sync_gradients(G)
    opt_g.step()
    D.requires_grad_(True)
    return {"losses/D": d_loss.item(), "losses/G": g_loss.item(), **({"losses/R1": r1.item()} if r1_weight else {})}


def randomize_phi(G):
    """Every coupling step's f gets a random output layer (nn.Linear's own init) in place of common.py's zero init
    (Glow's, which starts phi as a permutation): LIA's f is two ordinary dense layers, so phi starts as a random
    non-linear bijection, as StyleGAN's MLP starts as a random non-linear map. With the 0.01 lr multiplier phi then
    stays close to that; with zero init it would stay close to a permutation and y would simply be z reordered."""
    for step in G.mapping.steps:
        step.net[-1].reset_parameters()


def phi_movement(mapping, mapping_init, z):
    """How far training moved phi from its initialisation: the relative change of its weights,
    ||theta - theta_0|| / ||theta_0||, and of its output, mean ||phi^-1(z) - phi_0^-1(z)|| / mean ||phi_0^-1(z)||
    (docs/lia.md measures it)."""
    now = torch.cat([p.detach().flatten() for p in mapping.parameters()])
    init = torch.cat([p.flatten() for p in mapping_init.parameters()])
    y, y_init = mapping(z), mapping_init(z)
    return {
        "eval/phi_weight_change": ((now - init).norm() / init.norm()).item(),
        "eval/phi_output_change": ((y - y_init).norm(dim=1).mean() / y_init.norm(dim=1).mean()).item(),
    }


def variance_preserving_mlp(G):
    """He init (leaky ReLU 0.2) for the DCGAN generator's MLP, as StyleGAN's equalized layers have it. nn.Linear's
    default init shrinks the signal about 3x per layer: through 8 layers w varied by 1e-3 across z, below
    BatchNorm's epsilon, and the generator collapsed to one image (measured; docs/lia.md)."""
    for layer in G.mapping:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(layer.weight, a=0.2, nonlinearity="leaky_relu")
            torch.nn.init.zeros_(layer.bias)


def generator_param_groups(G, args):
    """phi (or the MLP) at lr * --mapping-lr-mul, the synthesis at lr. StyleGAN2-lite's MLP carries its 0.01 inside
    its equalized layers already, so it gets the plain lr here."""
    mapping = list(G.mapping.parameters())
    builtin = args.arch == "stylegan2" and args.mapping == "mlp"
    mapping_ids = {id(p) for p in mapping}
    return [
        {"params": mapping, "lr": args.lr * (1.0 if builtin else args.mapping_lr_mul)},
        {"params": [p for p in G.parameters() if id(p) not in mapping_ids], "lr": args.lr},
    ]


def slerp_directions(a, b, t):
    """Spherical interpolation of the directions of a and b at fraction t, returned at radius sqrt(d) (where a
    d-dimensional N(0, I) sample lies): StyleGAN's path-length slerp, which returns unit vectors because StyleGAN
    normalizes z anyway; this generator takes z as it is, so the result is put back at the prior's radius."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    d = (a * b).sum(1, keepdim=True).clamp(-1, 1)
    p = t * torch.acos(d)
    c = F.normalize(b - d * a, dim=1)
    return F.normalize(a * torch.cos(p) + c * torch.sin(p), dim=1) * math.sqrt(a.shape[1])


@torch.no_grad()
def path_length(G, lpips, space, sampling, n, seed, device, epsilon=1e-4, batch=100):
    """Perceptual path length (Karras et al. 2019, the definition the paper's Table 2 uses): the LPIPS distance
    between images at t and t + epsilon along a path, divided by epsilon^2, with t ~ U(0, 1) ('full') or t = 0
    ('end', StyleGAN's U(0, 0)); the path is a slerp in z, or a lerp in y between y = phi^-1(z1) and phi^-1(z2).
    Values outside the 1st..99th percentile are dropped before the mean, as StyleGAN does."""
    gen = torch.Generator().manual_seed(seed)
    distances = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        z1, z2 = (common.sample_z(m, G.z_dim, "normal", "cpu", gen).to(device) for _ in range(2))
        t = torch.rand(m, 1, generator=gen).to(device)
        if sampling == "end":
            t = torch.zeros_like(t)
        if space == "z":
            z_t, z_e = slerp_directions(z1, z2, t), slerp_directions(z1, z2, t + epsilon)
            x_t, x_e = G(z_t), G(z_e)
        else:
            y1, y2 = phi_inverse(G, z1), phi_inverse(G, z2)
            x_t, x_e = G.synthesis(torch.lerp(y1, y2, t)), G.synthesis(torch.lerp(y1, y2, t + epsilon))
        distances.append(lpips(x_t, x_e) / epsilon**2)
    d = torch.cat(distances).double().cpu()
    lo, hi = torch.quantile(d, 0.01), torch.quantile(d, 0.99)
    kept = d[(d >= lo) & (d <= hi)]
    return {"mean": float(kept.mean()), "median": float(d.median()), "n": n, "kept": len(kept)}


def path_length_table(G, args, lpips, device):
    space_y = "y" if args.mapping == "invertible" else "w (MLP output)"
    table = {
        "epsilon": 1e-4,
        "n": args.ppl_samples,
        "lpips": "vgg16 v0.1 (real weights)",
        "space_names": {"y": space_y},
    }
    for space in ("z", "y"):
        for sampling in ("full", "end"):
            table[f"{space}_{sampling}"] = path_length(
                G, lpips, space, sampling, args.ppl_samples, args.seed + 4242, device
            )
    return table


def train_gan(args):
    lpips = {}

    def prepare(run):  # the path-length network is loaded now, so missing weights stop the run before it trains
        lpips["net"] = common.LPIPS().to(run.device) if run.is_main and args.ppl_samples else None

    run = common.Run(args, METHOD, stage="gan", prepare=prepare)
    device, bs = run.device, args.batch_size
    specs = gan_specs(args, run.img_channels)
    G, D = common.build_from_spec(specs["G"]).to(device), common.build_from_spec(specs["D"]).to(device)
    if args.mapping == "invertible":
        randomize_phi(G)
    elif args.arch == "dcgan":
        variance_preserving_mlp(G)
    common.broadcast_module(G), common.broadcast_module(D)
    # phi as it started, to measure how far training moves it (a resumed run rebuilds the same init from the seed)
    phi_init = copy.deepcopy(G.mapping).requires_grad_(False) if args.mapping == "invertible" else None
    G_ema = common.EMA(G, half_life_kimg=args.ema_kimg, rampup=args.ema_rampup)
    opt_g = torch.optim.Adam(generator_param_groups(G, args), lr=args.lr, betas=args.betas)
    d_lr, d_betas = common.lazy_regularization_adam(args.lr, args.betas, args.r1_interval if args.r1 > 0 else 1)
    opt_d = torch.optim.Adam(D.parameters(), lr=d_lr, betas=d_betas)
    run.restore({"G": G, "D": D, "G_ema": G_ema.model}, {"G": opt_g, "D": opt_d})
    phi_text = f"{args.n_mapping} {'coupling steps, ' + args.coupling if args.mapping == 'invertible' else 'layers'}"
    run.banner(
        f"stage gan | {args.dataset} {args.resolution}px | {args.arch} width {args.width} | mapping "
        f"{args.mapping} ({phi_text}) | d {args.latent_dim}"
    )

    for _, x_real in run.batches():
        do_r1 = args.r1 > 0 and run.step % args.r1_interval == 0
        scalars = gan_step(G, D, opt_g, opt_d, x_real, args, args.r1 if do_r1 and args.r1_interval == 1 else 0.0)
        if do_r1 and args.r1_interval > 1:
            scalars.update(common.r1_step(D, opt_d, x_real, args.r1 * args.r1_interval))
        step = run.step_done(scalars, show=("losses/D", "losses/G"))
        G_ema.update(G, step * bs, bs)
        if run.due("eval") or run.due("save"):
            common.recalibrate_generator(G_ema.model, args.latent_dim, args.seed, device)
        if run.due("eval") and run.is_main:
            metrics = {}
            with torch.no_grad():
                z = common.sample_z(
                    args.eval_images, args.latent_dim, "normal", "cpu", torch.Generator().manual_seed(args.seed + 99)
                ).to(device)
                if args.mapping == "invertible":  # phi must stay exact while it trains
                    y = phi_inverse(G_ema.model, z)
                    metrics["eval/phi_roundtrip_max_err"] = (phi(G_ema.model, y) - z).abs().max().item()
                    metrics.update(phi_movement(G_ema.model.mapping, phi_init, z))
                metrics["eval/y_std"] = phi_inverse(G_ema.model, z).std().item()
            row = run.log(metrics)
            common.save_image_grid(generate_batched(G_ema.model, z[:64]), os.path.join(run.run_dir, "samples.png"))
            roundtrip = row.get("eval/phi_roundtrip_max_err")
            print(
                f"  eval @ {step}: D {row['losses/D']:.4f} G {row['losses/G']:.4f} (means since the last eval)"
                + (f" | phi round trip max error {roundtrip:.2e}" if roundtrip is not None else "")
                + (
                    f" | phi moved {row['eval/phi_weight_change']:.2%} (weights), "
                    f"{row['eval/phi_output_change']:.2%} (y)"
                    if phi_init is not None
                    else ""
                ),
                flush=True,
            )
        if run.due("save"):
            run.save(
                model_specs=specs,
                inversion={"generator": "G_ema", "encoder": None, "latent_scale": None, "latent_dist": "normal"},
            )
    ppl, train_wall = {}, time.time() - run.t_start
    if run.is_main and lpips["net"] is not None:
        t_ppl = time.time()
        ppl = path_length_table(G_ema.model, args, lpips["net"], device)
        ppl["seconds"] = time.time() - t_ppl
        with open(os.path.join(run.run_dir, "ppl.json"), "w") as f:
            json.dump(ppl, f, indent=1)
        print(
            f"perceptual path length (Table 2, n = {args.ppl_samples}, epsilon 1e-4): z full "
            f"{ppl['z_full']['mean']:.1f} end {ppl['z_end']['mean']:.1f} | y full {ppl['y_full']['mean']:.1f} end "
            f"{ppl['y_end']['mean']:.1f} ({ppl['seconds']:.0f} s)",
            flush=True,
        )
    return run.finish({"train_wall_s": train_wall, "ppl": ppl})


# ---------------------------------------------------------------------------------------------------------
# Stage 2: the encoder f on the frozen g (Eq. 12), the discriminator fine-tuned with R1
# ---------------------------------------------------------------------------------------------------------
def decode(G, code, mapping):
    """The image of an encoder output: g(y) for LIA (the encoder's space is y), g(MLP(z)) for the MLP arm."""
    return G.synthesis(code) if mapping == "invertible" else G(code)


def encoder_step(G, E, D, opt_e, opt_d, x_real, loss_fn, args, r1_weight):
    """f: Eq. 7 on real images + beta2 * softplus(-c(x~)); then c: real x against x~ = g(f(x)), with R1."""
    D.requires_grad_(False)
    x_rec = decode(G, E(x_real), args.mapping)
    pixel, perceptual = loss_fn(x_real, x_rec)
    fake_logit, _ = D(x_rec)
    adv = common.g_adv_loss(args.loss, fake_logit)
    loss = pixel.mean() + args.beta1 * perceptual.mean() + args.beta2 * adv
    opt_e.zero_grad(set_to_none=True)
    loss.backward()
    common.sync_gradients(E)
    opt_e.step()

    D.requires_grad_(True)
    x_real_r = x_real.detach().requires_grad_(r1_weight > 0)
    real_logit, _ = D(x_real_r)
    fake_logit, _ = D(x_rec.detach())
    d_loss = common.d_adv_loss(args.loss, real_logit, fake_logit)
    r1 = common.r1_penalty(real_logit, x_real_r) if r1_weight > 0 else torch.zeros((), device=x_real.device)
    opt_d.zero_grad(set_to_none=True)
    (d_loss + r1_weight * r1).backward()
    common.sync_gradients(D)
    opt_d.step()
    return {
        "losses/total": loss.item(),
        "losses/pixel": pixel.mean().item(),
        "losses/perceptual": perceptual.mean().item(),
        "losses/adv": adv.item(),
        "losses/D": d_loss.item(),
        **({"losses/R1": r1.item()} if r1_weight else {}),
    }


@torch.no_grad()
def encode_batched(E, x, batch=250):
    return torch.cat([E(chunk) for chunk in x.split(batch)])


@torch.no_grad()
def evaluate_encoder(G, E, x_test, args, lpips=None):
    """Held-out reconstructions g(f(x)): MSE, PSNR, SSIM (and LPIPS at the end); phi's round trip on f(x)."""
    code = encode_batched(E, x_test)
    x_rec = torch.cat([decode(G, c, args.mapping).clamp(-1, 1) for c in code.split(250)])
    row = {
        "eval/real_mse": common.mse(x_test, x_rec).item(),
        "eval/real_psnr": common.psnr(x_test, x_rec).item(),
        "eval/real_ssim": common.ssim(x_test, x_rec).item(),
    }
    if lpips is not None:
        row["eval/real_lpips"] = (
            torch.cat([lpips(a, b) for a, b in zip(x_test.split(100), x_rec.split(100))]).mean().item()
        )
    if args.mapping == "invertible":
        z = phi(G, code)
        row["eval/phi_roundtrip_max_err"] = (phi_inverse(G, z) - code).abs().max().item()
        row["eval/code_z_std"] = z.std().item()  # ~1 if f(x) lands where the prior puts y
    return row, x_rec


@torch.no_grad()
def save_encoder_figures(G, E, x_test, x_rec, args, run_dir):
    rows = max(1, min(4, len(x_test) // 8))
    real, rec = (t[: rows * 8].view(rows, -1, *t.shape[1:]) for t in (x_test, x_rec))
    common.save_image_grid(torch.stack([real, rec], 1).flatten(0, 2), os.path.join(run_dir, "reconstructions.png"))
    # Fig. 7: interpolation between real images, linear in the encoder's space (y for LIA); ends are the originals
    pairs = min(6, len(x_test) // 2)
    if pairs:
        a, b = encode_batched(E, x_test[:pairs]), encode_batched(E, x_test[pairs : 2 * pairs])
        t = torch.linspace(0, 1, 8, device=a.device).view(1, -1, 1)
        codes = torch.lerp(a[:, None], b[:, None], t).flatten(0, 1)
        frames = decode(G, codes, args.mapping).clamp(-1, 1).view(pairs, 8, *x_test.shape[1:])
        strip = torch.cat([x_test[:pairs, None], frames, x_test[pairs : 2 * pairs, None]], 1).flatten(0, 1)
        common.save_image_grid(strip, os.path.join(run_dir, "interpolation_y.png"), nrow=10)
    # Fig. 5: style mixing of real images (StyleGAN2 only): coarse / middle / fine layers of y from a source image
    if args.arch == "stylegan2" and args.mapping == "invertible" and len(x_test) >= 10:
        y_src, y_dst = encode_batched(E, x_test[:5]), encode_batched(E, x_test[5:10])
        for group, tiles in common.style_mixing_grids(G, y_src, y_dst).items():
            common.save_image_grid(tiles, os.path.join(run_dir, f"style_mixing_{group}.png"), nrow=6)


def train_encoder(args):
    source = {}

    def prepare(run):  # the gan stage's G_ema, frozen, and its data and network flags; a resumed run reads its copy
        ckpt = run.ckpt or load_stage_checkpoint(args.gan, "gan", "--gan")
        source.update(ckpt=ckpt, gan_args=ckpt["gan_args"] if run.ckpt else ckpt["args"])
        source["path"] = ckpt["gan_source"] if run.ckpt else os.path.abspath(args.gan)
        take_source_flags(args, source["gan_args"], args.resume or args.gan, (*GAN_FLAGS, "loss"))  # c keeps its loss
        # frozen: no gradients, eval mode (BatchNorm keeps the statistics recalibrated at the end of stage 1)
        weights = ckpt["state_dicts"]["G" if run.ckpt else "G_ema"]
        path = args.resume or args.gan
        source["G"] = common.build(ckpt["model_specs"]["G"], run.device, weights, "the generator", path, frozen=True)

    run = common.Run(args, METHOD, stage="encoder", prepare=prepare, test_split=args.eval_images)
    device, G, ckpt, x_test = run.device, source["G"], source["ckpt"], run.x_test
    specs = {
        "G": ckpt["model_specs"]["G"],
        "D": ckpt["model_specs"]["D"],
        "E": common.model_spec(
            common.ResNetEncoder,
            resolution=args.resolution,
            in_channels=run.img_channels,
            out_dim=args.latent_dim,
            width=args.encoder_width,
        ),
    }
    E = common.build(specs["E"], device)
    # the discriminator starts from stage 1's and keeps training (Eq. 12); a resumed run restores its own
    D = common.build(specs["D"], device, None if run.ckpt else ckpt["state_dicts"]["D"], "the discriminator", args.gan)
    opt_e = torch.optim.Adam(E.parameters(), lr=args.lr, betas=args.betas)
    d_lr, d_betas = common.lazy_regularization_adam(args.lr, args.betas, args.r1_interval if args.r1 > 0 else 1)
    opt_d = torch.optim.Adam(D.parameters(), lr=d_lr, betas=d_betas)
    loss_fn = ReconstructionLoss(args.vgg_input).to(device)
    run.restore({"E": E, "D": D}, {"E": opt_e, "D": opt_d}, frozen={"G": G})
    space = "y" if args.mapping == "invertible" else "z"
    run.banner(
        f"stage encoder | f: x -> {space} on the frozen {specs['G']['class']} of {source['path']} | beta1 "
        f"{args.beta1} (VGG input {args.vgg_input}) beta2 {args.beta2}"
    )

    for _, x_real in run.batches():
        E.train()
        do_r1 = args.r1 > 0 and run.step % args.r1_interval == 0
        scalars = encoder_step(
            G, E, D, opt_e, opt_d, x_real, loss_fn, args, args.r1 if do_r1 and args.r1_interval == 1 else 0.0
        )
        if do_r1 and args.r1_interval > 1:
            scalars.update(common.r1_step(D, opt_d, x_real, args.r1 * args.r1_interval))
        step = run.step_done(scalars, show=("losses/pixel", "losses/perceptual", "losses/adv", "losses/D"))
        if run.due("eval") and run.is_main:
            E.eval()
            metrics, x_rec = evaluate_encoder(G, E, x_test, args)
            row = run.log(metrics)
            save_encoder_figures(G, E, x_test, x_rec, args, run.run_dir)
            print(
                f"  eval @ {step}: pixel {row['losses/pixel']:.4f} perceptual {row['losses/perceptual']:.1f} | test "
                f"PSNR {row['eval/real_psnr']:.2f} SSIM {row['eval/real_ssim']:.3f} MSE {row['eval/real_mse']:.4f}",
                flush=True,
            )
        if run.due("save"):
            run.save(
                model_specs=specs,
                gan_args=source["gan_args"],
                gan_source=source["path"],
                inversion=encoder_contract(args),
            )
    train_wall = time.time() - run.t_start
    final = final_evaluation(G, E, x_test, args) if run.is_main else {}
    return run.finish({"train_wall_s": train_wall, "final": final}, identical="encoder and discriminator")


def encoder_contract(args):
    """How eval.py inverts with this checkpoint: G.synthesis(E(x)) for LIA (the encoder's space is w = y),
    G(E(x)) for the MLP arm (its encoder outputs z)."""
    space = "w" if args.mapping == "invertible" else "z"
    return {
        "generator": "G",
        "encoder": "E",
        "encoder_output": "output",
        "encoder_space": space,
        "latent_scale": None,
        "latent_dist": "normal",
    }


def final_evaluation(G, E, x_test, args):
    """The held-out reconstructions at the end, with LPIPS, and the encoder's time per image."""
    E.eval()
    final, _ = evaluate_encoder(G, E, x_test, args, lpips=common.LPIPS().to(x_test.device))
    t0 = time.perf_counter()
    encode_batched(E, x_test)
    final["eval/encoder_seconds_per_image"] = (time.perf_counter() - t0) / len(x_test)
    print(
        "final, held-out test images: " + ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in final.items()), flush=True
    )
    return final


# ---------------------------------------------------------------------------------------------------------
# Stage 3: per-image refinement (Eq. 13) in y or in z = phi(y), from three inits (Figs. 10, 11)
# ---------------------------------------------------------------------------------------------------------
def init_seed(args, init):
    return args.seed + 100 * args.refine_inits.index(init)


def initial_codes(G, E, x, init, seed):
    """y_0 for each image: f(x) (LIA), the mean of y over 10,000 prior samples (Image2StyleGAN), or a random y."""
    n, d, device = len(x), G.z_dim, x.device
    with torch.no_grad():
        if init == "encoder":
            return E(x)
        if init == "mean":
            z = common.sample_z(10_000, d, "normal", "cpu", torch.Generator().manual_seed(seed)).to(device)
            return torch.cat([phi_inverse(G, c) for c in z.split(1000)]).mean(0, keepdim=True).repeat(n, 1)
        return phi_inverse(
            G, common.sample_z(n, d, "normal", "cpu", torch.Generator().manual_seed(seed + 1)).to(device)
        )


def refine(G, x, y0, space, loss_fn, args):
    """Adam on the codes of a batch of images (each image's loss depends only on its own code, so this is the
    per-image optimization done for all at once). In z the code is z = phi(y0) and the image g(phi^-1(z)): the
    same start, another parametrization. Returns per-step per-image pixel and perceptual losses, and the result."""
    code = (phi(G, y0) if space == "z" else y0).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([code], lr=args.lr, betas=args.betas)
    x_features = loss_fn.target_features(x)
    pixel_curve, perceptual_curve = [], []
    for _ in range(args.refine_steps + 1):  # one more evaluation than steps: the curve starts at the init
        y = phi_inverse(G, code) if space == "z" else code
        pixel, perceptual = loss_fn(x, G.synthesis(y), x_features)
        pixel_curve.append(pixel.detach())
        perceptual_curve.append(perceptual.detach())
        if len(pixel_curve) > args.refine_steps:
            break
        opt.zero_grad(set_to_none=True)
        (pixel + args.beta1 * perceptual).sum().backward()
        opt.step()
    with torch.no_grad():
        y = phi_inverse(G, code) if space == "z" else code
        x_final = G.synthesis(y).clamp(-1, 1)
    return torch.stack(pixel_curve), torch.stack(perceptual_curve), x_final.detach()


def refine_shares(G, E, x_all, space, init, loss_fn, args, info):
    """Each rank refines its share of the images; the curves' summary and the results, gathered in order."""
    t0 = time.time()
    # the same start for y and z (Fig. 10); drawn for all images, so DDP ranks refine what one process would
    y0 = initial_codes(G, E, x_all, init, init_seed(args, init))[info.rank :: info.world_size]
    pixel, perceptual, x_final = refine(G, x_all[info.rank :: info.world_size], y0, space, loss_fn, args)
    pixel, perceptual = gather_images(pixel, info), gather_images(perceptual, info)
    result = {
        "pixel": summarize_curve(pixel.cpu()),
        "perceptual": summarize_curve(perceptual.cpu()),
        "total_final_mean": float((pixel[-1] + args.beta1 * perceptual[-1]).mean()),
        "seconds": time.time() - t0,
    }
    if info.is_main:
        r = result
        print(
            f"  {space}/{init:>7}: pixel {r['pixel']['mean'][0]:.4f} -> {r['pixel']['mean'][-1]:.4f} | perceptual "
            f"{r['perceptual']['mean'][0]:.1f} -> {r['perceptual']['mean'][-1]:.1f} ({r['seconds']:.0f} s)",
            flush=True,
        )
    return result, gather_images(x_final, info)


def gather_images(t, dist_info):
    """Concatenate each rank's images (dim 1 of a curve, dim 0 of images) back into the original order."""
    if not dist_info.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(dist_info.world_size)]
    torch.distributed.all_gather(parts, t.contiguous())
    dim = 1 if t.ndim == 2 else 0
    stacked = torch.stack(parts, dim + 1)  # image i of rank r was image r + i * world_size
    return stacked.flatten(dim, dim + 1)


def summarize_curve(curve):
    """Mean and spread (10th, 50th, 90th percentile) over images at every step."""
    q = torch.quantile(curve.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.double), dim=1)
    return {
        "mean": curve.double().mean(1).tolist(),
        "p10": q[0].tolist(),
        "median": q[1].tolist(),
        "p90": q[2].tolist(),
    }


def train_refine(args):
    source = {}

    def prepare(run):  # the encoder stage's frozen g and f, and its data and network flags
        source["path"] = run.ckpt["encoder_source"] if run.ckpt is not None else os.path.abspath(args.ckpt)
        ckpt = source["ckpt"] = load_stage_checkpoint(source["path"], "encoder", "--ckpt")
        take_source_flags(args, ckpt["args"], source["path"], GAN_FLAGS)
        if args.mapping != "invertible":
            common.fail(
                f"'{source['path']}' is the MLP arm (--mapping mlp): refinement in z needs phi; refine a LIA checkpoint"
            )
        if args.refine_images % run.dist.world_size:
            common.fail(f"--refine-images {args.refine_images} is not divisible by {run.dist.world_size} processes")
        n_test = len(common.build_dataset(args.dataset, args.resolution, False, args.data_root))
        if n_test < args.refine_images:
            common.fail(f"--refine-images {args.refine_images} is more than the {n_test} test images")
        source["G"], source["E"] = (
            common.build(ckpt["model_specs"][k], run.device, ckpt["state_dicts"][k], k, source["path"], frozen=True)
            for k in ("G", "E")
        )

    configs = [(space, init) for init in args.refine_inits for space in args.refine_spaces]
    run = common.Run(
        args,
        METHOD,
        stage="refine",
        prepare=prepare,
        data=False,
        test_split=args.refine_images,
        steps=len(configs),
        metrics=False,
    )
    device, G, E, x_all, info = run.device, source["G"], source["E"], run.x_test, run.dist
    loss_fn = ReconstructionLoss(args.vgg_input).to(device)
    done = dict(run.ckpt["results"]) if run.ckpt is not None else {}
    finals = {k: v.to(device) for k, v in run.ckpt["finals"].items()} if run.ckpt is not None else {}
    if run.is_main:
        print(
            f"run: {run.run_dir} | stage refine | {args.refine_images} {args.dataset} test images, "
            f"{args.refine_steps} Adam steps (lr {args.lr}) per space x init: {len(configs)} runs, {len(done)} "
            f"already done | on {device} x{info.world_size}",
            flush=True,
        )
    for space, init in configs:
        key = f"{space}/{init}"
        if key in done:
            continue
        done[key], finals[key] = refine_shares(G, E, x_all, space, init, loss_fn, args, info)
        run.step = len(done)
        run.save(encoder_source=source["path"], results=done, finals={k: v.cpu() for k, v in finals.items()})
    if run.is_main:
        write_refine_report(done, finals, G, E, x_all, args, run.run_dir, source["path"])
    return run.finish({"results": {k: v["total_final_mean"] for k, v in done.items()}}, identical="refined images")


def write_refine_report(done, finals, G, E, x_all, args, run_dir, source_path):
    """refine.json (every curve), the figures of Figs. 10 and 11, the grid, and the table on stdout."""
    report = {
        "images": args.refine_images,
        "steps": args.refine_steps,
        "lr": args.lr,
        "beta1": args.beta1,
        "vgg_input": args.vgg_input,
        "encoder_source": source_path,
        "results": done,
    }
    with open(os.path.join(run_dir, "refine.json"), "w") as f:
        json.dump(report, f, indent=1)
    save_refine_figures(report, finals, G, E, x_all, args, run_dir)
    print_refine_table(report)


def print_refine_table(report):
    print(
        f"refinement of {report['images']} test images, {report['steps']} steps: mean loss (pixel MSE, perceptual) "
        f"at steps 0 / 10% / 100%"
    )
    print("| space | init | pixel @0 | pixel @10% | pixel @end | perceptual @0 | perceptual @10% | perceptual @end |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in report["results"].items():
        space, init = key.split("/")
        p, q = r["pixel"]["mean"], r["perceptual"]["mean"]
        tenth = len(p) // 10
        print(
            f"| {space} | {init} | {p[0]:.4f} | {p[tenth]:.4f} | {p[-1]:.4f} | "
            f"{q[0]:.1f} | {q[tenth]:.1f} | {q[-1]:.1f} |"
        )
    print(flush=True)


def save_refine_figures(report, finals, G, E, x, args, run_dir):
    with torch.no_grad():  # the grid: targets, then per init its start and the results in y and in z
        rows = [x[:8]]
        for init in args.refine_inits:
            y0 = initial_codes(G, E, x, init, init_seed(args, init))[:8]
            rows.append(G.synthesis(y0).clamp(-1, 1))
            rows += [finals[f"{space}/{init}"][:8] for space in args.refine_spaces]
    common.save_image_grid(torch.cat(rows), os.path.join(run_dir, "refine_grid.png"), nrow=8)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[refine] matplotlib not installed: no plots")
        return
    colors = {"encoder": "tab:red", "mean": "tab:blue", "random": "tab:green"}
    results = report["results"]
    for name, spaces, title in (
        ("fig11_inits.png", ["y"], "Fig. 11: refinement in y from three inits"),
        ("fig10_y_vs_z.png", args.refine_spaces, "Fig. 10: y-space (solid) vs z-space (dashed)"),
    ):
        spaces = [s for s in spaces if s in args.refine_spaces]
        if not spaces:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, loss in zip(axes, ("pixel", "perceptual")):
            for init in args.refine_inits:
                for space in spaces:
                    r = results[f"{space}/{init}"][loss]
                    steps = range(len(r["mean"]))
                    style = "-" if space == "y" else "--"
                    ax.plot(steps, r["mean"], style, color=colors[init], label=f"{init} init, {space}")
                    if len(spaces) == 1:
                        ax.fill_between(steps, r["p10"], r["p90"], color=colors[init], alpha=0.15)
            ax.set(
                xlabel="Adam step",
                ylabel=f"{loss} loss (mean over images)",
                yscale="log",
                title=f"{loss}" + (" (band: 10th-90th percentile)" if len(spaces) == 1 else ""),
            )
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{title}; {report['images']} {args.dataset} test images")
        fig.tight_layout()
        fig.savefig(os.path.join(run_dir, name), dpi=110)
        plt.close(fig)
    print(f"[refine] wrote {run_dir}/refine.json, fig11_inits.png, fig10_y_vs_z.png, refine_grid.png", flush=True)


# ---------------------------------------------------------------------------------------------------------
# All three stages in a row
# ---------------------------------------------------------------------------------------------------------
def run_all(argv):
    """gan -> encoder -> refine (refine only with phi), run directories {base}__gan, __encoder, __refine; each
    stage gets its own defaults for the flags a stage sets (lr, betas, batch size, budget) unless given."""
    base = parse_args(argv)
    slug = base.dataset.replace(":", "_").replace("/", "_")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not base.run_name:
        common.fail("--stage all under torchrun needs --run-name (every rank must name the same three directories)")
    name = base.run_name or f"{slug}__{base.exp_name}__{base.seed}__{int(time.time())}"
    for flag in ("--lr", "--betas"):
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            common.fail(
                f"{flag} differs per stage (see --help); with --stage all each stage uses its own default, "
                "so run the stages one by one to set it"
            )
    for d in (f"runs/{name}__{stage}" for stage in STAGES):
        if os.path.isdir(d) and os.listdir(d):
            common.fail(f"run directory '{d}' already holds files; pick another --run-name")
    common.Run.keep_process_group = True
    # --images / --epochs / --batch-size, when given, apply to the gan and the encoder stage alike
    stage_argv = common.strip_flags(argv, (), valued=("--stage", "--run-name"))
    gan_dir, enc_dir = (os.path.join("runs", f"{name}__{stage}") for stage in ("gan", "encoder"))  # on every rank
    train_gan(parse_args([*stage_argv, "--stage", "gan", "--run-name", f"{name}__gan"]))
    train_encoder(
        parse_args(
            [
                *stage_argv,
                "--stage",
                "encoder",
                "--gan",
                os.path.join(gan_dir, "checkpoint.pt"),
                "--run-name",
                f"{name}__encoder",
            ]
        )
    )
    if base.mapping == "invertible":
        train_refine(
            parse_args(
                [
                    *stage_argv,
                    "--stage",
                    "refine",
                    "--ckpt",
                    os.path.join(enc_dir, "checkpoint.pt"),
                    "--run-name",
                    f"{name}__refine",
                ]
            )
        )
    else:
        print("[all] --mapping mlp: no refine stage (refinement in z needs phi)", flush=True)
    common.Run.keep_process_group = False
    common.cleanup_distributed()


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------
STAGE_DEFAULTS = {  # flag: (gan, encoder, refine); None on the command line means "the stage's default"
    "lr": (1e-3, 1e-4, 0.05),
    "betas": ((0.0, 0.99), (0.9, 0.99), (0.9, 0.999)),
    "batch_size": (64, 16, 32),
    "images": (44_800, 4_800, 0),  # 700 steps of 64, 300 of 16
}


def parse_args(argv=None):
    p = common.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_run_arguments(
        p,
        "lia",
        images=None,
        eval_every=500,
        log_every=100,
        images_help="budget in images (default: gan 700 steps of 64, encoder 300 steps of 16)",
    )
    p.add_argument(
        "--stage",
        default="all",
        choices=["all", *STAGES],
        help="gan: train g and phi; encoder: train f on a frozen --gan; refine: per-image optimization on "
        "an encoder --ckpt; all: the three in a row",
    )
    p.add_argument("--gan", default=None, help="encoder stage: the gan stage's checkpoint.pt")
    p.add_argument("--ckpt", default=None, help="refine stage: the encoder stage's checkpoint.pt")
    # generator and phi (gan stage)
    p.add_argument(
        "--arch",
        default="dcgan",
        choices=["dcgan", "stylegan2"],
        help="g: DCGAN fed y (the CPU default), or StyleGAN2-lite with y in every layer (the paper's StyleGAN)",
    )
    p.add_argument(
        "--mapping",
        default="invertible",
        choices=["invertible", "mlp"],
        help="invertible: LIA's phi; mlp: the paper's 'StyleGAN + encoder' arm (the encoder then outputs z)",
    )
    p.add_argument(
        "--coupling",
        default="additive",
        choices=["additive", "affine"],
        help="coupling steps: additive (NICE, the paper's Eq. 5) or affine (scale = sigmoid(h + 2))",
    )
    p.add_argument("--n-mapping", type=int, default=8, help="coupling steps of phi, or MLP layers (paper: 8)")
    p.add_argument("--latent-dim", type=int, default=128, help="d = dim z = dim y (paper: 512)")
    p.add_argument(
        "--mapping-lr-mul",
        type=float,
        default=0.01,
        help="learning-rate multiplier of phi (or the MLP), StyleGAN's for its mapping (docs/lia.md: why)",
    )
    p.add_argument("--width", type=int, default=32, help="feature maps of g and c (paper-sized StyleGAN2: 512)")
    p.add_argument(
        "--loss",
        default="logistic",
        choices=["logistic", "wgan"],
        help="adversarial loss: non-saturating logistic (the code's) or the paper's Wasserstein form (Eq. 8); "
        "the encoder stage keeps its gan checkpoint's",
    )
    p.add_argument("--r1", type=float, default=5.0, help="R1 weight: gamma / 2 with the paper's gamma = 10 (Eq. 8)")
    p.add_argument("--r1-interval", type=int, default=4, help="lazy R1 every k steps (1 = every step)")
    p.add_argument("--ema-kimg", type=float, default=10.0, help="half-life of the EMA generator (thousands of images)")
    p.add_argument("--ema-rampup", type=float, default=0.05, help="EMA half-life capped at this fraction of images")
    p.add_argument(
        "--ppl-samples", type=int, default=250, help="gan stage: samples per path-length estimate (Table 2; 0: skip)"
    )
    # encoder (encoder stage)
    p.add_argument("--encoder-width", type=int, default=64, help="feature maps of the encoder f")
    p.add_argument("--beta1", type=float, default=5e-5, help="weight of the VGG16 conv4_3 loss (paper: 5e-5)")
    p.add_argument("--beta2", type=float, default=0.1, help="weight of the adversarial loss on x~ (code: 0.1)")
    p.add_argument(
        "--vgg-input",
        default="0-255",
        choices=["0-255", "imagenet"],
        help="VGG16 input: 0-255 as LIA's TF code feeds it (what beta1 = 5e-5 was tuned for), or "
        "ImageNet-normalized (features ~58x smaller)",
    )
    # refinement (refine stage)
    p.add_argument("--refine-images", type=int, default=8, help="held-out test images refined (paper: a few faces)")
    p.add_argument("--refine-steps", type=int, default=60, help="Adam steps per image, space and init")
    p.add_argument(
        "--refine-inits",
        nargs="+",
        default=["encoder", "mean", "random"],
        choices=["encoder", "mean", "random"],
        help="initial codes compared (Fig. 11)",
    )
    p.add_argument(
        "--refine-spaces",
        nargs="+",
        default=["y", "z"],
        choices=["y", "z"],
        help="spaces optimized from the same initial reconstruction (Fig. 10)",
    )
    # optimization
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: gan 64, encoder 16)")
    p.add_argument(
        "--lr", type=float, default=None, help="Adam lr (default: gan 1e-3; encoder 1e-4, the code's; refine 0.05)"
    )
    p.add_argument(
        "--betas",
        type=float,
        nargs=2,
        default=None,
        help="Adam betas (default: gan (0, 0.99), StyleGAN's; encoder (0.9, 0.99), the code's; refine (0.9, 0.999))",
    )
    return common.parse_run_args(p, argv, validate_args, METHOD)


def validate_args(args):
    """Every flag checked here, before anything is read or created: a refused run leaves nothing behind."""
    stage = args.stage if args.stage != "all" else "gan"
    for flag, defaults in STAGE_DEFAULTS.items():
        if getattr(args, flag) is None:
            value = defaults[STAGES.index(stage)]
            setattr(args, flag, list(value) if isinstance(value, tuple) else value)
    common.check_args(
        args,
        positive=(
            "latent_dim",
            "width",
            "n_mapping",
            "mapping_lr_mul",
            "encoder_width",
            "r1_interval",
            "ema_kimg",
            "batch_size",
            "lr",
            "refine_images",
            "refine_steps",
            "eval_every",
            "eval_images",
            "save_every",
            "log_every",
        ),
        nonnegative=("ppl_samples", "r1", "beta1", "beta2", "ema_rampup", "epochs", "images", "workers"),
        fraction=("betas",),
    )
    common.check_resolution(args.resolution, minimum=16)  # the evaluation's SSIM needs an 11 x 11 window
    if args.latent_dim % 2 and args.mapping == "invertible":
        common.fail(f"--latent-dim must be even for coupling layers (got {args.latent_dim})")
    if args.batch_size < 2:
        common.fail("--batch-size must be at least 2")
    if args.stage in ("gan", "encoder", "all") and args.epochs == 0 and args.images < args.batch_size:
        common.fail(f"--images {args.images} is less than one batch of {args.batch_size}: nothing would be trained")
    if args.stage == "encoder" and not args.gan and not args.resume:
        common.fail("the encoder stage needs --gan CKPT (the gan stage's checkpoint); train one with --stage gan")
    if args.stage == "refine" and not args.ckpt and not args.resume:
        common.fail(
            "the refine stage needs --ckpt CKPT (the encoder stage's checkpoint); train one with --stage encoder"
        )
    if args.gan and args.stage != "encoder":
        common.fail("--gan is for --stage encoder")
    if args.ckpt and args.stage != "refine":
        common.fail("--ckpt is for --stage refine")
    if args.stage == "all" and args.resume:
        common.fail("--stage all does not resume; resume the unfinished stage with its own checkpoint and --stage")


if __name__ == "__main__":
    args = parse_args()
    if args.stage == "all":
        run_all(sys.argv[1:])
    else:
        {"gan": train_gan, "encoder": train_encoder, "refine": train_refine}[args.stage](args)

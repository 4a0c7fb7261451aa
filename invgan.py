"""InvGAN -- a GAN whose discriminator also infers the latent code, trained jointly so that real images invert.

Paper: P. Ghosh, D. Zietlow, M. J. Black, L. S. Davis, X. Hu, "InvGAN: Invertible GANs" (2021), section 3, Eq. 3.
z ~ N(0, I); w = M(z) (a mapping network: 2 layers for DCGAN, 8 for StyleGAN); x = G(w). The discriminator trunk
has two heads, (c, w~) = D(x): the real/fake logit and the inferred code. Half of every generator batch is M(z),
the other half is w_R = D(x_real), so G also renders codes of real images, and G's losses flow back into D through
w_R: the self-supervised signal that teaches D to encode real images. Each term of Eq. 3 is a flag:

    L_GAN   non-saturating GAN loss on x_real vs G([M(z); w_R]) (+ R1 with --r1)       D; G, M
    L_lat   mean ||w - D_w(G(w))||^2 over G's batch [M(z); w_R]                          D; G, M (--latent-in-g)
    L_fm    mean ||f(x_real) - f(G(w_R))||^2, f = D's trunk features (Eq. 2, no VGG)    G, and D through w_R
    L_cyc   mean ||w~ - D_w(G(w~))||^2, w~ = D_w(G(w)): encode the reconstruction again G, M, and D through w_R
    MMD     MMD{M(z), w_R}, multi-bandwidth RBF kernel (common.mmd_rbf)               M, and D through w_R

"mean ||a - b||^2" is the mean over samples and dimensions. In G's step D is a fixed function of the generated
images (its weights get no gradient from them); the only path from G's losses into D's weights is w_R, used only
with --grad-through-wr, and then D's encoder takes its own Adam step on that gradient.

Two readings differ from Eq. 3 as printed, each with a flag for the literal form (measured in docs/invgan.md):
- L_fm pairs each real image with its own reconstruction, mean ||f(x) - f(G(D_w(x)))||^2; Eq. 2 puts the
  expectation inside the norm, ||E_x [f(x) - f(G(D_w(x)))]||^2 (``--fm-form eq2``).
- D learns L_lat, L_cyc, L_fm and MMD in G's step only through w_R (its codes and features of G's images come from a
  frozen copy), while Eq. 3 puts all of them under min_D; ``--min-d-on-fakes`` lets those passes train D too (its
  logit of G's images still trains G only). D's own step learns L_lat on G's batch either way.
Through w_R the adversarial term's share of G's gradient is dropped unless --wr-adv-grad: D's encoder is taught to
infer codes that help G *reproduce* the image (the paper's reading), not codes that help G fool D itself
(docs/invgan.md says why).

The ablation of section 4.4 (Fig. 5), ``--variant``:
    naive      L_GAN + L_lat on fakes only (G's batch is all M(z))
    augmented  + w_R in G's batch (D sees G(w_R) as fakes, L_lat covers w_R too), no gradient into D through w_R
    full       + gradient into D through w_R, + L_fm + L_cyc + MMD  (Eq. 3)
Each ingredient also has its own flag (--real-codes, --grad-through-wr, --lambda-fm, --lambda-cycle, --lambda-mmd),
which overrides the variant's value.

Usage:
    python invgan.py                                       # full model, MNIST 32x32, DCGAN, CPU default
    python invgan.py --variant naive                       # one ablation variant
    python invgan.py --ablation --jobs 2                   # naive / augmented / full at one budget: table + fig5.png
    torchrun --nproc_per_node=2 invgan.py                  # DDP (gloo on CPU, nccl on CUDA); global batch
    python invgan.py --resume runs/<run>/checkpoint.pt     # continue exactly where it stopped
    python eval.py --ckpt runs/<run>/checkpoint.pt --n-fid 500 --fid-kinds sample randrec recon interp  # Table 1
    # the paper's StyleGAN model, on a GPU
    python invgan.py --arch stylegan2 --dataset celeba --resolution 128 --width 512 --latent-dim 512 --w-dim 512 \\
        --n-mapping 8 --batch-size 16 --epochs 50 --eval-every 5000

Everything of a run goes to runs/{run_name}/: metrics.jsonl, samples.png, reconstructions.png (test images,
G(D_w(x)), |difference|), edit_inpaint.png, edit_merge.png, edit_interp.png, edit_deblur.png,
edit_style_mixing_{coarse,middle,fine}.png (--arch stylegan2), checkpoint.pt (rebuilt by eval.py without importing
this file: the encoder is D's latent head and outputs w), summary.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

import common

METHOD = "invgan"
# the ingredients each --variant switches on; a flag given on the command line overrides its variant's value
VARIANTS = {
    "naive": {"real_codes": False, "grad_through_wr": False, "lambda_fm": 0.0, "lambda_cycle": 0.0, "lambda_mmd": 0.0},
    "augmented": {
        "real_codes": True,
        "grad_through_wr": False,
        "lambda_fm": 0.0,
        "lambda_cycle": 0.0,
        "lambda_mmd": 0.0,
    },
    "full": {"real_codes": True, "grad_through_wr": True, "lambda_fm": 1.0, "lambda_cycle": 1.0, "lambda_mmd": 1.0},
}


# ---------------------------------------------------------------------------------------------------------
# Networks (from common.py): G = synthesis(mapping(z)); D(x) -> (logit c, inferred w~), D.features(x) for L_fm
# ---------------------------------------------------------------------------------------------------------
def model_specs(args, img_channels):
    resolution = args.crop or args.resolution  # the networks see tiles when tiling
    if args.arch == "stylegan2":
        g = common.model_spec(
            common.StyleGAN2Generator,
            z_dim=args.latent_dim,
            w_dim=args.w_dim,
            resolution=resolution,
            img_channels=img_channels,
            width=args.width,
            n_mapping=args.n_mapping,
            mapping_lr_mul=args.mapping_lr_mul,
        )
        d = common.model_spec(
            common.StyleGAN2Discriminator,
            resolution=resolution,
            img_channels=img_channels,
            width=args.width,
            latent_dim=args.w_dim,
            head_hidden=args.d_head_hidden or max(args.width, args.w_dim),
        )
    else:
        g = common.model_spec(
            common.DCGANMappingGenerator,
            z_dim=args.latent_dim,
            w_dim=args.w_dim,
            resolution=resolution,
            img_channels=img_channels,
            width=args.width,
            n_mapping=args.n_mapping,
        )
        d = common.model_spec(
            common.DCGANDiscriminator,
            resolution=resolution,
            img_channels=img_channels,
            width=args.width,
            latent_dim=args.w_dim,
            norm="none",
        )
    return {"G": g, "D": d}


def d_all(D, x):
    """One pass of D: (adversarial logit c, inferred code w~, trunk features f)."""
    f = D.features(x)
    c, w = D.heads(f)
    return c, w, f


def latent_loss(w, w_tilde):
    """mean ||w - w~||^2 over samples and dimensions."""
    return (w.float() - w_tilde.float()).square().mean()


def feature_matching_loss(f_real, f_rec, form="paired"):
    """L_fm with the real image and its own reconstruction paired, mean ||f(x) - f(G(D_w(x)))||^2 (the default), or
    Eq. 2 as printed, the expectation inside the norm: ||E_x [f(x) - f(G(D_w(x)))]||^2 ('eq2', a first-moment match
    over the batch that a per-image error can hide in). Both are means over feature dimensions, so one lambda fits."""
    diff = f_real.float() - f_rec.float()
    return (diff.mean(0) if form == "eq2" else diff).square().mean()


def split_sizes(batch, args):
    """(prior codes, real codes) in G's batch: halves with --real-codes, all prior codes without."""
    return (batch - batch // 2, batch // 2) if args.real_codes else (batch, 0)


# ---------------------------------------------------------------------------------------------------------
# One iteration: the D step (L_GAN + L_lat), lazy R1, the G step (everything else, and D's encoder through w_R)
# ---------------------------------------------------------------------------------------------------------
def d_step(G, D, opt_d, x_real, args, r1_weight=0.0, z=None):
    """D: adversarial loss on x_real vs G([M(z); w_R]) + lambda_latent * L_lat on that batch (targets fixed)."""
    device = x_real.device
    n_prior, n_real = split_sizes(len(x_real), args)
    D.requires_grad_(True)
    z = torch.randn(n_prior, args.latent_dim, device=device) if z is None else z
    with torch.no_grad(), common.autocast(device, args.amp):
        w = G.mapping(z)
        if n_real:
            w = torch.cat([w, D(x_real[:n_real])[1].to(w.dtype)])
        x_gen = G.synthesis(w)
    x_real = x_real.detach().requires_grad_(r1_weight > 0)
    with common.autocast(device, args.amp):
        real_logit, _ = D(x_real)
        gen_logit, w_tilde = D(x_gen)
        l_lat = latent_loss(w, w_tilde)
        adv = common.d_adv_loss(args.loss, real_logit.float(), gen_logit.float())
        loss = adv + args.lambda_latent * l_lat
    r1 = common.r1_penalty(real_logit.float(), x_real) if r1_weight > 0 else torch.zeros((), device=device)
    opt_d.zero_grad(set_to_none=True)
    (loss + r1_weight * r1).backward()
    common.sync_gradients(D)
    opt_d.step()
    out = {"losses/D": loss.item(), "losses/D_adv": adv.item(), "losses/L_lat_D": l_lat.item()}
    return {**out, **({"losses/R1": r1.item()} if r1_weight else {})}


def g_losses(G, D, x_real, args, z):
    """G's side of Eq. 3 for one batch: returns (total, {term: value}). D's weights get a gradient only through
    w_R = D_w(x_real[:n_real]), and only with --grad-through-wr; D's features of x_real are a fixed target."""
    n_prior, n_real = len(z), split_sizes(len(x_real), args)[1]
    D_fixed = copy.deepcopy(D).requires_grad_(False)  # D as a fixed function of the generated images
    D_enc = D if args.min_d_on_fakes else D_fixed  # --min-d-on-fakes: Eq. 3's min_D over G's images as well
    with common.autocast(x_real.device, args.amp):
        w = G.mapping(z)
        if n_real:
            with torch.set_grad_enabled(bool(args.grad_through_wr) and torch.is_grad_enabled()):
                _, w_r, f_real = d_all(D, x_real[:n_real])  # the only pass through D's own weights
            w_r, f_real = (w_r if args.grad_through_wr else w_r.detach()), f_real.detach()
            w_all = torch.cat([w, w_r.to(w.dtype)])
        else:
            w_all = w
        x_gen = G.synthesis(w_all)
        gen_logit, w_tilde, f_gen = d_all(D_fixed, x_gen)
        if args.min_d_on_fakes:  # D's codes and features of G's images are live; its logit never trains D here
            _, w_tilde, f_gen = d_all(D, x_gen)
        terms = {"adv": common.g_adv_loss(args.loss, gen_logit.float()), "latent": latent_loss(w_all, w_tilde)}
        total = terms["adv"] + (args.lambda_latent * terms["latent"] if args.latent_in_g else 0.0)
        if args.lambda_cycle > 0:  # encode the reconstruction again: w~ -> G -> D_w -> w~~
            terms["cycle"] = latent_loss(w_tilde, D_enc(G.synthesis(w_tilde))[1])
            total = total + args.lambda_cycle * terms["cycle"]
        if args.lambda_fm > 0:
            terms["fm"] = feature_matching_loss(f_real, f_gen[n_prior:], args.fm_form)
            total = total + args.lambda_fm * terms["fm"]
        if args.lambda_mmd > 0:
            terms["mmd"] = common.mmd_rbf(w.float(), w_r.float())
            total = total + args.lambda_mmd * terms["mmd"]
    return total, terms


def g_step(G, D, opt_g, opt_dr, x_real, args, z=None):
    """G and M minimize their losses; with --grad-through-wr, D's encoder path takes its own Adam step (opt_dr) on
    the gradient the same losses send back through w_R (without the adversarial term's unless --wr-adv-grad)."""
    n_prior, _ = split_sizes(len(x_real), args)
    z = torch.randn(n_prior, args.latent_dim, device=x_real.device) if z is None else z
    total, terms = g_losses(G, D, x_real, args, z)
    opt_g.zero_grad(set_to_none=True)
    opt_dr.zero_grad(set_to_none=True)
    if args.grad_through_wr and not args.wr_adv_grad:
        terms["adv"].backward(retain_graph=True)  # G and M get the adversarial gradient ...
        for p in D.parameters():
            p.grad = None  # ... D's encoder does not
        (total - terms["adv"]).backward()
    else:
        total.backward()
    common.sync_gradients(G, D)
    opt_g.step()
    if args.grad_through_wr:
        opt_dr.step()
    return {"losses/G": total.item(), **{f"losses/L_{k}_G": v.item() for k, v in terms.items()}}


# ---------------------------------------------------------------------------------------------------------
# Inversion, evaluation and figures (G is the EMA generator, in eval mode)
# ---------------------------------------------------------------------------------------------------------
def random_crops(x, size):
    """One random size x size crop per image (offsets from the global RNG, so seeded and resumable)."""
    top, left = (torch.randint(0, x.shape[-1] - size + 1, (len(x),)).tolist() for _ in range(2))
    return torch.stack([img[:, t : t + size, c : c + size] for img, t, c in zip(x, top, left)])


@torch.no_grad()
def encode(D, x, tile=0, batch=250):
    """D's inferred w of each image, (n, w_dim); with ``tile`` (--crop) and images larger than it, the w of each
    tile, inverted independently: (n, tiles, w_dim)."""
    if tile and x.shape[-1] > tile:
        codes = encode(D, common.to_tiles(x, tile), batch=batch)
        return codes.view(len(x), -1, codes.shape[-1])
    return torch.cat([D(chunk)[1].float() for chunk in x.split(batch)])


@torch.no_grad()
def decode(G, w, batch=250):
    """G.synthesis(w) in [-1, 1]; codes of tiles, (n, tiles, w_dim), are synthesized tile by tile and stitched."""
    if w.dim() == 3:
        return common.from_tiles(decode(G, w.flatten(0, 1), batch), math.isqrt(w.shape[1]))
    return torch.cat([G.synthesis(chunk).float().clamp(-1, 1) for chunk in w.split(batch)])


@torch.no_grad()
def reconstruct(G, D, x, tile=0):
    return decode(G, encode(D, x, tile))


@torch.no_grad()
def evaluate(G, D, x_test, args, device):
    """Real: x vs G(D_w(x)) on held-out test images (MAE / MSE per pixel per channel on [-1, 1], PSNR, SSIM);
    fake: G(M(z)) vs G(D_w(G(M(z)))) on fixed z; the latent error and MMD of the inferred codes. Fixed seeds, so
    evaluation never touches the training RNG streams."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 12345)
    z = torch.randn(len(x_test), args.latent_dim, device=device, generator=gen)
    w = torch.cat([G.mapping(c) for c in z.split(250)])
    x_fake = decode(G, w)
    w_fake = encode(D, x_fake)
    x_fake_rec = decode(G, w_fake)
    w_real = encode(D, x_test, args.crop)
    x_rec = decode(G, w_real)
    n = min(len(w), 256)
    border = common.zero_border(args.dataset, x_test.shape[-1])  # the paper's MAE is on 28 x 28 digits
    return {
        "eval/real_mae": common.mae(x_test, x_rec).item(),
        **(
            {"eval/real_mae_28px": common.mae(*(common.unpadded(t, border) for t in (x_test, x_rec))).item()}
            if border
            else {}
        ),
        "eval/real_mse": common.mse(x_test, x_rec).item(),
        "eval/real_psnr": common.psnr(x_test, x_rec).item(),
        "eval/real_ssim": common.ssim(x_test, x_rec).item(),
        "eval/fake_mae": common.mae(x_fake, x_fake_rec).item(),
        "eval/fake_psnr": common.psnr(x_fake, x_fake_rec).item(),
        "eval/fake_latent_mse": latent_loss(w, w_fake).item(),
        "eval/mmd_w_wR": common.mmd_rbf(w[:n], w_real.reshape(-1, w.shape[-1])[:n]).item() if n > 1 else float("nan"),
    }, x_rec


def triples(x, x_rec):
    """Interleave (image, reconstruction, |difference|) as in the paper's Fig. 5; |d| is drawn black = 0."""
    return torch.stack([x, x_rec, (x - x_rec).abs() - 1], 1).flatten(0, 1)


def inpaint_squares(x, frac, generator):
    """x with one randomly placed square (side frac * R) per image set to 0 (zeroed, on the [-1, 1] scale)."""
    n, _, h, w = x.shape
    side = max(1, round(frac * h))
    top = torch.randint(0, h - side + 1, (n,), generator=generator)
    left = torch.randint(0, w - side + 1, (n,), generator=generator)
    out = x.clone()
    for i in range(n):
        out[i, :, top[i] : top[i] + side, left[i] : left[i] + side] = 0.0
    return out


def deblur_codes(G, D, x, strengths=(1.0, 2.0, 3.0), sigma=1.0, tile=0):
    """Section 3.3's de-blurring (Fig. 3): x is shrunk to half size and scaled back up (bicubic), x_up; x_up is
    inverted (w_up), blurred with a Gaussian and inverted again (w_blur); the codes are extrapolated away from the
    blur, w_up + alpha (w_up - w_blur), one per strength alpha. Whole images, or tile by tile with ``tile`` (the
    paper's tiled latent space). Returns x_up, G(w_up) and the extrapolated images."""
    r = x.shape[-1]
    x_up = F.interpolate(
        F.interpolate(x, size=r // 2, mode="bicubic", align_corners=False), size=r, mode="bicubic", align_corners=False
    ).clamp(-1, 1)
    x_blur = TF.gaussian_blur(x_up, kernel_size=2 * math.ceil(2 * sigma) + 1, sigma=sigma)
    w_up, w_blur = encode(D, x_up, tile), encode(D, x_blur, tile)
    return x_up, decode(G, w_up), [decode(G, w_up + alpha * (w_up - w_blur)) for alpha in strengths]


@torch.no_grad()
def save_figures(G, D, x_test, x_rec, args, run_dir, device):
    """samples.png; reconstructions.png (triples: test image, G(D_w(x)), |difference|); the editing grids of
    section 4.2 on held-out test images: inpainting a zeroed square, merging two halves, interpolating two codes; and
    section 3.3's de-blurring by extrapolation in w."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 999)
    z = torch.randn(64, args.latent_dim, device=device, generator=gen)
    common.save_image_grid(decode(G, G.mapping(z)), os.path.join(run_dir, "samples.png"), nrow=8)
    k = min(12, len(x_test))
    common.save_image_grid(triples(x_test[:k], x_rec[:k]), os.path.join(run_dir, "reconstructions.png"), nrow=12)
    n = min(args.edit_images, len(x_test) // 2)
    if n < 1:
        return
    a, b = x_test[:n], x_test[n : 2 * n]
    # inpainting: columns = original, zeroed square, reconstruction of the zeroed image
    holed = inpaint_squares(a.cpu(), args.inpaint_size, torch.Generator().manual_seed(args.seed + 4)).to(device)
    grid = torch.stack([a, holed, reconstruct(G, D, holed, args.crop)], 1).flatten(0, 1)
    common.save_image_grid(grid, os.path.join(run_dir, "edit_inpaint.png"), nrow=6)
    # merging: columns = image A, image B, left half of A + right half of B, its reconstruction
    half = a.shape[-1] // 2
    merged = torch.cat([a[..., :half], b[..., half:]], -1)
    grid = torch.stack([a, b, merged, reconstruct(G, D, merged, args.crop)], 1).flatten(0, 1)
    common.save_image_grid(grid, os.path.join(run_dir, "edit_merge.png"), nrow=8)
    # interpolation: A, G((1 - t) w_A + t w_B) for t in [0, 1], B
    wa, wb = encode(D, a, args.crop), encode(D, b, args.crop)
    ts = torch.linspace(0, 1, 8, device=device)
    strip = [a] + [decode(G, wa * (1 - t) + wb * t) for t in ts] + [b]
    common.save_image_grid(torch.stack(strip, 1).flatten(0, 1), os.path.join(run_dir, "edit_interp.png"), nrow=10)
    # de-blurring: original, its low-resolution version, that version's reconstruction, three extrapolation strengths
    x_low, x_low_rec, sharper = deblur_codes(G, D, a, tile=args.crop)
    grid = torch.stack([a, x_low, x_low_rec, *sharper], 1).flatten(0, 1)
    common.save_image_grid(grid, os.path.join(run_dir, "edit_deblur.png"), nrow=6)
    # style mixing (StyleGAN2, whole images): coarse / middle / fine layers of w from a source image's code
    if args.arch == "stylegan2" and not args.crop and len(x_test) >= 10:
        w_src, w_dst = encode(D, x_test[:5]), encode(D, x_test[5:10])
        for group, tiles in common.style_mixing_grids(G, w_src, w_dst).items():
            common.save_image_grid(tiles, os.path.join(run_dir, f"edit_style_mixing_{group}.png"), nrow=6)


def load_networks(path, device="cpu"):
    """(G_ema, D, args) of an invgan checkpoint, rebuilt from the contract alone (as eval.py does)."""
    ckpt = common.load_method_checkpoint(path, METHOD)
    G = common.build_from_spec(ckpt["model_specs"]["G"])
    common.load_state_strict(G, ckpt["state_dicts"]["G_ema"], "the EMA generator", path)
    D = common.build_from_spec(ckpt["model_specs"]["D"])
    common.load_state_strict(D, ckpt["state_dicts"]["D"], "the discriminator", path)
    return G.to(device).eval(), D.to(device).eval(), ckpt["args"]


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
def train(args):
    run = common.Run(args, METHOD, test_split=args.eval_images, batch_divisor=2)  # each rank: prior + real codes
    device, bs, x_test = run.device, args.batch_size, run.x_test
    specs = model_specs(args, run.img_channels)
    G, D = common.build(specs["G"], device), common.build(specs["D"], device)
    G_ema = common.EMA(G, half_life_kimg=args.ema_kimg, rampup=args.ema_rampup)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=args.betas)
    d_lr, d_betas = common.lazy_regularization_adam(args.lr, args.betas, args.r1_interval if args.r1 > 0 else 1)
    plain = args.arch == "stylegan2" and args.d_lr_mode == "plain"
    opt_d = torch.optim.Adam(common.unequalized_lr_groups(D, d_lr) if plain else D.parameters(), lr=d_lr, betas=d_betas)
    # D's own step on the gradient G's losses send through w_R
    opt_dr = torch.optim.Adam(
        common.unequalized_lr_groups(D, args.lr) if plain else D.parameters(), lr=args.lr, betas=args.betas
    )
    run.restore({"G": G, "D": D, "G_ema": G_ema.model}, {"G": opt_g, "D": opt_d, "D_through_wR": opt_dr})
    on = [k for k in ("real_codes", "grad_through_wr", "latent_in_g") if getattr(args, k)]
    run.banner(
        f"{args.dataset} {args.resolution}px | {args.arch} width {args.width} | z {args.latent_dim} w "
        f"{args.w_dim} | variant {args.variant} ({', '.join(on) or 'no real codes'}; lambda lat "
        f"{args.lambda_latent} fm {args.lambda_fm} cyc {args.lambda_cycle} mmd {args.lambda_mmd})"
    )

    metrics = {}
    for _, x_real in run.batches():
        if args.crop:  # tiling: one random crop per image; the networks never see a whole image
            x_real = random_crops(x_real, args.crop)
        do_r1 = args.r1 > 0 and run.step % args.r1_interval == 0
        scalars = d_step(G, D, opt_d, x_real, args, r1_weight=args.r1 if do_r1 and args.r1_interval == 1 else 0)
        if do_r1 and args.r1_interval > 1:
            scalars.update(common.r1_step(D, opt_d, x_real, args.r1 * args.r1_interval, args.amp))
        scalars.update(g_step(G, D, opt_g, opt_dr, x_real, args))
        step = run.step_done(
            scalars, show=("losses/D", "losses/G", "losses/L_lat_D", "losses/L_fm_G", "losses/L_cycle_G")
        )
        G_ema.update(G, step * bs, bs)

        if run.due("eval") or run.due("save"):
            common.recalibrate_generator(G_ema.model, args.latent_dim, 0, device)
        if run.due("eval"):
            D.eval()
            metrics, x_rec = evaluate(G_ema.model, D, x_test, args, device)
            run.log({**metrics, "charts/ema_decay": G_ema.decay(step * bs, bs)})
            if run.is_main:
                save_figures(G_ema.model, D, x_test, x_rec, args, run.run_dir, device)
                print(
                    f"  eval @ {step}: test MAE {metrics['eval/real_mae']:.4f} MSE {metrics['eval/real_mse']:.4f} "
                    f"PSNR {metrics['eval/real_psnr']:.2f} SSIM {metrics['eval/real_ssim']:.3f} | fake PSNR "
                    f"{metrics['eval/fake_psnr']:.2f} | latent MSE {metrics['eval/fake_latent_mse']:.4f} | "
                    f"MMD(w, w_R) {metrics['eval/mmd_w_wR']:.4f}",
                    flush=True,
                )
            D.train()
        if run.due("save"):
            run.save(
                model_specs=specs,
                inversion={
                    "generator": "G_ema",
                    "encoder": "D",
                    "encoder_output": "latent_head",
                    "encoder_space": "w",
                    "latent_scale": None,
                    "latent_dist": "normal",
                },
            )
    return run.finish(metrics)


# ---------------------------------------------------------------------------------------------------------
# The ablation of section 4.4 / Fig. 5: naive, augmented, full at one budget
# ---------------------------------------------------------------------------------------------------------
INGREDIENT_FLAGS = ("--real-codes", "--no-real-codes", "--grad-through-wr", "--no-grad-through-wr")
INGREDIENT_VALUED = ("--variant", "--lambda-fm", "--lambda-cycle", "--lambda-mmd")


def ablation_plan(args, argv):
    """The three variants at the settings of ``argv`` (ingredient flags dropped: the variants set them); runs are
    named by a digest of those settings, so an ablation with other settings never reuses these."""
    slug = args.dataset.replace(":", "_").replace("/", "_")
    return common.ablation_plan(
        os.path.abspath(__file__),
        parse_args,
        argv,
        {v: ["--variant", v] for v in VARIANTS},
        f"ablation__invgan__{slug}__{args.seed}",
        variant_flags=INGREDIENT_FLAGS,
        variant_valued=INGREDIENT_VALUED,
        variant_keys=("variant", *VARIANTS["full"]),
    )


def run_ablation(args, argv):
    run_dirs, out_dir, _ = common.ablation(ablation_plan(args, argv), jobs=args.jobs)
    write_ablation_report(run_dirs, out_dir)


@torch.no_grad()
def write_ablation_report(run_dirs, out_dir, n_grid=12):
    """table.md / table.json (test MAE, MSE, PSNR, SSIM, LPIPS of each final checkpoint on the same held-out images)
    and fig5.png (per variant: test image, reconstruction, |difference| in groups of three)."""
    device = torch.device("cpu")
    results, panels, recorded = {}, [], None
    try:
        lpips = common.LPIPS().eval()
    except SystemExit as e:  # the LPIPS weights come with setup.sh; the rest of the table does not need them
        print(f"[ablation] no LPIPS ({e})", flush=True)
        lpips = None
    for label, run_dir in run_dirs.items():
        G, D, recorded = load_networks(os.path.join(run_dir, "checkpoint.pt"), device)
        x = common.test_images(
            recorded["dataset"], recorded["resolution"], recorded["eval_images"], device, recorded["data_root"]
        )
        x_rec = reconstruct(G, D, x, recorded.get("crop", 0))
        border = common.zero_border(recorded["dataset"], x.shape[-1])
        row = {
            "mae": common.mae(x, x_rec).item(),
            **(
                {"mae_28px": common.mae(common.unpadded(x, border), common.unpadded(x_rec, border)).item()}
                if border
                else {}
            ),
            "mse": common.mse(x, x_rec).item(),
            "psnr": common.psnr(x, x_rec).item(),
            "ssim": common.ssim(x, x_rec).item(),
            "n": len(x),
        }
        if lpips is not None:
            row["lpips"] = torch.cat([lpips(a, b) for a, b in zip(x.split(100), x_rec.split(100))]).mean().item()
        with open(os.path.join(run_dir, "summary.json")) as f:
            row["wall_s"] = json.load(f)["wall_s"]
        results[label] = row
        panels.append((label, common.image_grid(triples(x[:n_grid], x_rec[:n_grid]), nrow=6)))
    a = argparse.Namespace(**recorded)
    budget = f"{a.epochs} epochs" if a.epochs else f"{a.images // a.batch_size} steps"
    title = (
        f"{a.dataset} {a.resolution}px, {a.arch} width {a.width}, z {a.latent_dim}, w {a.w_dim}, {budget} of "
        f"{a.batch_size}; test reconstruction G(D_w(x)) of the first {results[label]['n']} test images (MAE / "
        "MSE per pixel per channel on [-1, 1], PSNR / SSIM with data range 2, LPIPS-VGG v0.1)"
    )
    cells = {
        label: {
            "MAE": f"{r['mae']:.4f}",
            **({"MAE 28px": f"{r['mae_28px']:.4f}"} if "mae_28px" in r else {}),
            "MSE": f"{r['mse']:.4f}",
            "PSNR": f"{r['psnr']:.2f}",
            "SSIM": f"{r['ssim']:.3f}",
            "LPIPS": f"{r['lpips']:.4f}" if "lpips" in r else "--",
            "wall s": f"{r['wall_s']:.0f}",
        }
        for label, r in results.items()
    }
    common.write_ablation_table(out_dir, title, cells, results)
    common.labelled_panels(panels, os.path.join(out_dir, "fig5.png"))
    print(f"[ablation] wrote {out_dir}/table.md, table.json and fig5.png")


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = common.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_run_arguments(p, "invgan", images=64_000, eval_every=500, log_every=50, amp=True)
    # model
    p.add_argument(
        "--arch",
        default="dcgan",
        choices=["dcgan", "stylegan2"],
        help="DCGAN with a mapping network (CPU default; the paper's MNIST model) or StyleGAN2-lite",
    )
    p.add_argument("--width", type=int, default=32, help="feature maps (DCGAN: of the last layer; StyleGAN2: max)")
    p.add_argument("--latent-dim", type=int, default=64, help="dimension of z ~ N(0, I)")
    p.add_argument("--w-dim", type=int, default=64, help="dimension of w = M(z), the space D's latent head infers")
    p.add_argument("--n-mapping", type=int, default=2, help="mapping layers (paper: 2 for DCGAN, 8 for StyleGAN)")
    p.add_argument("--mapping-lr-mul", type=float, default=0.01, help="StyleGAN2 only: lr multiplier of the mapper")
    p.add_argument(
        "--d-head-hidden",
        type=int,
        default=0,
        help="StyleGAN2 D: width of the dense layer before the heads (0: max(feature maps, w-dim))",
    )
    p.add_argument(
        "--d-lr-mode",
        default="equalized",
        choices=["equalized", "plain"],
        help="StyleGAN2 D under Adam: equalized lr (StyleGAN2's), or plain steps as an nn layer would take",
    )
    # the method
    p.add_argument(
        "--variant",
        default="full",
        choices=list(VARIANTS),
        help="section 4.4: naive (GAN + latent loss on fakes), augmented (+ w_R in G's batch), full (Eq. 3)",
    )
    p.add_argument(
        "--real-codes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="half of G's batch is w_R = D_w(x_real) (default: from --variant)",
    )
    p.add_argument(
        "--grad-through-wr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="G's losses reach D's weights through w_R (default: from --variant)",
    )
    p.add_argument(
        "--wr-adv-grad",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="with --grad-through-wr, G's adversarial loss on G(w_R) reaches D too (off: only L_lat, L_fm, L_cyc, MMD)",
    )
    p.add_argument(
        "--lambda-latent",
        type=float,
        default=1.0,
        help="weight of L_lat, a mean over dimensions (--lambda-latent <w-dim> gives Eq. 3's squared norm)",
    )
    p.add_argument(
        "--latent-in-g",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="L_lat is minimized by G and M too, not only by D (Eq. 3)",
    )
    p.add_argument("--lambda-fm", type=float, default=None, help="weight of L_fm (default: from --variant)")
    p.add_argument("--lambda-cycle", type=float, default=None, help="weight of L_cyc (default: from --variant)")
    p.add_argument("--lambda-mmd", type=float, default=None, help="weight of MMD{w, w_R} (default: from --variant)")
    p.add_argument(
        "--fm-form",
        default="paired",
        choices=["paired", "eq2"],
        help="L_fm per (image, reconstruction) pair, or Eq. 2 as printed: the batch mean inside the norm",
    )
    p.add_argument(
        "--min-d-on-fakes",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Eq. 3 literally: G-step terms also train D through its codes and features of G's images (needs "
        "--grad-through-wr); off: only through w_R",
    )
    # optimization
    p.add_argument("--loss", default="logistic", choices=common.GAN_LOSSES, help="adversarial loss (paper: NSGAN)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (split over DDP ranks)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (G, M, D)")
    p.add_argument("--betas", type=float, nargs=2, default=[0.0, 0.99], help="Adam betas")
    p.add_argument("--r1", type=float, default=10.0, help="R1 weight (0: off)")
    p.add_argument("--r1-interval", type=int, default=4, help="lazy R1 every k steps (1 = every step)")
    p.add_argument("--ema-kimg", type=float, default=10.0, help="half-life of the EMA generator in thousands of images")
    p.add_argument(
        "--ema-rampup", type=float, default=0.05, help="EMA half-life capped at this fraction of images seen"
    )
    # evaluation, figures and saving
    p.add_argument("--edit-images", type=int, default=8, help="rows of the editing grids")
    p.add_argument(
        "--crop",
        type=int,
        default=0,
        help="tiling (section 3.3): train G and D on random M x M crops of the images (0: whole images); "
        "every real image is then inverted as (R / M)^2 independently inverted tiles",
    )
    p.add_argument(
        "--inpaint-size", type=float, default=0.375, help="side of the zeroed square, as a fraction of the image"
    )
    # ablation driver
    p.add_argument("--ablation", action="store_true", help="train naive / augmented / full at these settings: table")
    p.add_argument("--jobs", type=int, default=1, help="ablation runs at once (CPU threads are split between them)")
    return common.parse_run_args(p, argv, validate_args, METHOD)


def validate_args(args):
    """Every flag checked before anything is read or created; the variant's values fill the ingredient flags."""
    for key, value in VARIANTS[args.variant].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    common.check_args(
        args,
        positive=(
            "latent_dim",
            "w_dim",
            "width",
            "batch_size",
            "lr",
            "mapping_lr_mul",
            "r1_interval",
            "ema_kimg",
            "eval_every",
            "eval_images",
            "edit_images",
            "save_every",
            "log_every",
            "jobs",
        ),
        nonnegative=(
            "n_mapping",
            "lambda_latent",
            "lambda_fm",
            "lambda_cycle",
            "lambda_mmd",
            "r1",
            "epochs",
            "images",
            "workers",
            "ema_rampup",
            "d_head_hidden",
        ),
        fraction=("betas", "inpaint_size"),
    )
    common.check_resolution(args.resolution, minimum=16)  # SSIM's 11 x 11 window
    if args.crop and (args.crop >= args.resolution or args.resolution % args.crop or args.crop < 8):
        common.fail(
            f"--crop {args.crop} must be a power of two >= 8 dividing --resolution {args.resolution} and "
            "smaller than it (e.g. --crop 16 for 32 x 32 images), or 0 for whole images"
        )
    if args.crop:
        common.check_resolution(args.crop, minimum=8)
    if args.batch_size < 4 or args.batch_size % 2:
        common.fail(f"--batch-size must be even and at least 4 (two halves of >= 2 for MMD), got {args.batch_size}")
    if args.epochs == 0 and args.images < args.batch_size:
        common.fail(f"--images {args.images} is less than one batch of {args.batch_size}: nothing would be trained")
    if args.n_mapping == 0 and args.latent_dim != args.w_dim:
        common.fail(f"--n-mapping 0 means w = z: pass --w-dim {args.latent_dim} (the --latent-dim)")
    if not args.real_codes:
        for flag, on in (
            ("--grad-through-wr", args.grad_through_wr),
            ("--lambda-fm", args.lambda_fm > 0),
            ("--lambda-mmd", args.lambda_mmd > 0),
        ):
            if on:
                common.fail(f"{flag} needs the real codes w_R in G's batch; add --real-codes or drop {flag}")
    if args.inpaint_size <= 0:
        common.fail(f"--inpaint-size must be in (0, 1) (got {args.inpaint_size})")
    if args.min_d_on_fakes and not args.grad_through_wr:
        common.fail("--min-d-on-fakes trains D in G's step, which only --grad-through-wr does; add it or drop the flag")


if __name__ == "__main__":
    args = parse_args()
    if args.ablation:
        run_ablation(args, sys.argv[1:])
    else:
        train(args)

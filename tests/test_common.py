"""Unit tests of common.py, each against an independent reference (skimage, numpy, hand-computed values,
published dataset statistics, a grouped-conv reference)."""

import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import free_port

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("res", [32, 64])
def test_block_shapes(res):
    torch.manual_seed(0)
    z = torch.randn(3, 16)
    cases = [
        (
            common.StyleGAN2Generator(16, 24, res, 3, width=16, n_mapping=2),
            common.StyleGAN2Discriminator(res, 3, 16, latent_dim=16),
        ),
        (common.DCGANGenerator(16, res, 1, width=8), common.DCGANDiscriminator(res, 1, 8, latent_dim=16, norm="bn")),
        (common.ProGANGenerator(16, res, 3, width=16), common.ProGANDiscriminator(res, 3, 16, latent_dim=16)),
    ]
    for G, D in cases:
        x = G(z)
        assert x.shape == (3, G.img_channels, res, res)
        logit, z_hat = D(x)
        assert logit.shape == (3,) and z_hat.shape == (3, 16)
        assert D.features(x).shape == (3, D.feature_dim)
    assert common.ResNetEncoder(res, 4, 10, width=16)(torch.randn(2, 4, res, res)).shape == (2, 10)
    G = cases[0][0]
    assert G.synthesis(torch.randn(3, G.num_ws, 24)).shape == (3, 3, res, res)  # W+ input


def test_discriminator_without_latent_head():
    logit, z_hat = common.StyleGAN2Discriminator(32, 1, 8)(torch.randn(2, 1, 32, 32))
    assert logit.shape == (2,) and z_hat is None


def test_modulated_conv_equals_grouped_reference():
    """The activation-modulated conv must equal StyleGAN2's per-sample weight modulation + demodulation."""
    torch.manual_seed(0)
    for upsample in (False, True):
        conv = common.ModulatedConv2d(6, 5, 3, w_dim=7, upsample=upsample)
        x, w = torch.randn(4, 6, 8, 8), torch.randn(4, 7)
        style = conv.affine(w)
        weight = conv.scale * conv.weight * style.view(4, 1, 6, 1, 1)
        weight = weight * torch.rsqrt(weight.square().sum([2, 3, 4], keepdim=True) + 1e-8)
        xi = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False) if upsample else x
        ref = F.conv2d(xi.reshape(1, -1, *xi.shape[2:]), weight.view(-1, 6, 3, 3), padding=1, groups=4)
        assert torch.allclose(conv(x, w), ref.view(4, 5, *xi.shape[2:]), atol=1e-5)


def test_equalized_linear_scale():
    torch.manual_seed(0)
    lin = common.EqualLinear(400, 300)
    assert abs(lin(torch.randn(2000, 400)).std().item() - 1.0) < 0.05  # unit-variance output at init


def test_style_mixing_grids_take_each_third_of_the_layers_from_the_source():
    """Layout (blank corner, G(w_dst) across, G(w_src) down) and cell (i, j) = G of w_dst[j] with the group's layers
    set to w_src[i], 4x4 layers first; the three groups partition the layers, so mixing all three gives G(w_src)."""
    torch.manual_seed(0)
    G = common.StyleGAN2Generator(z_dim=8, w_dim=8, resolution=16, img_channels=1, width=8, n_mapping=1).eval()
    w_src, w_dst = torch.randn(2, 8), torch.randn(3, 8)
    grids = common.style_mixing_grids(G, w_src, w_dst)
    n_ws = G.num_ws  # 8 at 16px: coarse 0-1, middle 2-4, fine 5-7
    expect = {"coarse": [0, 1], "middle": [2, 3, 4], "fine": [5, 6, 7]}
    assert list(grids) == list(expect) and n_ws == 8
    all_layers = w_dst[:, None].repeat(1, n_ws, 1)
    for group, tiles in grids.items():
        tiles = tiles.view(3, 4, 1, 16, 16)
        assert (tiles[0, 0] == -1).all()
        assert torch.allclose(tiles[0, 1:], G.synthesis(w_dst).clamp(-1, 1), atol=1e-6)
        assert torch.allclose(tiles[1:, 0], G.synthesis(w_src).clamp(-1, 1), atol=1e-6)
        i, j = 1, 2
        ws = w_dst[j].repeat(n_ws, 1)
        ws[expect[group]] = w_src[i]
        mixed = tiles[1 + i, 1 + j]
        assert torch.allclose(mixed, G.synthesis(ws[None]).clamp(-1, 1)[0], atol=1e-6)
        assert (mixed - tiles[0, 1 + j]).abs().max() > 1e-3 and (mixed - tiles[1 + i, 0]).abs().max() > 1e-3
        all_layers[:, expect[group]] = w_src[i]
    assert torch.allclose(G.synthesis(all_layers).clamp(-1, 1), G.synthesis(w_src[i : i + 1]).clamp(-1, 1), atol=1e-6)


# ------------------------------------------------------------------------------------------------- coupling
@pytest.mark.parametrize("kind", ["additive", "affine"])
def test_coupling_inverse_and_bijective(kind):
    torch.manual_seed(0)
    flow = common.InvertibleMapping(16, n_steps=4, hidden=32, kind=kind)
    for step in flow.steps:  # a non-trivial map: the output layers start at zero (identity)
        torch.nn.init.normal_(step.net[-1].weight, std=0.15)
        torch.nn.init.normal_(step.net[-1].bias, std=0.15)
    x = torch.randn(256, 16)
    y = flow(x)
    assert (y - x.flip(1)).abs().max() > 0.1
    assert (flow.inverse(y) - x).abs().max() < 1e-5  # float32
    assert (flow(flow.inverse(x)) - x).abs().max() < 1e-5
    assert torch.cdist(y, y).add(torch.eye(256)).min() > 1e-4  # distinct inputs stay distinct
    # exact up to rounding even for a strongly non-linear map (affine scales far from 1): float64
    flow = flow.double()
    for step in flow.steps:
        torch.nn.init.normal_(step.net[-1].weight, std=0.3)  # affine scales down to ~0.01
    x = x.double()
    assert (flow.inverse(flow(x)) - x).abs().max() < 1e-10


def test_coupling_reverses_order_and_starts_as_identity():
    layer = common.CouplingLayer(4)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(layer(x), x.flip(1))  # zero-initialized f: only the order reversal
    with pytest.raises(SystemExit):
        common.CouplingLayer(5)


# ------------------------------------------------------------------------------------------------- losses
def test_gan_losses_hand_values():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])
    sp = lambda t: math.log1p(math.exp(t))  # noqa: E731
    assert common.d_adv_loss("logistic", real, fake).item() == pytest.approx(
        (sp(0) + sp(-1)) / 2 + (sp(0) + sp(-2)) / 2
    )
    assert common.g_adv_loss("logistic", fake).item() == pytest.approx((sp(0) + sp(1)) / 2)
    assert common.d_adv_loss("wgan", real, fake).item() == pytest.approx(-0.5 - 1.0)
    assert common.d_adv_loss("hinge", real, fake).item() == pytest.approx((1 + 0) / 2 + (1 + 0) / 2)
    assert common.g_adv_loss("hinge", fake).item() == pytest.approx(0.5)
    with pytest.raises(SystemExit):
        common.d_adv_loss("nope", real, fake)


def test_r1_hand_computed():
    """D(x) = sum(a * x^2) per image: grad = 2 a x, so E||grad||^2 = mean_i sum 4 a^2 x_i^2."""
    torch.manual_seed(0)
    a = torch.randn(1, 2, 3, 3)
    x = torch.randn(5, 2, 3, 3, requires_grad=True)
    logit = (a * x**2).flatten(1).sum(1)
    expected = (4 * a**2 * x.detach() ** 2).flatten(1).sum(1).mean()
    assert torch.allclose(common.r1_penalty(logit, x), expected, rtol=1e-6)


def test_r1_matches_autograd_reference_on_network():
    torch.manual_seed(0)
    D = common.StyleGAN2Discriminator(8, 1, 8)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    ref = sum(torch.autograd.grad(D(x[i : i + 1])[0].sum(), x)[0][i].square().sum() for i in range(3)) / 3
    assert torch.allclose(common.r1_penalty(D(x)[0], x), ref, rtol=1e-5)


def _mmd_numpy(x, y, bandwidths):
    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-d2 / (2 * s * s)) for s in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()


def test_mmd_against_numpy_and_behaviour():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g, dtype=torch.float64), torch.randn(200, 8, generator=g, dtype=torch.float64)
    bw = [0.5, 2.0, 5.0]
    assert common.mmd_rbf(x, y, bw).item() == pytest.approx(_mmd_numpy(x.numpy(), y.numpy(), bw), abs=1e-10)
    assert abs(common.mmd_rbf(x, y).item()) < 0.02  # same distribution: ~0 (unbiased, can be slightly < 0)
    assert common.mmd_rbf(x, y + 1.0).item() > 0.2  # shifted: clearly > 0
    assert common.mmd_rbf(x, y + 1.0).item() > 10 * abs(common.mmd_rbf(x, y).item())


# ------------------------------------------------------------------------------------------------- metrics
def test_psnr_mse_mae_hand_values():
    x, y = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.2)
    assert common.mse(x, y).item() == pytest.approx(0.04)
    assert common.mae(x, y).item() == pytest.approx(0.2)
    assert common.psnr(x, y).item() == pytest.approx(20.0, abs=1e-5)  # 10 log10(4 / 0.04)
    y2 = torch.cat([torch.full((1, 1, 4, 4), 0.2), torch.full((1, 1, 4, 4), 0.02)])
    assert common.psnr(x, y2).item() == pytest.approx((20.0 + 40.0) / 2, abs=1e-4)  # per-image mean


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_skimage(channels):
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(channels)
    x = torch.rand(3, channels, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, channels, 32, 32, generator=g)).clamp(-1, 1)  # correlated: SSIM well above 0
    ref = np.mean(
        [
            structural_similarity(
                x[i].numpy(),
                y[i].numpy(),
                data_range=2.0,
                channel_axis=0,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for i in range(3)
        ]
    )
    assert common.ssim(x, y).item() == pytest.approx(ref, abs=1e-4)
    assert ref > 0.3
    assert common.ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)


def test_vgg_perceptual_real_weights():
    loss = common.VGGPerceptualLoss()
    first = loss.vgg.features[0].weight
    assert first.shape == (64, 3, 3, 3) and first.abs().mean() > 0.05  # converted ImageNet conv1_1, not zeros
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    noisy = (x + 0.05 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)
    other = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert loss(x, x).item() == 0.0
    assert 0 < loss(x, noisy).item() < loss(x, other).item()
    assert loss(x[:, :1], x[:, :1]).item() == 0.0  # grayscale input is repeated to 3 channels
    assert not any(p.requires_grad for p in loss.parameters())


def test_vgg_missing_weights_error(tmp_path):
    with pytest.raises(SystemExit, match="setup.sh"):
        common.VGG16Features(weights_path=str(tmp_path / "missing.pt"))


# ------------------------------------------------------------------------------------------------- data
def test_mnist_loader_real_data():
    train, test = common.build_dataset("mnist", 32, True), common.build_dataset("mnist", 32, False)
    assert len(train) == 60000 and len(test) == 10000
    x, label = train[0]
    assert x.shape == (1, 32, 32) and label == 5  # the first MNIST training digit is a 5
    assert x.min() == -1 and x.max() == 1
    assert (x[:, :2] == -1).all() and (x[:, :, -2:] == -1).all()  # 28 -> 32 by zero padding
    center = (train.images[:, :, 2:30, 2:30].float() / 255).mean().item()
    assert center == pytest.approx(0.1307, abs=5e-4)  # the published MNIST pixel mean
    assert common.build_dataset("mnist", 64, False)[0][0].shape == (1, 64, 64)


def test_fashion_mnist_loader_real_data():
    test = common.build_dataset("fashion-mnist", 32, False)
    assert len(test) == 10000
    train = common.build_dataset("fashion-mnist", 32, True)
    assert (train.images[:, :, 2:30, 2:30].float() / 255).mean().item() == pytest.approx(0.2860, abs=5e-4)
    assert np.bincount(train.labels.numpy()).tolist() == [6000] * 10


def _write_folder(root, n_per_class=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        os.makedirs(root / cls, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "cats" / "corrupt.png").write_bytes(b"this is not a png")
    (root / "dogs" / "notes.txt").write_text("not an image")


def test_folder_loader(tmp_path):
    _write_folder(tmp_path)
    train = common.build_dataset(f"folder:{tmp_path}", 16, True)
    test = common.build_dataset(f"folder:{tmp_path}", 16, False, channels=3)
    assert train.skipped == 2  # the corrupt png and the txt file
    assert len(train) + len(test) == 24 and not set(train.files) & set(test.files)
    assert test.files == common.build_dataset(f"folder:{tmp_path}", 16, False).files  # deterministic split
    x, label = train[0]
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1 and label in (0, 1)
    assert sorted(train.class_to_idx) == ["cats", "dogs"]
    gray = common.build_dataset(f"folder:{tmp_path}", 16, True, channels=1)
    assert gray[0][0].shape == (1, 16, 16)


def test_bad_data_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"\x00\x01garbage")
    for name, pattern in [
        (f"folder:{tmp_path}/empty", "no readable images"),
        (f"folder:{tmp_path}/bad", r"no readable images .*1 files skipped"),
        (f"folder:{tmp_path}/missing", "does not exist"),
        ("imagenet", "unknown dataset"),
    ]:
        with pytest.raises(SystemExit, match=pattern):
            common.build_dataset(name, 32)
    with pytest.raises(SystemExit, match="power of two"):
        common.build_dataset("mnist", 30)


def test_folder_skips_truncated_jpeg_and_scales_16_bit_png(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(common, "CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.RandomState(0)
    for i in range(12):
        Image.fromarray(rng.randint(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"ok{i}.jpg", quality=95)
    full = (root / "ok0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])  # passes PIL's verify(), fails when decoded
    with Image.open(root / "truncated.jpg") as im:
        im.verify()
    ramp = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257  # 16-bit gray, 0 .. 65535
    Image.fromarray(ramp).save(root / "deep.png")
    with Image.open(root / "deep.png") as im:
        assert im.mode.startswith("I")
    ds = common.build_dataset(f"folder:{root}", 16, True, channels=1)
    assert "truncated.jpg" in ds.skipped_files and ds.skipped == 1
    everything = ds.files + common.build_dataset(f"folder:{root}", 16, False, channels=1).files
    assert len(everything) == 13
    x = common.pil_to_tensor(Image.open(root / "deep.png"), "L", 16)
    expected = torch.from_numpy(np.round(ramp / 257.0)).float().div(127.5).sub(1)  # 16 -> 8 bits, not clipped
    assert torch.allclose(x[0], expected, atol=1e-6)
    for i, _ in enumerate(everything):  # nothing left to crash a DataLoader later
        common.ImageFolderFlat.__getitem__(ds, i % len(ds))
    # the verdicts are cached: a second scan decodes nothing (all files unchanged)
    monkeypatch.setattr(common, "decodable_image", lambda path: pytest.fail(f"decoded {path} again"))
    assert common.build_dataset(f"folder:{root}", 16, True, channels=1).files == ds.files


def test_failed_download_leaves_nothing_in_data_root(tmp_path, monkeypatch):
    import torchvision

    class Offline(torchvision.datasets.MNIST):
        def download(self):  # what torchvision does offline: create raw/, then fail to fetch
            os.makedirs(self.raw_folder, exist_ok=True)
            raise RuntimeError("network unreachable")

    monkeypatch.setattr(common, "DATA_DIR", str(tmp_path / "empty_cache"))
    root = tmp_path / "data"
    with pytest.raises(SystemExit, match="could not be downloaded"):
        common._torchvision_dataset(Offline, "mnist", str(root), train=True)
    assert not root.exists()
    root.mkdir()
    (root / "mine.txt").write_text("kept")
    with pytest.raises(SystemExit):
        common._torchvision_dataset(Offline, "mnist", str(root), train=True)
    assert os.listdir(root) == ["mine.txt"]


def test_run_directory_rules(tmp_path, monkeypatch):
    from argparse import Namespace

    monkeypatch.chdir(tmp_path)
    args = Namespace(run_name="a", dataset="mnist", exp_name="x", seed=1, resume=None)
    first = common.claim_run_dir(args, {"args": {}})
    assert first.path == os.path.join("runs", "a") and os.path.isfile("runs/a/run.json")
    first.release()
    with pytest.raises(SystemExit, match="already holds files; pass --resume runs/a/checkpoint.pt"):
        common.run_dir_of(args)
    # resuming continues in the checkpoint's own directory, wherever it is, never in runs/<same name>
    (tmp_path / "elsewhere/a").mkdir(parents=True)
    resumed = Namespace(run_name=None, dataset="mnist", exp_name="x", seed=1, resume="elsewhere/a/checkpoint.pt")
    assert common.run_dir_of(resumed) == str(tmp_path / "elsewhere/a")
    with pytest.raises(SystemExit, match="name different directories"):
        common.run_dir_of(Namespace(**{**vars(resumed), "run_name": "a"}))
    with pytest.raises(SystemExit, match="plain directory name"):
        common.run_dir_of(Namespace(**{**vars(args), "run_name": "../escape"}))
    with pytest.raises(SystemExit, match="already holds files; pass another --run-name"):
        common.run_dir_of(Namespace(run_name="a", dataset="mnist", exp_name="eval", seed=0))  # eval.py: no --resume
    os.chdir(tmp_path / "elsewhere")
    (tmp_path / "elsewhere/runs").write_text("a file where the runs folder should be")
    with pytest.raises(SystemExit, match="exists and is not a directory"):
        common.run_dir_of(args)


def test_strip_flags():
    argv = ["--ablation", "--dist", "normal", "--jobs", "2", "--dg", "--run-name=x", "--seed", "3"]
    assert common.strip_flags(argv, ("--ablation", "--dg"), ("--jobs", "--run-name")) == [
        "--dist",
        "normal",
        "--seed",
        "3",
    ]


def test_resumable_sampler_continues_the_epoch():
    ds = torch.utils.data.TensorDataset(torch.arange(40).float(), torch.zeros(40))
    loader, sampler = common.make_loader(ds, 4, common.DistInfo(), seed=3)
    full = [b for _, b in zip(range(25), common.infinite_batches(loader, sampler, 0))]
    tail = [b for _, b in zip(range(12), common.infinite_batches(loader, sampler, 13))]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(full[13:], tail))
    assert full[0][0] == 0 and full[10][0] == 1  # 10 batches per epoch


# ------------------------------------------------------------------------------------------------- runtime
def test_ema_update_hand_value_rampup_and_batchnorm_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    torch.nn.init.constant_(model[0].weight, 1.0)
    ema = common.EMA(model, half_life_kimg=10.0, rampup=None)
    torch.nn.init.constant_(model[0].weight, 2.0)
    model[1].running_mean.fill_(5.0)
    d = 0.5 ** (64 / 10_000)
    ema.update(model, images_seen=10**6, batch_size=64)
    assert ema.model[0].weight.item() == pytest.approx(d * 1.0 + (1 - d) * 2.0)
    assert ema.model[1].running_mean.item() == 0.0  # BN statistics are not copied from the live model
    # StyleGAN2-ADA's ramp-up: the half-life is at most 5 % of the images seen
    ramped = common.EMA(model, half_life_kimg=10.0, rampup=0.05)
    assert ramped.decay(1000, 64) == pytest.approx(0.5 ** (64 / 50))
    assert ramped.decay(10**6, 64) == pytest.approx(0.5 ** (64 / 10_000))
    assert ramped.decay(0, 64) == 0.0  # the first update copies the model


def test_recalibrate_batchnorm_gives_the_statistics_of_the_inputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), common.BatchNorm2d(3)).eval()
    net[1].running_mean.fill_(7.0)
    batches = [torch.randn(16, 2, 4, 4) * (i + 1) + i for i in range(4)]
    common.recalibrate_batchnorm(net, lambda i: batches[i], n_batches=4)
    with torch.no_grad():
        h = [net[0](b).permute(1, 0, 2, 3).reshape(3, -1).double().numpy() for b in batches]
    # the cumulative average of per-batch means (= the mean of all, batches of equal size) and unbiased variances
    assert np.allclose(net[1].running_mean.numpy(), np.mean([x.mean(1) for x in h], 0), atol=1e-5)
    assert np.allclose(net[1].running_var.numpy(), np.mean([x.var(1, ddof=1) for x in h], 0), rtol=1e-4)
    assert not net.training and net[1].momentum == 0.1  # mode and momentum restored


def _tiny_training(steps, state=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        common.set_rng_state(state["rng"])
        start = state["step"]
    for _ in range(start, steps):
        x = torch.randn(16, 4)  # draws from the global RNG: resume must restore it
        loss = (
            (model(x) - x.sum(1, keepdim=True)).square().mean()
            + 0.01 * np.random.rand()
            + 0.01 * __import__("random").random()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def test_checkpoint_round_trip_and_exact_resume(tmp_path):
    full, _ = _tiny_training(10)
    half, opt = _tiny_training(5)
    path = str(tmp_path / "ck.pt")
    obj = {
        "model": half.state_dict(),
        "opt": opt.state_dict(),
        "rng": common.rng_state(),
        "step": 5,
        "args": {"a": 1, "b": [1, 2], "c": None},
    }
    common.save_checkpoint(obj, path)
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]  # the temp file was renamed away
    (tmp_path / "ck.pt.tmp.99999").write_bytes(b"x" * 1000)  # left by a save killed mid-write
    common.save_checkpoint(obj, path)
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]  # stale temporary files are removed on the next save
    state = common.load_checkpoint(path)
    assert state["args"] == {"a": 1, "b": [1, 2], "c": None}
    resumed, _ = _tiny_training(10, state)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


class _Malicious:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Malicious()
    payload.marker = marker
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state": payload}, f)
    with pytest.raises(SystemExit, match="refusing to load"):
        common.load_checkpoint(str(path))
    assert not marker.exists()
    with pytest.raises(SystemExit, match="does not exist"):
        common.load_checkpoint(str(tmp_path / "nothing.pt"))
    (tmp_path / "random.pt").write_bytes(os.urandom(256).replace(b"\x80", b"\x00"))
    with pytest.raises(SystemExit, match="is not a checkpoint"):
        common.load_checkpoint(str(tmp_path / "random.pt"))
    common.save_checkpoint({"x": torch.zeros(1)}, str(tmp_path / "plain.pt"))
    with pytest.raises(SystemExit, match="is not a ganinv/1 checkpoint of this project"):
        common.load_method_checkpoint(str(tmp_path / "plain.pt"))
    common.save_checkpoint({"format": common.CHECKPOINT_FORMAT, "method": "lia"}, str(tmp_path / "lia.pt"))
    with pytest.raises(SystemExit, match="is a 'lia' checkpoint, not a 'dlsgan' one"):
        common.load_method_checkpoint(str(tmp_path / "lia.pt"), "dlsgan")


def test_build_from_spec_whitelist():
    spec = common.model_spec(common.DCGANGenerator, z_dim=8, resolution=16, img_channels=1, width=8)
    assert isinstance(common.build_from_spec(spec), common.DCGANGenerator)
    with pytest.raises(SystemExit, match="cannot build"):
        common.build_from_spec({"class": "Popen", "kwargs": {}})


def test_image_grid_and_png(tmp_path):
    images = torch.linspace(-1, 1, 5 * 3 * 4 * 4).view(5, 3, 4, 4)
    grid = common.image_grid(images, nrow=2)
    assert grid.shape == (3 * 6 + 2, 2 * 6 + 2, 3) and grid.dtype == np.uint8
    assert grid[2, 2, 0] == 0 and grid[0, 0, 0] == 255  # first pixel is -1 -> 0; border is white
    common.save_image_grid(images[:, :1], str(tmp_path / "g.png"))
    from PIL import Image

    assert Image.open(tmp_path / "g.png").mode == "L"


def test_check_finite_and_resolution_errors():
    common.check_finite(3, loss=1.0)
    with pytest.raises(SystemExit, match="diverged at step 3"):
        common.check_finite(3, loss=float("nan"))
    with pytest.raises(SystemExit, match="try 32"):
        common.check_resolution(24)


DDP_SCRIPT = r"""
import os, sys, torch, common
info = common.init_distributed(cuda=False)
torch.manual_seed(100 + info.rank)  # different init per rank: broadcast must equalize
model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), common.BatchNorm2d(4), torch.nn.Tanh(), torch.nn.Flatten(),
                            torch.nn.Linear(16, 1))
common.broadcast_module(model)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(0)
x_all, y_all = torch.randn(8, 2, 4, 4, generator=g), torch.randn(8, 1, generator=g)
x, y = x_all[info.rank * 4:(info.rank + 1) * 4], y_all[info.rank * 4:(info.rank + 1) * 4]
for _ in range(3):
    loss = (model(x) - y).square().mean()
    opt.zero_grad(); loss.backward(); common.sync_gradients(model); opt.step()
torch.save(model.state_dict(), sys.argv[1] + f".rank{info.rank}")
common.cleanup_distributed()
"""


def test_two_rank_gloo_ddp_equals_one_process_on_the_global_batch(tmp_path):
    """Two ranks with half the batch each (gradients averaged, BatchNorm over the global batch) must equal one
    process on the whole batch: parameters and BatchNorm running statistics."""
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT)
    out = str(tmp_path / "state")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(script),
        out,
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[:3000]
    s0, s1 = torch.load(out + ".rank0", weights_only=True), torch.load(out + ".rank1", weights_only=True)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    # the same 3 steps in one process on all 8 samples, from rank 0's init, with torch's own BatchNorm2d
    torch.manual_seed(100)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(16, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 2, 4, 4, generator=g), torch.randn(8, 1, generator=g)
    for _ in range(3):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.allclose(v.double(), s0[k].double(), atol=1e-5), (k, v, s0[k])


# ------------------------------------------------------------------------------------------------- encoder probe
def regression_probe(D, lr, steps=100, res=16, d=16, plain_lr=False):
    """Train D's trunk and latent head alone to predict z from x = A z (A a fixed random linear map to images):
    the easiest inversion task. Returns the held-out MSE (predicting the mean scores 1)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(res * res, d, generator=g) * 0.5 / math.sqrt(d)

    def sample(n, gen):
        z = torch.randn(n, d, generator=gen)
        return (z @ A.t()).view(n, 1, res, res), z

    opt = torch.optim.Adam(
        common.unequalized_lr_groups(D, lr) if plain_lr else D.parameters(), lr=lr, betas=(0.0, 0.99)
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, z = sample(64, gen)
        loss = (D(x)[1] - z).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, z = sample(512, torch.Generator().manual_seed(2))
    with torch.no_grad():
        return (D(x)[1] - z).square().mean().item()


def test_equalized_discriminator_learns_a_regression_slowly_unless_its_lr_is_unequalized():
    """Issue 10's cause, kept as a probe: under Adam an equalized layer's effective weight moves by lr / sqrt(fan_in)
    per step, so StyleGAN2-lite's D learns z from x = A z far slower than DCGAN's at the same lr (measured: 0.86 vs
    0.02 after 100 steps); giving each equalized weight lr / scale (unequalized_lr_groups) recovers much of it
    (0.30). Forward pass and init are the same."""
    results = {}
    for name, make, plain in [
        ("dcgan", lambda: common.DCGANDiscriminator(16, 1, 16, latent_dim=16), False),
        ("sg2", lambda: common.StyleGAN2Discriminator(16, 1, 16, 16, head_hidden=16), False),
        ("sg2 plain lr", lambda: common.StyleGAN2Discriminator(16, 1, 16, 16, head_hidden=16), True),
    ]:
        torch.manual_seed(0)
        results[name] = regression_probe(make(), 1e-3, plain_lr=plain)
    assert results["dcgan"] < 0.1 and results["sg2"] > 0.6 and results["sg2 plain lr"] < 0.5 * results["sg2"], results
    D = common.StyleGAN2Discriminator(16, 1, 16, 16)
    groups = common.unequalized_lr_groups(D, 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(D.parameters()))
    conv = D.blocks[0].conv1  # 3 x 3 x 16 inputs: fan-in 144
    (lr_conv,) = [g["lr"] for g in groups if g["params"][0] is conv.weight]
    (lr_bias,) = [g["lr"] for g in groups if g["params"][0] is conv.bias]
    assert lr_conv == pytest.approx(1e-3 * 12) and lr_bias == 1e-3


def test_zero_border_is_exactly_the_padding_of_28_px_data_at_32():
    x = common.test_images("mnist", 32, 64, "cpu")
    b = common.zero_border("mnist", 32)
    assert b == 2 and common.zero_border("mnist", 28) == 0 and common.zero_border("cifar10", 32) == 0
    inner = torch.ones_like(x, dtype=torch.bool)
    inner[..., b:-b, b:-b] = False
    assert (x[inner] == -1).all() and common.unpadded(x, b).shape[-1] == 28  # the border is black padding, all of it
    x_rec = x.clone()
    x_rec[..., b:-b, b:-b] += 0.1
    # the same error on the digits' own pixels reads 1.31 times smaller over the padded image: 28^2 / 32^2
    assert common.mae(x, x_rec).item() * 32**2 / 28**2 == pytest.approx(
        common.mae(*(common.unpadded(t, b) for t in (x, x_rec))).item(), rel=1e-4
    )


def test_random_masks_keep_below_or_above_the_cutoff_are_complements():
    below, c1 = common.random_masks(256, 32, torch.Generator().manual_seed(4))
    above, c2 = common.random_masks(256, 32, torch.Generator().manual_seed(4), keep="above")
    assert c1 == c2 and torch.equal(below + above, torch.ones_like(below))
    kept = [common.random_masks(64, 32, torch.Generator().manual_seed(s))[0].mean().item() for s in range(200)]
    assert 0.6 < sum(kept) / len(kept) < 0.72  # Chai et al.'s code keeps about two thirds; paper 004's text a third

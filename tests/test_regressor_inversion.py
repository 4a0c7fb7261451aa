"""regressor_inversion.py: the mask generator's statistics, Eq. 2 term by term against a hand computation, the mask
reaching the regressor's input, the frozen generator staying bit-identical, smoke runs of both stages by subprocess
(copied alone with common.py into an empty directory), exact resume, 2-rank DDP, eval.py rebuilding the checkpoint,
and one-line errors for unusable generators. The subprocess runs go two at a time (one thread each)."""

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import Recording, ok, run_jobs, script_command

import common
import regressor_inversion as ri

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAN_TINY = (
    "--stage gan --resolution 16 --width 8 --d-width 8 --latent-dim 8 --batch-size 8 --eval-every 2 "
    "--save-every 2 --log-every 1 --eval-images 16 --no-track"
).split()
REG_TINY = (
    "--encoder-width 4 --batch-size 8 --eval-every 2 --save-every 2 --log-every 1 --eval-images 16 --no-track"
).split()


def command(args, script=None, nproc=1):
    return script_command(script or os.path.join(ROOT, "regressor_inversion.py"), args, nproc)


run_all = run_jobs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny 16px DCGAN (stage gan), then regressors on it: the default (masks) from a copy of the two files in an
    empty directory, the same stopped at half its budget and resumed, a --no-mask / ResNet / 1 - cos / VGG variant,
    and a 2-rank DDP run."""
    d = tmp_path_factory.mktemp("reg")
    gan = ok(run_all({"gan": (command([*GAN_TINY, "--images", "32", "--run-name", "gan"]), d)})["gan"])
    gen = str(d / "runs/gan/checkpoint.pt")
    copy = d / "copy"
    copy.mkdir()
    for f in ("regressor_inversion.py", "common.py"):
        shutil.copy(os.path.join(ROOT, f), copy / f)
    base = [*REG_TINY, "--generator", gen]
    results = run_all(
        {  # the longest (two ranks) first; resumed as soon as part has finished
            "ddp": (command([*base, "--images", "32", "--run-name", "ddp"], nproc=2), d),
            "part": (command([*base, "--images", "16", "--run-name", "part"]), d),
            "resumed": (command([*base, "--images", "32", "--resume", "runs/part/checkpoint.pt"]), d, "part"),
            "full": (
                command([*base, "--images", "32", "--run-name", "full"], str(copy / "regressor_inversion.py")),
                copy,
            ),
            "variant": (
                command(
                    [
                        *base,
                        "--images",
                        "16",
                        "--no-mask",
                        "--encoder",
                        "resnet",
                        "--latent-loss",
                        "cos",
                        "--perceptual",
                        "vgg",
                        "--run-name",
                        "variant",
                    ]
                ),
                d,
            ),
        }
    )
    results["gan"] = gan
    return d, gen, copy, results


# ------------------------------------------------------------------------------------------------- masks
def test_training_masks_statistics_and_determinism():
    g = torch.Generator().manual_seed(0)
    fractions, cutoffs = [], []
    for _ in range(200):
        m, cutoff = common.random_masks(16, 32, g)
        assert m.shape == (16, 1, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0}
        fractions.append(m.mean().item())
        cutoffs.append(cutoff)
    assert 0.3 <= min(cutoffs) and max(cutoffs) <= 1.0 and max(cutoffs) - min(cutoffs) > 0.6  # rand * 0.7 + 0.3
    # kept fraction = P(smoothed noise < cutoff): rises with the cutoff, from little (0.3) to almost all (1.0)
    order = sorted(range(200), key=lambda i: cutoffs[i])
    assert fractions[order[0]] < 0.3 and fractions[order[-1]] > 0.9
    assert all(0.0 <= f <= 1.0 for f in fractions) and 0.45 < sum(fractions) / 200 < 0.8
    # the cutoff is per batch: one threshold for every mask of a call
    noise_gen = torch.Generator().manual_seed(5)
    m, cutoff = common.random_masks(4, 32, noise_gen)
    noise = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(5))
    up = torch.nn.functional.interpolate(noise, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(m, (up < cutoff).float())
    a = common.random_masks(8, 32, torch.Generator().manual_seed(3))
    b = common.random_masks(8, 32, torch.Generator().manual_seed(3))
    c = common.random_masks(8, 32, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and not torch.equal(a[0], c[0])


def test_fixed_mask_families():
    center = common.fixed_masks("center", 2, 32)
    lower = common.fixed_masks("lower", 2, 32)
    assert center.mean().item() == 0.75 and center[0, 0, 16, 16] == 0 and center[0, 0, 2, 2] == 1
    assert lower.mean().item() == 0.5 and lower[0, 0, 31].sum() == 0 and lower[0, 0, 0].sum() == 32
    assert torch.equal(common.fixed_masks("train", 70, 32, seed=1), common.fixed_masks("train", 70, 32, seed=1))
    with pytest.raises(SystemExit, match="unknown mask family"):
        common.fixed_masks("circle", 2, 32)


def test_region_metrics_hand_values():
    x = torch.zeros(1, 1, 32, 32)
    y = x.clone()
    y[:, :, 16:] = 0.2  # error 0.2 on the lower half only
    lower = common.fixed_masks("lower", 1, 32)
    assert common.region_psnr(x, y, 1 - lower).item() == pytest.approx(20.0, abs=1e-4)  # 10 log10(4 / 0.04)
    assert common.region_psnr(x, y, lower).item() == pytest.approx(
        10 * math.log10(4e12), abs=1e-3
    )  # exact: MSE clamped at 1e-12
    assert common.region_ssim(x, y, lower).item() == pytest.approx(
        common.ssim_map(x, y)[:, :11].mean().item(), abs=1e-6
    )
    full = torch.ones(1, 1, 32, 32)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1, torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    assert common.region_ssim(a, b, full.expand(2, -1, -1, -1)).item() == pytest.approx(
        common.ssim(a, b).item(), abs=1e-6
    )
    lpips = common.LPIPS()
    assert torch.allclose(lpips(a, b, region=full.expand(2, -1, -1, -1)), lpips(a, b), atol=1e-6)
    # region_metrics names the regions right: the error is all in the hole (lower half), none on the kept pixels
    y2 = x.expand(2, -1, -1, -1).clone()
    y2[:, :, 16:] = 0.2
    out = common.region_metrics(x.expand(2, -1, -1, -1), y2, lower.expand(2, -1, -1, -1), lpips)
    assert out["hole_psnr"] == pytest.approx(20.0, abs=1e-4) and out["kept_psnr"] > 100
    assert out["kept_ssim"] == pytest.approx(common.region_ssim(x, y, lower).item(), abs=1e-6)  # windows cross over
    assert out["hole_ssim"] == pytest.approx(common.region_ssim(x, y, 1 - lower).item(), abs=1e-6)
    assert out["hole_ssim"] < out["kept_ssim"]
    # LPIPS by region, on textured images (a constant image's unit-normalised features say little)
    noisy = a + torch.cat([torch.zeros(2, 1, 16, 32), torch.randn(2, 1, 16, 32, generator=g) * 0.5], 2)
    out = common.region_metrics(a, noisy, lower.expand(2, -1, -1, -1), lpips)
    assert out["hole_lpips"] > 2 * out["kept_lpips"]


# ------------------------------------------------------------------------------------------------- Eq. 2
def tiny(*flags, resolution=16):
    args = ri.parse_args(["--generator", "x.pt", "--resolution", str(resolution), *REG_TINY, *flags])
    args.latent_dist = "normal"
    torch.manual_seed(0)
    G = common.DCGANGenerator(8, resolution, 1, 8)
    with torch.no_grad():  # a generator with BatchNorm statistics of its own, then frozen as in the script
        G.train()(torch.randn(64, 8))
    G = G.eval().requires_grad_(False)
    gen = {
        "spec": common.model_spec(common.DCGANGenerator, z_dim=8, resolution=resolution, img_channels=1, width=8),
        "z_dim": 8,
    }
    E = common.build_from_spec(ri.regressor_spec(args, gen, 1))
    return args, G, E


def test_each_loss_term_against_a_hand_computation():
    args, G, E = tiny("--lambda-pix", "0.7", "--lambda-p", "0.3", "--lambda-z", "2.0")
    s = torch.linspace(0.5, 1.5, 8)
    z = torch.randn(4, 8)
    mask = common.random_masks(4, 16, torch.Generator().manual_seed(1))[0]

    def perceptual(a, b):  # any L_p: the script must add lambda_p times it
        return (a - b).abs().mean((1, 2, 3))

    E.eval()  # BatchNorm in eval mode: the second forward below sees the same statistics
    loss, parts = ri.regressor_loss(G, E, s, z, mask, perceptual, args)
    x = G(z * s)
    z_hat = E(torch.cat([x * mask, mask], 1))
    x_hat = G(z_hat * s)
    pix, p, lz = ((x - x_hat) ** 2).mean(), (x_hat - x).abs().mean(), ((z_hat - z) ** 2).mean()
    assert parts["losses/pixel"] == pytest.approx(pix.item(), rel=1e-5)
    assert parts["losses/perceptual"] == pytest.approx(p.item(), rel=1e-5)
    assert parts["losses/latent"] == pytest.approx(lz.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * pix.item() + 0.3 * p.item() + 2.0 * lz.item(), rel=1e-5)
    cos_args, _, _ = tiny("--latent-loss", "cos")
    _, parts = ri.regressor_loss(G, E, s, z, mask, None, cos_args)
    assert parts["losses/latent"] == pytest.approx(
        (1 - torch.nn.functional.cosine_similarity(z_hat, z)).mean().item(), rel=1e-5
    )
    assert parts["losses/perceptual"] == 0.0
    assert ri.latent_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), "cos").item() == pytest.approx(1.0)
    assert ri.latent_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), "mse").item() == pytest.approx(2.5)


def test_the_mask_reaches_the_regressor_and_hides_the_hole():
    args, G, E = tiny()
    E = Recording(E)
    opt = torch.optim.Adam(E.parameters(), lr=0.0)
    s = torch.ones(8)
    torch.manual_seed(7)
    z = common.sample_z(8, 8, "normal", "cpu")
    mask = common.random_masks(8, 16)[0]
    torch.manual_seed(7)
    out = ri.regressor_step(G, E, opt, s, 8, None, args, torch.device("cpu"))
    (seen,) = E.inputs
    x = G(z * s)
    assert seen.shape == (8, 2, 16, 16)
    assert torch.equal(seen[:, 1:], mask) and 0 < mask.mean() < 1  # the mask channel, with holes
    assert torch.equal(seen[:, :1], x * mask)  # the image with the hole zeroed
    assert out["charts/kept_fraction"] == pytest.approx(mask.mean().item())
    # what is hidden cannot matter: changing the hole's pixels leaves the regressor's input unchanged
    other = x + (1 - mask) * 0.5
    assert torch.equal(ri.regressor_input(other, mask, True), ri.regressor_input(x, mask, True))
    # --no-mask: the plain regressor takes the image alone, unmasked during training
    args, G, E = tiny("--no-mask")
    E = Recording(E)
    torch.manual_seed(7)
    z = common.sample_z(8, 8, "normal", "cpu")
    torch.manual_seed(7)
    ri.regressor_step(G, E, torch.optim.Adam(E.parameters(), lr=0.0), s, 8, None, args, torch.device("cpu"))
    assert E.inputs[0].shape == (8, 1, 16, 16)
    assert torch.equal(E.inputs[0], G(z * s))  # the whole image: no pixel zeroed


@torch.no_grad()
def test_completion_sees_only_the_kept_pixels_and_the_mask():
    args, G, E = tiny()
    E.eval()
    s = torch.ones(8)
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mask = common.fixed_masks("center", 6, 16)
    out = ri.complete(G, E, s, x, mask, True)
    assert torch.equal(ri.complete(G, E, s, x + (1 - mask) * 0.7, mask, True), out)  # the hole is not seen
    assert not torch.allclose(ri.complete(G, E, s, x, torch.ones_like(mask), True), out)  # the mask is
    assert not torch.allclose(ri.complete(G, E, s, x, common.fixed_masks("lower", 6, 16), True), out)


def test_the_frozen_generator_stays_bit_identical():
    args, G, E = tiny()
    before = {k: t.clone() for k, t in G.state_dict().items()}
    opt = torch.optim.Adam(E.parameters(), lr=1e-2)
    E_before = [p.clone() for p in E.parameters()]
    for _ in range(3):
        ri.regressor_step(G, E, opt, torch.ones(8), 8, lambda a, b: (a - b).square().mean(), args, torch.device("cpu"))
    assert all(torch.equal(t, G.state_dict()[k]) for k, t in before.items())  # weights and BatchNorm statistics
    assert any(not torch.equal(a, b) for a, b in zip(E_before, E.parameters()))  # while E did learn
    assert all(p.grad is None for p in G.parameters())


def test_regressor_cnn_is_the_papers_and_progan_gan_step_runs():
    E = common.RegressorCNN(32, 2, 64, width=32)
    convs = [m for m in E.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256, 512]
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    assert [m.negative_slope for m in E.modules() if isinstance(m, torch.nn.LeakyReLU)] == [0.1] * 5
    assert E(torch.zeros(2, 2, 32, 32)).shape == (2, 64)
    args = ri.parse_args([*GAN_TINY, "--arch", "progan"])
    args.dataset, args.resolution = "mnist", 16
    specs = ri.gan_specs(args, 1)
    G, D = common.build_from_spec(specs["G"]), common.build_from_spec(specs["D"])
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 2e-4), torch.optim.Adam(D.parameters(), 2e-4)
    out = ri.gan_step(G, D, opt_g, opt_d, torch.rand(4, 1, 16, 16) * 2 - 1, args, torch.device("cpu"))
    assert math.isfinite(out["losses/D"]) and math.isfinite(out["losses/G"])


def test_gan_step_d_gradient_is_bce_plus_r1_and_the_papers_recipe_is_reachable():
    """D's gradient after one step is that of BCE(real, fake) + r1_weight * E||grad_x D(x_real)||^2, by hand."""
    args = ri.parse_args(GAN_TINY)
    args.dataset, args.resolution = "mnist", 16
    specs = ri.gan_specs(args, 1)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in common.build_from_spec(specs["D"]).modules())
    torch.manual_seed(0)
    G, D = common.build_from_spec(specs["G"]), common.build_from_spec(specs["D"])
    x_real = torch.rand(4, 1, 16, 16) * 2 - 1
    for r1_weight in (0.0, 40.0):
        G_ref, D_ref = common.build_from_spec(specs["G"]), common.build_from_spec(specs["D"])
        G_ref.load_state_dict(G.state_dict()), D_ref.load_state_dict(D.state_dict())
        torch.manual_seed(1)
        z = torch.randn(4, args.latent_dim)
        xr = x_real.clone().requires_grad_(True)
        real_logit = D_ref(xr)[0]
        (grad,) = torch.autograd.grad(real_logit.sum(), xr, create_graph=True)
        loss = (
            F.softplus(-real_logit).mean()
            + F.softplus(D_ref(G_ref(z).detach())[0]).mean()
            + r1_weight * grad.square().sum((1, 2, 3)).mean()
        )
        expected = torch.autograd.grad(loss, list(D_ref.parameters()))
        G_run, D_run = common.build_from_spec(specs["G"]), common.build_from_spec(specs["D"])
        G_run.load_state_dict(G.state_dict()), D_run.load_state_dict(D.state_dict())
        opt_g, opt_d = torch.optim.Adam(G_run.parameters(), 0.0), torch.optim.Adam(D_run.parameters(), 0.0)
        torch.manual_seed(1)
        ri.gan_step(G_run, D_run, opt_g, opt_d, x_real, args, torch.device("cpu"), r1_weight)
        for p, e in zip(D_run.parameters(), expected):
            torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
    paper = ri.parse_args([*GAN_TINY, "--d-norm", "bn", "--r1", "0", "--lr", "2e-4", "--betas", "0.5", "0.999"])
    paper.dataset, paper.resolution = "mnist", 16
    assert any(
        isinstance(m, torch.nn.BatchNorm2d) for m in common.build_from_spec(ri.gan_specs(paper, 1)["D"]).modules()
    )


# ------------------------------------------------------------------------------------------------- smoke runs
def test_gan_stage_smoke(runs):
    d, gen, _, results = runs
    assert "eval @ 4" in results["gan"]["stdout"] and "ETA" in results["gan"]["stdout"]
    ckpt = common.load_checkpoint(gen)
    assert ckpt["method"] == "regressor_inversion" and ckpt["stage"] == "gan" and ckpt["step"] == 4
    assert ckpt["args"]["batch_size"] == 8 and ckpt["args"]["lr"] == 1e-3 and ckpt["args"]["betas"] == [0.0, 0.99]
    assert ckpt["args"]["r1"] == 10.0 and ckpt["args"]["d_norm"] == "none"  # the recipe that did not collapse
    assert (d / "runs/gan/samples.png").stat().st_size > 100 and (d / "runs/gan/summary.json").exists()


def test_regressor_smoke_copied_alone_and_the_generator_is_unchanged(runs):
    _, gen, copy, results = runs
    ok(results["full"])
    run_dir = copy / "runs/full"
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    for key in (
        "losses/pixel",
        "losses/perceptual",
        "losses/latent",
        "eval/real_psnr",
        "eval/fake_z_cos",
        "eval/real_train_mask_hole_psnr",
    ):
        assert math.isfinite(rows[-1][key]), key
    final = json.load(open(run_dir / "final_metrics.json"))
    for family in ("train", "center", "lower"):
        assert (
            math.isfinite(final[f"inpaint_{family}"]["hole_psnr"])
            and final[f"inpaint_{family}"]["seconds_per_image"] > 0
        )
        assert (run_dir / f"inpaint_{family}.png").stat().st_size > 100
    assert set(final["reconstruction"]) == {"mae", "mse", "psnr", "ssim", "lpips"}
    for png in ("composition.png", "reconstructions.png", "samples.png"):
        assert (run_dir / png).stat().st_size > 100
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["wall_s"] > 0 and summary["images_per_sec"] > 0 and summary["peak_memory_mb"] > 0
    ckpt = common.load_checkpoint(str(run_dir / "checkpoint.pt"))
    source = common.load_checkpoint(gen)
    assert (
        ckpt["inversion"]["encoder_input"] == "image_and_mask"
        and ckpt["model_specs"]["E"]["kwargs"]["in_channels"] == 2
    )
    assert all(torch.equal(t, ckpt["state_dicts"]["G"][k]) for k, t in source["state_dicts"]["G_ema"].items())
    assert ckpt["generator_source"]["path"] == gen and ckpt["generator_source"]["network"] == "G_ema"


def test_variant_no_mask_resnet_cos_vgg(runs):
    d, _, _, results = runs
    assert "no mask | L_p vgg, L_z cos" in ok(results["variant"])["stdout"]
    ckpt = common.load_checkpoint(str(d / "runs/variant/checkpoint.pt"))
    assert (
        ckpt["model_specs"]["E"]["class"] == "ResNetEncoder" and ckpt["model_specs"]["E"]["kwargs"]["in_channels"] == 1
    )
    assert ckpt["inversion"]["encoder_input"] == "image"


def test_resume_is_exact(runs):
    d, _, copy, results = runs
    ok(results["part"]), ok(results["resumed"])
    assert "step 4/4" in results["resumed"]["stdout"]
    full = common.load_checkpoint(str(copy / "runs/full/checkpoint.pt"))
    resumed = common.load_checkpoint(str(d / "runs/part/checkpoint.pt"))
    assert full["step"] == resumed["step"] == 4
    for k, t in full["state_dicts"]["E"].items():
        assert torch.equal(t, resumed["state_dicts"]["E"][k]), k
    for i, state in full["optimizers"]["E"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], resumed["optimizers"]["E"]["state"][i]["exp_avg_sq"])
    assert torch.equal(full["rng"][0]["torch"], resumed["rng"][0]["torch"])


def test_ddp_two_ranks_identical(runs):
    d, _, _, results = runs
    r = ok(results["ddp"])
    assert "regressor parameters and BatchNorm statistics identical on 2 ranks" in r["stdout"]
    assert "4 steps of 8" in r["stdout"] and "x2" in r["stdout"]
    ckpt = common.load_checkpoint(str(d / "runs/ddp/checkpoint.pt"))
    assert (
        len(ckpt["rng"]) == 2
        and ckpt["step"] == 4
        and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    )


def test_eval_rebuilds_the_regressor_with_its_mask_channel(runs):
    import eval as ev

    _, _, copy, _ = runs
    inv = common.load_inverter(str(copy / "runs/full/checkpoint.pt"), torch.device("cpu"))
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    m = common.fixed_masks("center", 3, 16)
    assert torch.equal(inv.encode(x, m), inv.E(torch.cat([x * m, m], 1)))
    assert torch.equal(inv.encode(x), inv.E(torch.cat([x, torch.ones_like(m)], 1)))  # unmasked: an all-ones mask
    # masked MSE: the optimization baseline is blind to the hole
    code = torch.zeros(3, 8, requires_grad=True)
    a = ev.inversion_loss(inv, "z", code, x, mask=m)
    b = ev.inversion_loss(inv, "z", code, x + (1 - m) * 0.7, mask=m)
    assert torch.equal(a, b) and not torch.equal(a, ev.inversion_loss(inv, "z", code, x))


# ------------------------------------------------------------------------------------------------- bad input
def test_unusable_generators_fail_in_one_line(runs, tmp_path):
    _, gen, copy, _ = runs
    no_gen = str(tmp_path / "no_gen.pt")
    common.save_checkpoint(
        {
            "format": common.CHECKPOINT_FORMAT,
            "method": "dlsgan",
            "inversion": {"generator": None},
            "model_specs": {},
            "state_dicts": {},
            "args": {},
        },
        no_gen,
    )
    in_process = [
        (["--generator", no_gen], "holds no usable generator"),
        (["--generator", gen, "--resolution", "32"], "makes 16px images but --resolution is 32"),
        (["--generator", gen, "--dataset", "cifar10"], "makes 1-channel images but cifar10 has 3"),
        (["--generator", gen, "--dataset", "fashion-mnist"], "was trained on mnist, not --dataset fashion-mnist"),
        (["--generator", str(tmp_path / "missing.pt")], "does not exist"),
    ]
    for argv, message in in_process:
        with pytest.raises(SystemExit, match=message):
            ri.resolve_generator(ri.parse_args([*REG_TINY, *argv]), None, torch.device("cpu"))
    with pytest.raises(SystemExit, match="needs --generator CKPT"):
        ri.parse_args(REG_TINY)
    with pytest.raises(SystemExit, match="--mask-low \\+ --mask-span must be in"):
        ri.parse_args([*REG_TINY, "--generator", gen, "--mask-low", "0.5"])
    with pytest.raises(SystemExit, match="is a 'gan'-stage checkpoint, not a 'regressor'-stage one"):
        ri.parse_args([*REG_TINY, "--stage", "regressor", "--resume", gen])
    with pytest.raises(SystemExit, match="is a 'regressor'-stage checkpoint, not a 'gan'-stage one"):
        ri.parse_args([*GAN_TINY, "--images", "16", "--resume", str(copy / "runs/full/checkpoint.pt")])
    by_subprocess = [  # exit status, one line on stderr, nothing created
        (["--generator", gen, "--resolution", "32"], "makes 16px images but --resolution is 32"),
        (["--resume", no_gen], "is a 'dlsgan' checkpoint, not a 'regressor_inversion' one"),
    ]
    results = run_all(
        {i: (command([*REG_TINY, "--images", "16", *a]), tmp_path) for i, (a, _) in enumerate(by_subprocess)}
    )
    for i, (_, message) in enumerate(by_subprocess):
        r = results[i]
        assert r["returncode"] != 0 and message in r["stderr"], r["stderr"][-2000:]
        assert len(r["stderr"].strip().splitlines()) == 1 and "Traceback" not in r["stderr"]
    assert not (tmp_path / "runs").exists()  # nothing created

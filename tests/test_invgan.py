"""invgan.py: every loss term against a hand computation, the variant flags, the gradient path from G's losses into D
through w_R, smoke runs of the three variants (through the ablation driver, run from a copy of the two files in an
empty directory), exact resume, and two gloo ranks against one process on the global batch."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import free_port, two_at_a_time

import common
import invgan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (
    "--resolution 16 --width 8 --latent-dim 8 --w-dim 8 --batch-size 8 --eval-images 16 --eval-every "
    "2 --save-every 2 --log-every 1 --edit-images 2 --no-track"
).split()


def run(args, cwd, check=True, script=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    cmd = [sys.executable, script or os.path.join(ROOT, "invgan.py"), *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    return r


def tiny(*flags):
    args = invgan.parse_args([*TINY, *flags])
    specs = invgan.model_specs(args, 1)
    torch.manual_seed(0)
    return args, common.build_from_spec(specs["G"]), common.build_from_spec(specs["D"])


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, torch.randn(n, 8, generator=g)


# ------------------------------------------------------------------------------------------------- the losses
def mmd_by_hand(x, y):
    """Unbiased MMD^2, kernel sum_s exp(-d^2 / 2 (s m)^2) for s in 1/4 .. 4, m = median pooled pairwise distance."""
    x, y = x.double().numpy(), y.double().numpy()
    pooled = np.concatenate([x, y])
    dist = np.sqrt(((pooled[:, None] - pooled[None]) ** 2).sum(-1))
    off = np.sort(dist[~np.eye(len(pooled), dtype=bool)])
    m = off[(len(off) - 1) // 2]  # torch's median: the lower of the two middle values

    def k(a, b):
        return sum(math.exp(-((a - b) ** 2).sum() / (2 * (s * m) ** 2)) for s in (0.25, 0.5, 1, 2, 4))

    n, n_y = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(n_y) for j in range(n_y) if i != j) / (n_y * (n_y - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n_y)) / (n * n_y)
    return xx + yy - 2 * xy


def test_every_g_term_against_a_hand_computation():
    """Eq. 3 on one batch, recomputed step by step from the networks: half M(z), half w_R = D_w(x_real)."""
    args, G, D = tiny("--lambda-latent", "0.5", "--lambda-fm", "20", "--lambda-cycle", "1000", "--lambda-mmd", "4")
    x, z = batch()
    total, terms = invgan.g_losses(G, D, x, args, z[:4])
    with torch.no_grad():
        w = G.mapping(z[:4])
        w_r = D(x[:4])[1]
        f_real = D.features(x[:4])
        w_all = torch.cat([w, w_r])  # the generator batch: prior codes, then the real images' codes
        x_gen = G.synthesis(w_all)
        logit, w_t = D(x_gen)
        f_gen = D.features(x_gen)
        w_tt = D(G.synthesis(w_t))[1]
    hand = {
        "adv": F.softplus(-logit).mean().item(),  # non-saturating G loss
        "latent": sum(((w_all[i] - w_t[i]) ** 2).sum().item() for i in range(8)) / (8 * 8),  # ||w - w~||^2 / d
        "cycle": sum(((w_t[i] - w_tt[i]) ** 2).sum().item() for i in range(8)) / (8 * 8),  # ||w~ - w~~||^2 / d
        "fm": sum(((f_real[i] - f_gen[4 + i]) ** 2).sum().item() for i in range(4)) / (4 * f_real.shape[1]),
        "mmd": mmd_by_hand(w, w_r),
    }
    assert set(terms) == set(hand)
    for k, v in hand.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-4, abs=1e-7), k
    expected = hand["adv"] + 0.5 * hand["latent"] + 20 * hand["fm"] + 1000 * hand["cycle"] + 4 * hand["mmd"]
    assert total.item() == pytest.approx(expected, rel=1e-4)
    # every weighted term is live and large enough on this batch that dropping it breaks the sum above
    assert min(20 * hand["fm"], 1000 * hand["cycle"], 0.5 * hand["latent"], abs(4 * hand["mmd"])) > 1e-3 * expected


def test_d_step_is_adversarial_plus_latent_on_the_generator_batch():
    args, G, D = tiny("--r1", "0")
    x, z = batch()
    opt = torch.optim.Adam(D.parameters(), lr=0.0)  # lr 0: D unchanged, so its outputs can be recomputed after
    out = invgan.d_step(G, D, opt, x, args, z=z[:4])
    with torch.no_grad():
        w_all = torch.cat([G.mapping(z[:4]), D(x[:4])[1]])
        logit_gen, w_t = D(G.synthesis(w_all))
        logit_real = D(x)[0]
    adv = F.softplus(logit_gen).mean() + F.softplus(-logit_real).mean()
    lat = (w_all - w_t).square().mean()
    assert out["losses/D_adv"] == pytest.approx(adv.item(), rel=1e-5)
    assert out["losses/L_lat_D"] == pytest.approx(lat.item(), rel=1e-5)
    assert out["losses/D"] == pytest.approx((adv + lat).item(), rel=1e-5)


def test_inpainting_zeroes_exactly_one_square_per_image():
    x = torch.ones(5, 1, 16, 16)
    holed = invgan.inpaint_squares(x, 0.375, torch.Generator().manual_seed(0))
    for img in holed:
        zeros = (img[0] == 0).nonzero()
        assert len(zeros) == 36  # 6 x 6
        assert zeros[:, 0].max() - zeros[:, 0].min() == 5 and zeros[:, 1].max() - zeros[:, 1].min() == 5


# ------------------------------------------------------------------------------------------------- the variants
def test_variants_set_exactly_their_ingredients_and_flags_override_them():
    expect = {
        "naive": (False, False, 0.0, 0.0, 0.0),
        "augmented": (True, False, 0.0, 0.0, 0.0),
        "full": (True, True, 1.0, 1.0, 1.0),
    }
    for variant, values in expect.items():
        a = invgan.parse_args([*TINY, "--variant", variant])
        assert (a.real_codes, a.grad_through_wr, a.lambda_fm, a.lambda_cycle, a.lambda_mmd) == values
        assert a.lambda_latent == 1.0 and a.latent_in_g
    a = invgan.parse_args([*TINY, "--lambda-cycle", "0", "--no-grad-through-wr"])
    assert (a.real_codes, a.grad_through_wr, a.lambda_fm, a.lambda_cycle, a.lambda_mmd) == (True, False, 1, 0, 1)
    a = invgan.parse_args([*TINY, "--variant", "naive", "--lambda-cycle", "2"])
    assert (a.real_codes, a.lambda_cycle) == (False, 2.0)


@pytest.mark.parametrize("variant", ["naive", "augmented", "full"])
def test_variant_terms_and_generator_batch(variant):
    args, G, D = tiny("--variant", variant)
    x, z = batch()
    n_prior = 8 if variant == "naive" else 4
    seen = []
    G.synthesis.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    total, terms = invgan.g_losses(G, D, x, args, z[:n_prior])
    assert set(terms) == ({"adv", "latent"} if variant != "full" else {"adv", "latent", "cycle", "fm", "mmd"})
    assert total.item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-5)
    with torch.no_grad():
        w = G.mapping(z[:n_prior])
        expected = w if variant == "naive" else torch.cat([w, D(x[:4])[1]])  # naive: no real codes
    assert torch.allclose(seen[0], expected, atol=1e-6)
    seen.clear()
    invgan.d_step(G, D, torch.optim.SGD(D.parameters(), lr=0.0), x, args, z=z[:n_prior])
    assert torch.allclose(seen[0], expected, atol=1e-6)  # D's fakes are the same kind of batch


@pytest.mark.parametrize("variant", ["naive", "augmented", "full"])
def test_gradient_into_D_flows_only_through_w_R_and_only_in_full(variant):
    args, G, D = tiny("--variant", variant)
    x, z = batch()
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-2)
    opt_dr = torch.optim.Adam(D.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in D.state_dict().items()}
    seen = {}
    hook = opt_dr.register_step_pre_hook(
        lambda opt, *_: seen.update({n: p.grad.clone() for n, p in D.named_parameters() if p.grad is not None})
    )
    invgan.g_step(G, D, opt_g, opt_dr, x, args, z=z[: 8 if variant == "naive" else 4])
    hook.remove()
    after = D.state_dict()
    if variant == "full":
        assert seen["heads.latent.weight"].abs().sum() > 0 and seen["trunk.0.weight"].abs().sum() > 0
        assert "heads.adv.weight" not in seen  # the logit of generated images trains G only
        assert not torch.equal(before["heads.latent.weight"], after["heads.latent.weight"])
        assert torch.equal(before["heads.adv.weight"], after["heads.adv.weight"])
    else:  # cut: no gradient reaches D at all (opt_dr never steps here, so its hook alone would prove nothing)
        assert all(p.grad is None for p in D.parameters()), [n for n, p in D.named_parameters() if p.grad is not None]
        assert not seen and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is not None for p in G.parameters())  # G and M always learn
    assert all(p.requires_grad for p in D.parameters())  # restored for the next D step


def test_adversarial_gradient_reaches_D_through_w_R_only_with_wr_adv_grad():
    x, z = batch()
    grads = {}
    for flag in ("--no-wr-adv-grad", "--wr-adv-grad"):
        args, G, D = tiny(flag, "--lambda-latent", "0", "--lambda-fm", "0", "--lambda-cycle", "0", "--lambda-mmd", "0")
        opt = torch.optim.SGD(D.parameters(), lr=0.0)
        invgan.g_step(G, D, torch.optim.SGD(G.parameters(), lr=0.0), opt, x, args, z=z[:4])
        grads[flag] = D.heads.latent.weight.grad
    no = grads["--no-wr-adv-grad"]
    assert no is None or not no.any()  # only the adversarial term is weighted: nothing reaches D
    assert grads["--wr-adv-grad"] is not None and grads["--wr-adv-grad"].abs().sum() > 0


def test_deblur_extrapolates_away_from_the_blurred_code():
    """Section 3.3: x_up = bicubic(bicubic(x, R/2), R); w_up = D_w(x_up), w_blur = D_w(blur(x_up)); outputs
    G(w_up + alpha (w_up - w_blur)). Checked against a by-hand Gaussian blur (separable 5-tap kernel, reflect pad)."""
    args, G, D = tiny()
    G.eval(), D.eval()
    x, _ = batch(4)
    x_up, x_up_rec, sharper = invgan.deblur_codes(G, D, x, strengths=(1.0, 2.5))
    small = torch.nn.functional.interpolate(x, size=8, mode="bicubic", align_corners=False)
    expected_up = torch.nn.functional.interpolate(small, size=16, mode="bicubic", align_corners=False).clamp(-1, 1)
    torch.testing.assert_close(x_up, expected_up)
    k = torch.exp(-(torch.arange(-2.0, 3.0) ** 2) / 2)
    k = k / k.sum()
    padded = torch.nn.functional.pad(x_up, (2, 2, 2, 2), mode="reflect")
    blurred = torch.nn.functional.conv2d(padded, (k[:, None] * k[None, :]).view(1, 1, 5, 5))
    with torch.no_grad():
        w_up, w_blur = D(x_up)[1], D(blurred)[1]
        assert (w_up - w_blur).abs().max() > 1e-4  # the blur changed the code
        torch.testing.assert_close(x_up_rec, G.synthesis(w_up).clamp(-1, 1))
        for alpha, out in zip((1.0, 2.5), sharper):
            torch.testing.assert_close(
                out, G.synthesis(w_up + alpha * (w_up - w_blur)).clamp(-1, 1), atol=1e-5, rtol=1e-4
            )


def test_tiles_round_trip_in_row_major_order_and_tiled_inversion_is_per_tile():
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    tiles = common.to_tiles(x, 8)
    assert tiles.shape == (8, 1, 8, 8)
    assert (
        torch.equal(tiles[1], x[0, :, :8, 8:])
        and torch.equal(tiles[2], x[0, :, 8:, :8])
        and torch.equal(tiles[4], x[1, :, :8, :8])
    )
    assert torch.equal(common.from_tiles(tiles, 2), x)
    args, G, D = tiny("--crop", "8")
    G.eval(), D.eval()
    assert G.resolution == 8  # the networks are built for the tiles
    x, _ = batch(3)  # 16 x 16 images: 2 x 2 tiles each
    codes = invgan.encode(D, x, tile=8)
    assert codes.shape == (3, 4, 8)
    with torch.no_grad():
        by_hand = [
            G.synthesis(D(x[i : i + 1, :, r : r + 8, c : c + 8])[1]).clamp(-1, 1)
            for i in range(3)
            for r in (0, 8)
            for c in (0, 8)
        ]
    x_rec = invgan.reconstruct(G, D, x, tile=8)
    assert x_rec.shape == x.shape
    torch.testing.assert_close(x_rec[1:2, :, 8:, :8], by_hand[4 + 2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x_rec[2:3, :, :8, 8:], by_hand[8 + 1], atol=1e-5, rtol=1e-4)
    torch.manual_seed(0)
    crops = invgan.random_crops(x, 8)
    assert crops.shape == (3, 1, 8, 8) and any(
        torch.equal(crops[0], x[0, :, r : r + 8, c : c + 8]) for r in range(9) for c in range(9)
    )


def test_tiled_training_run(tmp_path):
    """--crop: G and D learn on crops; the evaluation and every editing grid work on whole images, tile by tile."""
    r = run([*TINY, "--crop", "8", "--images", "16", "--run-name", "tiled"], tmp_path)
    run_dir = tmp_path / "runs/tiled"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[-1]["eval/real_mae"]) and math.isfinite(rows[-1]["eval/mmd_w_wR"])
    for png in ("reconstructions.png", "edit_inpaint.png", "edit_merge.png", "edit_interp.png", "edit_deblur.png"):
        assert (run_dir / png).stat().st_size > 100, png
    ckpt = common.load_checkpoint(str(run_dir / "checkpoint.pt"))
    assert ckpt["model_specs"]["G"]["kwargs"]["resolution"] == 8 and ckpt["args"]["crop"] == 8
    bad = run([*TINY, "--crop", "12", "--images", "16", "--run-name", "bad"], tmp_path, check=False)
    assert (
        bad.returncode != 0
        and "--crop 12 must be a power of two" in bad.stderr
        and not (tmp_path / "runs/bad").exists()
    )
    assert "ETA" in r.stdout
    # eval.py inverts it tiled as well: whole 16 px images, one code per tile, exactly invgan's own reconstruction

    inv = common.load_inverter(str(run_dir / "checkpoint.pt"), torch.device("cpu"))
    G, D, _ = invgan.load_networks(str(run_dir / "checkpoint.pt"))
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = inv.encode(x)
    assert inv.resolution == 16 and codes.shape == (3, 4, 8)
    assert torch.allclose(inv.decode(codes), invgan.reconstruct(G, D, x, 8), atol=1e-6)
    for code in (inv.mean_code("w", 3), inv.random_code("w", 3, torch.Generator()), inv.to_space("w", codes)):
        assert code.shape == (3, 4, 8) and inv.synthesize("w", code).shape == (3, 1, 16, 16)
    e = run(
        [
            "--ckpt",
            str(run_dir / "checkpoint.pt"),
            "--n-recon",
            "8",
            "--n-fid",
            "8",
            "--kid-subset-size",
            "4",
            "--fid-kinds",
            "recon",
            "randrec",
            "--no-semantic",
            "--baselines",
            "opt-w-mean",
            "--opt-steps",
            "2",
            "--run-name",
            "eval_tiled",
        ],
        tmp_path,
        script=os.path.join(ROOT, "eval.py"),
    )
    table = json.loads((tmp_path / "runs/eval_tiled/results.json").read_text())
    assert (
        "16px" in e.stdout and len(table["rows"]) == 3 and all(math.isfinite(r["psnr"]) for r in table["rows"][1:])
    ), e.stdout


# ------------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """The ablation driver run from a copy of invgan.py + common.py in an empty directory: three smoke runs. Beside
    it, in a directory of its own, the full variant stopped after 2 of its 4 steps (``part``, for test_resume_is_exact)
    runs at the same time, filling the core the driver leaves idle."""
    tmp, half = tmp_path_factory.mktemp("copied"), tmp_path_factory.mktemp("half")
    for f in ("invgan.py", "common.py"):
        shutil.copy(os.path.join(ROOT, f), tmp / f)
    args = [*TINY, "--images", "32", "--ablation", "--jobs", "2"]
    r, _ = two_at_a_time(
        [
            lambda: run(args, tmp, script=str(tmp / "invgan.py")),
            lambda: run([*TINY, "--variant", "full", "--images", "16", "--run-name", "part"], half),
        ]
    )
    (out_dir,) = [p for p in (tmp / "runs").iterdir() if (p / "table.md").exists()]
    return tmp, out_dir, r, args, half


def test_ablation_table_and_figure_from_a_copy_in_an_empty_dir(ablation):
    tmp, out_dir, r, args, _ = ablation
    table = (out_dir / "table.md").read_text()
    assert "| naive |" in table and "| augmented |" in table and "| full |" in table and "LPIPS" in table
    results = json.loads((out_dir / "table.json").read_text())
    for row in results.values():
        assert all(math.isfinite(row[k]) for k in ("mae", "mse", "psnr", "ssim", "lpips")) and row["n"] == 16
    assert (out_dir / "fig5.png").stat().st_size > 1000  # (reuse of finished runs: tests/test_dlsgan.py)


@pytest.mark.parametrize("variant", ["naive", "augmented", "full"])
def test_smoke_run_per_variant(variant, ablation):
    tmp = ablation[0]
    (run_dir,) = [p for p in (tmp / "runs").iterdir() if p.name.endswith(f"__{variant}")]
    log = next(ablation[1].glob(f"*__{variant}.log")).read_text()
    assert "eval @ 4" in log and "ETA" in log
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [2, 4]
    assert math.isfinite(rows[0]["losses/R1"])  # lazy R1 at step 0 (every 4)
    keys = ["losses/D", "losses/G", "losses/L_lat_D", "eval/real_mae", "eval/real_psnr", "eval/mmd_w_wR"]
    keys += ["losses/L_fm_G", "losses/L_cycle_G", "losses/L_mmd_G"] if variant == "full" else []
    assert all(math.isfinite(rows[-1][k]) for k in keys)
    assert (variant == "full") == ("losses/L_fm_G" in rows[-1])
    for png in (
        "samples.png",
        "reconstructions.png",
        "edit_inpaint.png",
        "edit_merge.png",
        "edit_interp.png",
        "edit_deblur.png",
    ):
        assert (run_dir / png).stat().st_size > 100, png
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["images_per_sec"] > 0 and summary["peak_memory_mb"] > 0
    # the contract: G_ema and the encoder rebuilt from specs alone; the encoder outputs w, decoded by G.synthesis
    ckpt = common.load_checkpoint(str(run_dir / "checkpoint.pt"))
    assert ckpt["method"] == "invgan" and ckpt["inversion"]["encoder_space"] == "w"
    G = common.build_from_spec(ckpt["model_specs"]["G"])
    G.load_state_dict(ckpt["state_dicts"]["G_ema"])
    D = common.build_from_spec(ckpt["model_specs"]["D"])
    D.load_state_dict(ckpt["state_dicts"]["D"])
    G.eval()
    x = torch.zeros(2, 1, 16, 16)
    assert torch.allclose(G.synthesis(D(x)[1]).clamp(-1, 1), invgan.reconstruct(G, D, x))


def test_resume_is_exact(ablation):
    """Stopped after 2 of 4 steps and resumed: the same weights, EMA, optimizers (all three) as the full run."""
    tmp, out_dir, _, args, half = ablation
    (full_dir,) = [p for p in (tmp / "runs").iterdir() if p.name.endswith("__full")]
    base = [*TINY, "--variant", "full"]
    assert common.load_checkpoint(str(half / "runs/part/checkpoint.pt"))["step"] == 2  # run by the fixture
    r = run([*base, "--images", "32", "--resume", "runs/part/checkpoint.pt"], half)
    assert "step 4/4" in r.stdout
    full = common.load_checkpoint(str(full_dir / "checkpoint.pt"))
    resumed = common.load_checkpoint(str(half / "runs/part/checkpoint.pt"))
    assert resumed["step"] == full["step"] == 4
    for net in ("G", "D", "G_ema"):
        for k, t in full["state_dicts"][net].items():
            assert torch.equal(t, resumed["state_dicts"][net][k]), f"{net}.{k}"
    for name in ("G", "D", "D_through_wR"):
        for i, state in full["optimizers"][name]["state"].items():
            assert torch.equal(state["exp_avg"], resumed["optimizers"][name]["state"][i]["exp_avg"]), name


DDP_SCRIPT = """
import sys, torch, common, invgan
info = common.init_distributed(False)
args = invgan.parse_args(sys.argv[2:])
specs = invgan.model_specs(args, 1)
torch.manual_seed(0)
G, D = common.build_from_spec(specs["G"]), common.build_from_spec(specs["D"])
opt_g, opt_d, opt_dr = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (G, D, D))  # SGD: no Adam sign noise
g = torch.Generator().manual_seed(0)
x = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
z_d, z_g = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
if info.enabled:  # each rank: its real half (codes w_R) first, then the rest of its share; half of the z
    r = info.rank
    x = torch.cat([x[:4][r * 2 : r * 2 + 2], x[4:][r * 2 : r * 2 + 2]])
    z_d, z_g = z_d[r * 2 : r * 2 + 2], z_g[r * 2 : r * 2 + 2]
for _ in range(2):
    invgan.d_step(G, D, opt_d, x, args, r1_weight=10.0, z=z_d)
    invgan.g_step(G, D, opt_g, opt_dr, x, args, z=z_g)
state = {**{"G." + k: v for k, v in G.state_dict().items()}, **{"D." + k: v for k, v in D.state_dict().items()}}
torch.save(state, sys.argv[1] + f".rank{info.rank}")
common.cleanup_distributed()
"""


def test_two_gloo_ranks_equal_one_process_on_the_global_batch(tmp_path):
    """Two D + G steps of the full model (R1, BatchNorm over the global batch, D's step through w_R) on 2 ranks with
    half the batch each equal the same steps in one process. MMD is off: it is estimated per rank (not a mean)."""
    script = tmp_path / "ddp_steps.py"
    script.write_text(DDP_SCRIPT)
    flags = [*TINY, "--lambda-mmd", "0"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = str(tmp_path / "state")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(script),
        out,
        *flags,
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    s0, s1 = (torch.load(f"{out}.rank{i}", weights_only=True) for i in (0, 1))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    r = subprocess.run([sys.executable, str(script), out + ".one", *flags], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    single = torch.load(out + ".one.rank0", weights_only=True)
    assert set(single) == set(s1)
    for k in s1:
        assert torch.allclose(s1[k].double(), single[k].double(), atol=2e-5), k


def test_torchrun_training_with_stylegan2_keeps_ranks_identical(tmp_path):
    """The script under torchrun (with the StyleGAN2 architecture and its plain-lr D, so those run too): ranks checked
    identical, and the style-mixing grids written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        os.path.join(ROOT, "invgan.py"),
        *TINY,
        "--arch",
        "stylegan2",
        "--n-mapping",
        "2",
        "--images",
        "16",
        "--d-lr-mode",
        "plain",
        "--run-name",
        "ddp",
    ]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "identical on 2 ranks" in r.stdout and "2 steps of 8" in r.stdout
    ckpt = common.load_checkpoint(str(tmp_path / "runs/ddp/checkpoint.pt"))
    assert len(ckpt["rng"]) == 2 and ckpt["model_specs"]["G"]["class"] == "StyleGAN2Generator"
    for group in ("coarse", "middle", "fine"):  # section 4.2's style mixing, StyleGAN2 only
        assert (tmp_path / f"runs/ddp/edit_style_mixing_{group}.png").is_file()

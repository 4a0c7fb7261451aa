"""dlsgan.py: the method's pieces against closed forms (scipy), smoke runs of every flag combination by
subprocess (CleanRL style), exact resume, 2-rank DDP, copy-ability and bad input."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import common
from conftest import free_port
import dlsgan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch", "stylegan2", "--resolution", "16", "--width", "8", "--latent-dim", "16", "--w-dim", "16", "--n-mapping", "2", "--batch-size", "8",
        "--eval-images", "16", "--eval-every", "2", "--save-every", "2", "--log-every", "1", "--v-window", "32",
        "--no-track"]  # fmt: skip


def run(args, cwd, check=True, script=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    cmd = [sys.executable, script or os.path.join(ROOT, "dlsgan.py"), *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    return r


# ------------------------------------------------------------------------------------------------- the method
def test_latent_scale_sums_to_d_and_is_one_for_uniform_v():
    v = torch.rand(64) + 0.01
    s = dlsgan.latent_scale(v)
    assert (s**2).sum().item() == pytest.approx(64, rel=1e-5)
    assert torch.allclose(dlsgan.latent_scale(torch.full((64,), 0.37)), torch.ones(64))
    ratio = s / torch.sqrt(v)  # s is proportional to sqrt(v)
    assert torch.allclose(ratio, ratio[0].expand(64), rtol=1e-5)


def test_priors_have_mean_zero_variance_one():
    g = torch.Generator().manual_seed(0)
    for dist in ("normal", "uniform"):
        z = dlsgan.sample_z(200_000, 4, dist, "cpu", g)
        assert z.mean().abs() < 0.01 and (z.var() - 1).abs() < 0.01
    u = dlsgan.sample_z(100_000, 1, "uniform", "cpu", g)
    assert u.max() <= math.sqrt(3) and u.min() >= -math.sqrt(3) and u.max() > 1.72


def test_entropy_matches_scipy_and_monte_carlo():
    from scipy import stats

    s = torch.tensor([0.3, 1.0, 2.5])
    ref_normal = sum(stats.norm(scale=float(si)).entropy() for si in s)
    ref_uniform = sum(
        stats.uniform(loc=-math.sqrt(3) * float(si), scale=2 * math.sqrt(3) * float(si)).entropy() for si in s
    )
    assert dlsgan.latent_entropy(s, "normal") == pytest.approx(ref_normal, rel=1e-9)
    assert dlsgan.latent_entropy(s, "uniform") == pytest.approx(ref_uniform, rel=1e-9)
    # Monte-Carlo: -E[log p(z*s)] for the scaled normal
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400_000, 3, generator=g, dtype=torch.float64) * s.double()
    log_p = (-0.5 * (x / s.double()) ** 2 - torch.log(s.double() * math.sqrt(2 * math.pi))).sum(1)
    assert dlsgan.latent_entropy(s, "normal") == pytest.approx(-log_p.mean().item(), abs=0.01)
    assert dlsgan.latent_entropy(torch.ones(512), "normal") == pytest.approx(512 * 0.5 * math.log(2 * math.pi * math.e))


def test_predicted_variance_window_and_ema():
    v = dlsgan.PredictedVariance(3, "window", window_batches=2)
    assert torch.equal(v.value, torch.ones(3))  # starts at 1: s = 1
    for c in (1.0, 2.0, 3.0):
        v.update(torch.full((4, 3), c))  # batch mean of z_hat^2 = c^2
    assert torch.allclose(v.value, torch.full((3,), (4.0 + 9.0) / 2))  # only the last two batches
    e = dlsgan.PredictedVariance(2, "ema", ema=0.9)
    e.update(torch.full((5, 2), 2.0))
    assert torch.allclose(e.value, torch.full((2,), 0.9 * 1 + 0.1 * 4))
    restored = dlsgan.PredictedVariance(3, "window", window_batches=2)
    restored.load_state_dict(v.state_dict())
    assert torch.equal(restored.value, v.value) and restored.pointer == v.pointer


def test_dims_carrying():
    s = torch.sqrt(torch.tensor([7.0, 1.0, 1.0, 1.0]))  # sum s^2 = 10 = 4 * 2.5 (not normalized: fine here)
    assert (
        dlsgan.dims_carrying(s, 0.69) == 1 and dlsgan.dims_carrying(s, 0.71) == 2 and dlsgan.dims_carrying(s, 1.0) == 4
    )


# ------------------------------------------------------------------------------------------------- smoke runs
@pytest.mark.parametrize(
    "flags",
    [
        ["--dist", "normal"],
        ["--dist", "uniform", "--dg"],
        ["--dist", "uniform", "--no-dls"],
        ["--dist", "normal", "--dg", "--no-dls", "--v-update", "ema", "--r1-interval", "1"],
        ["--arch", "dcgan", "--dg", "--loss", "hinge", "--dataset", "fashion-mnist"],
    ],
    ids=["dls-d-normal", "dls-dg-uniform", "nodls-d-uniform", "nodls-dg-normal-ema", "dcgan-fashion"],
)
def test_smoke_flag_combinations(flags, tmp_path):
    r = run([*TINY, *flags, "--images", "32", "--run-name", "smoke"], tmp_path)
    assert "eval @ 4" in r.stdout and "ETA" in r.stdout
    run_dir = tmp_path / "runs" / "smoke"
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [2, 4]
    for key in ("losses/L_enc", "losses/D", "losses/G", "eval/real_psnr", "eval/real_ssim", "eval/fake_psnr",
                "eval/fake_ssim", "charts/latent_entropy", "charts/dims_90pct_scale"):  # fmt: skip
        assert math.isfinite(rows[-1][key]), key
    for png in ("samples.png", "reconstructions.png", "fig17_top_dim.png"):
        assert (run_dir / png).stat().st_size > 100
    ckpt = common.load_checkpoint(str(run_dir / "checkpoint.pt"))
    assert ckpt["step"] == 4 and ckpt["method"] == "dlsgan" and ckpt["format"] == common.CHECKPOINT_FORMAT
    s = ckpt["inversion"]["latent_scale"]
    if "--no-dls" in flags:
        assert torch.equal(s, torch.ones(16))
    else:
        assert (s**2).sum().item() == pytest.approx(16, rel=1e-4) and not torch.equal(s, torch.ones(16))
    # the checkpoint contract: rebuildable from specs alone, without importing dlsgan.py
    G = common.build_from_spec(ckpt["model_specs"]["G"])
    G.load_state_dict(ckpt["state_dicts"]["G_ema"])
    D = common.build_from_spec(ckpt["model_specs"]["D"])
    D.load_state_dict(ckpt["state_dicts"]["D"])
    assert G(D(torch.zeros(2, G.img_channels, 16, 16))[1] * s).shape == (2, G.img_channels, 16, 16)


def test_resume_is_exact(tmp_path):
    run([*TINY, "--dg", "--images", "48", "--run-name", "full"], tmp_path)
    run([*TINY, "--dg", "--images", "24", "--run-name", "part"], tmp_path)
    r = run([*TINY, "--dg", "--images", "48", "--resume", "runs/part/checkpoint.pt"], tmp_path)
    assert "step 6/6" in r.stdout
    full = common.load_checkpoint(str(tmp_path / "runs/full/checkpoint.pt"))
    resumed = common.load_checkpoint(str(tmp_path / "runs/part/checkpoint.pt"))
    assert resumed["step"] == full["step"] == 6
    for net in ("G", "D", "G_ema"):
        for k, t in full["state_dicts"][net].items():
            assert torch.equal(t, resumed["state_dicts"][net][k]), f"{net}.{k}"
    assert torch.equal(full["v"]["window"], resumed["v"]["window"])
    assert torch.equal(full["inversion"]["latent_scale"], resumed["inversion"]["latent_scale"])


def test_ddp_two_ranks_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(ROOT, "dlsgan.py"), *TINY, "--dg", "--images", "32", "--run-name", "ddp"]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parameters and latent scale identical on 2 ranks" in r.stdout
    assert "4 steps of 8" in r.stdout  # global batch 8 = 2 ranks x 4
    ckpt = common.load_checkpoint(str(tmp_path / "runs/ddp/checkpoint.pt"))
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 4


def test_copy_two_files_into_empty_dir(tmp_path):
    for f in ("dlsgan.py", "common.py"):
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    run([*TINY, "--images", "16", "--run-name", "copied"], tmp_path, script=str(tmp_path / "dlsgan.py"))
    assert (tmp_path / "runs/copied/checkpoint.pt").exists()


def test_bad_input_one_line_errors(tmp_path):
    r = run([*TINY, "--dataset", "imagenet"], tmp_path, check=False)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "unknown dataset 'imagenet'" in r.stderr
    r = run([*TINY, "--resolution", "24"], tmp_path, check=False)
    assert r.returncode != 0 and "power of two" in r.stderr and "Traceback" not in r.stderr
    r = run([*TINY, "--resolution", "8"], tmp_path, check=False)  # too small for SSIM's window
    assert r.returncode != 0 and "power of two >= 16" in r.stderr and "Traceback" not in r.stderr
    run([*TINY, "--images", "16", "--run-name", "a"], tmp_path)
    before = (tmp_path / "runs/a/checkpoint.pt").read_bytes()
    r = run([*TINY, "--images", "32", "--latent-dim", "32", "--resume", "runs/a/checkpoint.pt"], tmp_path, check=False)
    assert r.returncode != 0 and "--latent-dim is 32 but the checkpoint was trained with 16" in r.stderr
    assert "Traceback" not in r.stderr
    r = run([*TINY, "--images", "16", "--run-name", "a"], tmp_path, check=False)  # would overwrite run a
    assert r.returncode != 0 and "already holds files" in r.stderr
    assert (tmp_path / "runs/a/checkpoint.pt").read_bytes() == before  # nothing written was lost
    r = run([*TINY, "--resume", "runs/missing.pt"], tmp_path, check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr

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
from conftest import Recording, free_port, run_cases, two_at_a_time

import common
import dlsgan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (
    "--arch stylegan2 --resolution 16 --width 8 --latent-dim 16 --w-dim 16 --n-mapping 2 --batch-size "
    "8 --eval-images 16 --eval-every 2 --save-every 2 --log-every 1 --v-window 32 --no-track"
).split()


def run(args, cwd, check=True, script=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    cmd = [sys.executable, script or os.path.join(ROOT, "dlsgan.py"), *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
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
        z = common.sample_z(200_000, 4, dist, "cpu", g)
        assert z.mean().abs() < 0.01 and (z.var() - 1).abs() < 0.01
    u = common.sample_z(100_000, 1, "uniform", "cpu", g)
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


def test_fig17_sweep_stays_in_the_priors_support():
    assert dlsgan.fig17_values("uniform").abs().max().item() == pytest.approx(math.sqrt(3))
    assert dlsgan.fig17_values("normal").tolist()[0] == -2.0 and len(dlsgan.fig17_values("normal")) == 9


def test_dims_carrying():
    s = torch.sqrt(torch.tensor([7.0, 1.0, 1.0, 1.0]))  # sum s^2 = 10 = 4 * 2.5 (not normalized: fine here)
    assert (
        dlsgan.dims_carrying(s, 0.69) == 1 and dlsgan.dims_carrying(s, 0.71) == 2 and dlsgan.dims_carrying(s, 1.0) == 4
    )


# ------------------------------------------------------------------------------------------------- the wiring


def tiny_nets(*flags):
    args = dlsgan.parse_args([*TINY, "--arch", "dcgan", *flags])
    specs = dlsgan.model_specs(args, 1)
    torch.manual_seed(0)
    return args, common.build_from_spec(specs["G"]), common.build_from_spec(specs["D"])


def test_d_step_feeds_G_z_times_s_weights_L_enc_by_s2_and_feeds_v():
    args, G, D = tiny_nets()
    G = Recording(G)
    s = torch.linspace(0.2, 1.8, 16)
    v = dlsgan.PredictedVariance(16, "window", window_batches=4)
    x_real = torch.rand(8, 1, 16, 16) * 2 - 1
    opt = torch.optim.Adam(D.parameters(), lr=0.0)  # lr 0: D is unchanged, so z_hat can be recomputed after
    torch.manual_seed(5)
    z = common.sample_z(8, 16, args.dist, "cpu")
    torch.manual_seed(5)
    out = dlsgan.d_step(G, D, opt, v, x_real, s, **dlsgan.step_kwargs(args))
    assert torch.equal(G.inputs[0], z * s)  # the generator gets the scaled latent
    with torch.no_grad():
        z_hat = D(G.net(z * s))[1]
    assert out["losses/L_enc"] == pytest.approx(((z - z_hat) ** 2 * s**2).mean().item(), rel=1e-5)
    assert abs(out["losses/L_enc"] - ((z - z_hat) ** 2).mean().item()) > 1e-3  # and s^2 matters
    assert torch.allclose(v.window[0], z_hat.square().mean(0), atol=1e-6)  # v is fed with the predicted codes
    assert torch.equal(v.window[1], torch.ones(16))


def test_g_step_feeds_z_times_s_and_adds_L_enc_only_with_dg():
    s = torch.linspace(0.2, 1.8, 16)
    for dg in (False, True):
        args, G, D = tiny_nets(*(["--dg"] if dg else []))
        G = Recording(G)
        opt = torch.optim.Adam(G.parameters(), lr=0.0)
        torch.manual_seed(3)
        z = common.sample_z(8, 16, args.dist, "cpu")
        torch.manual_seed(3)
        G.net.train()
        out = dlsgan.g_step(G, D, opt, s, 8, dg=args.dg, **dlsgan.step_kwargs(args))
        assert torch.equal(G.inputs[0], z * s)
        with torch.no_grad():
            G.net.train()
            logit, z_hat = D(G.net(z * s))
        adv = torch.nn.functional.softplus(-logit).mean().item()
        l_enc = ((z - z_hat) ** 2 * s**2).mean().item()
        assert out["losses/L_enc_G"] == pytest.approx(l_enc, rel=1e-4)
        assert out["losses/G"] == pytest.approx(adv + l_enc if dg else adv, rel=1e-4)


def test_evaluation_reconstructs_through_the_scale():
    args, G, D = tiny_nets()
    G = Recording(G.eval())
    s = torch.linspace(0.2, 1.8, 16)
    x_test = torch.rand(16, 1, 16, 16) * 2 - 1
    dlsgan.evaluate(G, D, s, x_test, args, torch.device("cpu"))
    gen = torch.Generator().manual_seed(args.seed + 12345)
    z = common.sample_z(16, 16, args.dist, "cpu", gen)
    with torch.no_grad():
        x_fake = G.net(z * s).clamp(-1, 1)
        expected = [z * s, D(x_fake)[1] * s, D(x_test)[1] * s]  # G(z s), G(E(G(z s)) s), G(E(x) s)
    assert len(G.inputs) == 3 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(G.inputs, expected))


# ------------------------------------------------------------------------------------------------- smoke runs
SMOKE = {
    "dls-d-normal": ["--dist", "normal"],
    "dls-dg-uniform": ["--dist", "uniform", "--dg"],
    "nodls-d-uniform": ["--dist", "uniform", "--no-dls"],
    "nodls-dg-normal-ema": ["--dist", "normal", "--dg", "--no-dls", "--v-update", "ema", "--r1-interval", "1"],
    "dcgan-fashion": ["--arch", "dcgan", "--dg", "--loss", "hinge", "--dataset", "fashion-mnist"],
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """{name: (completed run, its directory)}: every SMOKE run, each in a directory of its own, two at a time."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in SMOKE}
    calls = [
        lambda name=name: run([*TINY, *SMOKE[name], "--images", "32", "--run-name", "smoke"], dirs[name], check=False)
        for name in SMOKE
    ]
    return {name: (r, dirs[name]) for name, r in zip(SMOKE, two_at_a_time(calls))}


@pytest.mark.parametrize("name", SMOKE)
def test_smoke_flag_combinations(name, smoke_runs):
    flags, (r, tmp_path) = SMOKE[name], smoke_runs[name]
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    assert "eval @ 4" in r.stdout and "ETA" in r.stdout
    run_dir = tmp_path / "runs" / "smoke"
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [2, 4]
    for key in (
        "losses/L_enc",
        "losses/D",
        "losses/G",
        "eval/real_psnr",
        "eval/real_ssim",
        "eval/fake_psnr",
        "eval/fake_ssim",
        "charts/latent_entropy",
        "charts/dims_90pct_scale",
    ):
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


@pytest.mark.parametrize("arch", ["stylegan2", "dcgan"])
def test_resume_is_exact(arch, tmp_path):
    two_at_a_time(
        [
            lambda: run([*TINY, "--arch", arch, "--dg", "--images", "48", "--run-name", "full"], tmp_path),
            lambda: run([*TINY, "--arch", arch, "--dg", "--images", "24", "--run-name", "part"], tmp_path),
        ]
    )
    r = run([*TINY, "--arch", arch, "--dg", "--images", "48", "--resume", "runs/part/checkpoint.pt"], tmp_path)
    assert "step 6/6" in r.stdout
    full = common.load_checkpoint(str(tmp_path / "runs/full/checkpoint.pt"))
    resumed = common.load_checkpoint(str(tmp_path / "runs/part/checkpoint.pt"))
    assert resumed["step"] == full["step"] == 6
    for net in ("G", "D", "G_ema"):
        for k, t in full["state_dicts"][net].items():
            assert torch.equal(t, resumed["state_dicts"][net][k]), f"{net}.{k}"
    assert torch.equal(full["v"]["window"], resumed["v"]["window"])
    assert torch.equal(full["inversion"]["latent_scale"], resumed["inversion"]["latent_scale"])


@pytest.mark.parametrize("arch", ["dcgan", "stylegan2"])
def test_ddp_two_ranks_identical(arch, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        os.path.join(ROOT, "dlsgan.py"),
        *TINY,
        "--arch",
        arch,
        "--dg",
        "--images",
        "32",
        "--run-name",
        "ddp",
    ]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parameters, BatchNorm statistics and latent scale identical on 2 ranks" in r.stdout
    assert "4 steps of 8" in r.stdout  # global batch 8 = 2 ranks x 4
    ckpt = common.load_checkpoint(str(tmp_path / "runs/ddp/checkpoint.pt"))
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 4


def test_lazy_r1_takes_its_own_adam_step(tmp_path):
    two_at_a_time(
        [
            lambda: run([*TINY, "--images", "40", "--r1-interval", "4", "--run-name", "r1"], tmp_path),
            lambda: run([*TINY, "--images", "40", "--r1-interval", "1", "--run-name", "r1_every"], tmp_path),
        ]
    )
    # run r1: 5 steps, R1 at 0 and 4
    ckpt = common.load_checkpoint(str(tmp_path / "runs/r1/checkpoint.pt"))
    d_steps = {int(state["step"]) for state in ckpt["optimizers"]["D"]["state"].values()}
    g_steps = {int(state["step"]) for state in ckpt["optimizers"]["G"]["state"].values()}
    assert g_steps == {5} and d_steps == {5, 5 + 2}  # the latent head has no part in R1: it keeps 5
    assert ckpt["optimizers"]["D"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 4 / 5)  # StyleGAN2's k/(k+1)
    ckpt = common.load_checkpoint(str(tmp_path / "runs/r1_every/checkpoint.pt"))  # R1 folded: no extra step
    assert {int(state["step"]) for state in ckpt["optimizers"]["D"]["state"].values()} == {5}
    assert ckpt["optimizers"]["D"]["param_groups"][0]["lr"] == pytest.approx(1e-3)


def test_ema_generator_has_its_own_batchnorm_statistics(tmp_path):
    run([*TINY, "--arch", "dcgan", "--images", "80", "--run-name", "bn"], tmp_path)
    ckpt = common.load_checkpoint(str(tmp_path / "runs/bn/checkpoint.pt"))
    G_ema = common.build_from_spec(ckpt["model_specs"]["G"])
    G_ema.load_state_dict(ckpt["state_dicts"]["G_ema"])
    saved = {k: t.clone() for k, t in G_ema.state_dict().items() if "running" in k}
    assert saved, "the DCGAN generator has BatchNorm"
    s = ckpt["inversion"]["latent_scale"]
    args = dlsgan.parse_args([*TINY, "--arch", "dcgan"])
    # the statistics of the EMA weights themselves, recomputed here
    common.recalibrate_generator(G_ema, args.latent_dim, args.seed, torch.device("cpu"), args.dist, scale=s)
    for k, t in saved.items():
        assert torch.allclose(t, G_ema.state_dict()[k], atol=1e-5), k
        assert not torch.allclose(t, ckpt["state_dicts"]["G"][k], atol=1e-3), k  # not the live G's


def test_copy_two_files_into_empty_dir(tmp_path):
    for f in ("dlsgan.py", "common.py"):
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    run([*TINY, "--images", "16", "--run-name", "copied"], tmp_path, script=str(tmp_path / "dlsgan.py"))
    assert (tmp_path / "runs/copied/checkpoint.pt").exists()


def test_resume_with_other_architecture_flags_or_over_a_run_is_refused(tmp_path):
    """The generic one-line refusals are the table in test_bad_input.py; these need a real run first."""
    run([*TINY, "--images", "16", "--run-name", "a"], tmp_path)
    before = (tmp_path / "runs/a/checkpoint.pt").read_bytes()
    other_flags, other_lr, overwrite = run_cases(
        [  # the refusals in one process (conftest.run_cases)
            ("dlsgan.py", [*TINY, "--images", "32", "--latent-dim", "32", "--resume", "runs/a/checkpoint.pt"]),
            ("dlsgan.py", [*TINY, "--images", "32", "--lr", "0.5", "--resume", "runs/a/checkpoint.pt"]),
            ("dlsgan.py", [*TINY, "--images", "16", "--run-name", "a"]),  # would overwrite run a
        ],
        cwd=tmp_path,
    )
    assert other_flags["status"] != 0 and "Traceback" not in other_flags["stderr"]
    assert "--latent-dim is 32 but the checkpoint was trained with 16" in other_flags["stderr"]
    # Adam's restored state would silently keep the old lr and betas: a changed one is refused
    assert other_lr["status"] != 0 and "--lr is 0.5 but the checkpoint was trained with 0.001" in other_lr["stderr"]
    assert overwrite["status"] != 0 and "already holds files" in overwrite["stderr"]
    assert other_flags["changed"] == other_lr["changed"] == overwrite["changed"] == []
    assert (tmp_path / "runs/a/checkpoint.pt").read_bytes() == before  # nothing written was lost


def test_resume_continues_in_the_checkpoints_directory_not_a_namesake(tmp_path):
    """A checkpoint copied to x/t0 and resumed from a directory whose runs/t0 holds another run: the resumed run
    writes to x/t0 (its own checkpoint is updated) and runs/t0 is left byte for byte."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    two_at_a_time(
        [
            lambda: run([*TINY, "--images", "16", "--run-name", "t0"], tmp_path / "a"),
            lambda: run([*TINY, "--images", "16", "--seed", "2", "--run-name", "t0"], tmp_path / "b"),
        ]
    )
    # b/runs/t0 is another run of the same name
    (tmp_path / "x/t0").mkdir(parents=True)
    shutil.copy(tmp_path / "a/runs/t0/checkpoint.pt", tmp_path / "x/t0/checkpoint.pt")
    other = {p.name: p.read_bytes() for p in (tmp_path / "b/runs/t0").iterdir()}
    run([*TINY, "--images", "32", "--resume", str(tmp_path / "x/t0/checkpoint.pt")], tmp_path / "b")
    assert {p.name: p.read_bytes() for p in (tmp_path / "b/runs/t0").iterdir()} == other
    assert common.load_checkpoint(str(tmp_path / "x/t0/checkpoint.pt"))["step"] == 4
    assert (tmp_path / "x/t0/metrics.jsonl").exists() and (tmp_path / "x/t0/samples.png").exists()


def test_ablation_reuses_only_runs_of_the_same_configuration(tmp_path):
    """The drivers run in one process on each side of the checkpoint edit (conftest.run_cases); the training runs
    they start are processes of their own, as always."""
    args = [*TINY, "--arch", "dcgan", "--images", "16", "--ablation", "--jobs", "2"]
    first, again = run_cases([("dlsgan.py", args), ("dlsgan.py", args)], cwd=tmp_path)
    assert first["status"] == 0, first["stdout"][-1500:] + first["stderr"][-3000:]
    (out_dir,) = [p for p in (tmp_path / "runs").iterdir() if (p / "table.md").exists()]
    table_md = os.path.relpath(out_dir / "table.md", tmp_path)
    assert again["status"] == 0 and again["digest"][table_md] == first["digest"][table_md]  # the first run's table
    table = (out_dir / "table.md").read_text()
    assert "dcgan width 8" in table and "d = 16" in table and table.count("\n| ") == 5  # header + 4 variants
    assert (out_dir / "l_enc.png").stat().st_size > 1000
    assert again["stdout"].count("reusing the finished run") == 4
    # a run directory of this ablation holding a run of other settings is refused, not relabelled
    ckpt_path = next(p for p in (tmp_path / "runs").iterdir() if p.name.endswith("__DLS_D")) / "checkpoint.pt"
    ckpt = common.load_checkpoint(str(ckpt_path))
    ckpt["args"]["lambda_enc"] = 0.5
    common.save_checkpoint(ckpt, str(ckpt_path))
    # other settings go to another ablation directory
    refused, other = run_cases(
        [("dlsgan.py", args), ("dlsgan.py", [*args, "--latent-dim", "8", "--images", "8"])], cwd=tmp_path
    )
    assert refused["status"] != 0
    assert "was run with --lambda-enc 0.5 but this ablation asks for 1.0" in refused["stderr"]
    assert other["status"] == 0, other["stdout"][-1500:] + other["stderr"][-3000:]
    assert len([p for p in (tmp_path / "runs").iterdir() if (p / "table.md").exists()]) == 2

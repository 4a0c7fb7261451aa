"""The run lifecycle (common.Run, common.parse_run_args, common.RunDirectory), tried the way a user breaks it: two
runs on one directory, an unwritable directory, a resume with other flags, a kill after logging past the last
checkpoint, a kill during the first save, refusals under torchrun, a stage on another data set than its generator,
and eval.py's own refusals. Each test failed on main before the lifecycle moved into common.py."""

import fcntl
import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT, SUBPROCESS_ENV, run_cases, script_command, two_at_a_time

import common

TINY = (
    "--resolution 16 --width 8 --latent-dim 16 --batch-size 8 --eval-images 16 --v-window 32 "
    "--no-track --seed 3 --eval-every 2 --save-every 4 --log-every 1"
).split()
DLSGAN = os.path.join(ROOT, "dlsgan.py")
TIMING = ("images_per_sec", "peak_memory_mb")


def dlsgan(cwd, *args, check=True, nproc=1):
    r = subprocess.run(
        script_command(DLSGAN, [*TINY, *args], nproc), cwd=cwd, env=SUBPROCESS_ENV, capture_output=True, text=True
    )
    if check:
        assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    return r


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith(TIMING)} for line in f]


def tensors(path):
    flat = {}

    def walk(obj, prefix):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k not in ("args",):
                    walk(v, f"{prefix}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}/{i}")
        elif isinstance(obj, torch.Tensor):
            flat[prefix] = obj

    walk(torch.load(path, weights_only=True), "")
    return flat


def assert_same_checkpoint(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """runs/plain: 4 steps without --dg; runs/full: 8 uninterrupted steps (the reference of the resume tests)."""
    cwd = tmp_path_factory.mktemp("trained")
    two_at_a_time(
        [
            lambda: dlsgan(cwd, "--images", "32", "--run-name", "plain"),
            lambda: dlsgan(cwd, "--images", "64", "--run-name", "full"),
        ]
    )
    return cwd


# 3: every flag but the budget, cadence, workers and tracking is the checkpoint's; a changed one is refused
CHANGED_FLAGS = [
    ("--dg", None, "False"),
    ("--seed", "5", "3"),
    ("--loss", "hinge", "'logistic'"),
    ("--r1", "1", "10.0"),
    ("--lambda-enc", "2", "1.0"),
    ("--ema-kimg", "1", "10.0"),
    ("--dist", "uniform", "'normal'"),
]


@pytest.fixture(scope="module")
def changed_flag_results(trained):
    """Every case of CHANGED_FLAGS in one child process (conftest.run_cases)."""
    cases = [
        ("dlsgan.py", [*TINY, "--resume", "runs/plain/checkpoint.pt", flag, *([value] if value else [])])
        for flag, value, _ in CHANGED_FLAGS
    ]
    return dict(zip([c[0] for c in CHANGED_FLAGS], run_cases(cases, cwd=trained)))


@pytest.mark.parametrize("flag,value,recorded", CHANGED_FLAGS)
def test_resume_with_a_flag_that_changes_training_is_refused(changed_flag_results, flag, value, recorded):
    r = changed_flag_results[flag]
    assert r["status"] != 0 and len(r["stderr"].strip().splitlines()) == 1, r["stderr"]
    assert f"{flag} is" in r["stderr"] and f"the checkpoint was trained with {recorded}" in r["stderr"], r["stderr"]
    assert r["changed"] == []


def test_resume_takes_the_recorded_flags_and_may_change_the_budget(trained, tmp_path):
    """Resumed with no flag but a longer budget: the run continues with its own flags (not the parser's defaults)."""
    shutil.copytree(trained / "runs" / "plain", tmp_path / "runs" / "plain")
    r = subprocess.run(
        script_command(DLSGAN, ["--resume", "runs/plain/checkpoint.pt", "--images", "48"]),
        cwd=tmp_path,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "runs/plain/checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["args"]["latent_dim"] == 16 and ckpt["args"]["dg"] is False
    assert [row["step"] for row in rows(tmp_path / "runs/plain")] == [2, 4, 6]


def test_a_mistyped_resume_path_never_restarts_a_run_that_saved(trained, tmp_path):
    """The restart of a never-saved run needs run.json and no checkpoint.pt or summary.json: a typo is an error."""
    shutil.copytree(trained / "runs" / "plain", tmp_path / "runs" / "plain")
    (tmp_path / "runs" / "gone").mkdir()
    shutil.copy(trained / "runs/plain/run.json", tmp_path / "runs/gone/run.json")
    (tmp_path / "runs/gone/summary.json").write_text("{}")  # finished, then its checkpoint was deleted
    cases = [
        ("dlsgan.py", ["--resume", "runs/plain/checkpoint.pth"]),
        ("dlsgan.py", ["--resume", "runs/gone/checkpoint.pt"]),
    ]
    for r in run_cases(cases, cwd=tmp_path):
        assert r["status"] != 0 and "does not exist" in r["stderr"] and r["changed"] == [], r["stderr"]


def test_resume_accepts_written_flags_of_the_same_value_and_a_torn_last_row(trained, tmp_path):
    shutil.copytree(trained / "runs" / "plain", tmp_path / "runs" / "plain")
    with open(tmp_path / "runs/plain/metrics.jsonl", "a") as f:
        f.write('{"step": 6, "losses/D": 1.')  # killed while writing a row
    dlsgan(tmp_path, "--resume", "runs/plain/checkpoint.pt", "--images", "48", "--latent-dim", "16", "--lr", "1e-3")
    assert [row["step"] for row in rows(tmp_path / "runs/plain")] == [2, 4, 6]


# 4: rows logged after the last checkpoint by a killed run are dropped on resume
def test_killed_after_logging_past_its_checkpoint_resumes_to_the_uninterrupted_run(trained, tmp_path):
    dlsgan(tmp_path, "--images", "32", "--run-name", "x")  # checkpoint at step 4
    shutil.copy(tmp_path / "runs/x/checkpoint.pt", tmp_path / "step4.pt")
    dlsgan(tmp_path, "--resume", "runs/x/checkpoint.pt", "--images", "48")  # logs step 6 ...
    shutil.copy(tmp_path / "step4.pt", tmp_path / "runs/x/checkpoint.pt")  # ... and dies before saving it
    assert [row["step"] for row in rows(tmp_path / "runs/x")] == [2, 4, 6]
    r = dlsgan(tmp_path, "--resume", "runs/x/checkpoint.pt", "--images", "64")
    assert "dropped 1 metrics row(s) logged after step 4" in r.stdout
    assert rows(tmp_path / "runs/x") == rows(trained / "runs/full")  # each step once, the same values
    assert_same_checkpoint(tmp_path / "runs/x/checkpoint.pt", trained / "runs/full/checkpoint.pt")


# 5: killed during its very first save: run.json is there, checkpoint.pt is not
def test_killed_during_the_first_save_is_resumable_from_step_0(trained, tmp_path):
    dlsgan(tmp_path, "--images", "64", "--run-name", "x")
    run_dir = tmp_path / "runs" / "x"
    for name in os.listdir(run_dir):
        if name not in ("run.json", ".lock", "metrics.jsonl"):
            os.remove(run_dir / name)
    (run_dir / "checkpoint.pt.tmp.12345").write_bytes(b"PK\x03\x04 torn")  # the save that was killed
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.write('{"step": 2, "losses/D": 1.0}\n')
    refused = dlsgan(tmp_path, "--images", "64", "--run-name", "x", check=False)
    assert refused.returncode != 0 and "pass --resume runs/x/checkpoint.pt" in refused.stderr
    r = dlsgan(tmp_path, "--resume", "runs/x/checkpoint.pt")  # the recorded flags, budget included
    assert "killed before its first save" in r.stdout
    assert not [n for n in os.listdir(run_dir) if ".tmp." in n]
    assert rows(run_dir) == rows(trained / "runs/full")
    assert_same_checkpoint(run_dir / "checkpoint.pt", trained / "runs/full/checkpoint.pt")


# 1: one process at a time owns a run directory
def test_a_run_directory_in_use_is_refused_and_left_alone(tmp_path):
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds it (it created the directory)
        [r] = run_cases([("dlsgan.py", [*TINY, "--images", "16", "--run-name", "busy"])], cwd=tmp_path)
    assert r["status"] != 0 and "is in use by another process" in r["stderr"], r["stderr"]
    assert len(r["stderr"].strip().splitlines()) == 1 and r["changed"] == []


def test_two_runs_started_together_on_one_name_one_wins(tmp_path):
    procs = [
        subprocess.Popen(
            script_command(DLSGAN, [*TINY, "--images", "32", "--run-name", "same"]),
            cwd=tmp_path,
            env=SUBPROCESS_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(), *p.communicate()) for p in procs]
    assert sorted(rc == 0 for rc, _, _ in results) == [False, True], results
    loser = next(err for rc, _, err in results if rc != 0)
    assert "in use by another process" in loser or "already holds files" in loser, loser
    assert [row["step"] for row in rows(tmp_path / "runs/same")] == [2, 4]  # one run's rows, once


def test_default_names_taken_in_the_same_second_get_a_suffix(tmp_path):
    os.chdir(tmp_path)
    first = common.RunDirectory("runs/mnist__x__1__100", {"args": {}}, False, False, "pass another --run-name")
    second = common.RunDirectory("runs/mnist__x__1__100", {"args": {}}, False, False, "pass another --run-name")
    assert (first.path, second.path) == ("runs/mnist__x__1__100", "runs/mnist__x__1__100-2")
    with pytest.raises(SystemExit, match="already holds files"):  # a name the user chose is never changed
        common.RunDirectory("runs/mnist__x__1__100", {"args": {}}, False, True, "pass another --run-name")
    first.release(), second.release()


# 2: a run directory that cannot be written is refused before training, and nothing is left
def test_an_unwritable_empty_run_directory_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    if os.geteuid() == 0:  # root writes anywhere chmod forbids; /proc/driver is an empty directory nobody can write
        if not os.path.isdir("/proc/driver") or os.listdir("/proc/driver"):
            pytest.skip("no empty unwritable directory to point at")
        os.symlink("/proc/driver", tmp_path / "runs" / "ro")
    else:
        (tmp_path / "runs" / "ro").mkdir()
        os.chmod(tmp_path / "runs" / "ro", 0o555)
    [r] = run_cases([("dlsgan.py", [*TINY, "--images", "16", "--run-name", "ro"])], cwd=tmp_path)
    assert r["status"] != 0 and "cannot write to run directory" in r["stderr"], r["stderr"]
    assert len(r["stderr"].strip().splitlines()) == 1 and r["changed"] == []


# 7: under torchrun every rank refuses with the same one line, also when only rank 0 could see the problem
def test_torchrun_refusals_are_one_line_on_every_rank(tmp_path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "metrics.jsonl").write_text('{"step": 1}\n')
    r = dlsgan(tmp_path, "--images", "16", "--run-name", "taken", nproc=2, check=False)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and lines[0] == lines[1] and "already holds files" in lines[0], r.stderr[-3000:]
    (tmp_path / "runs" / "busy").mkdir()
    with open(tmp_path / "runs" / "busy" / ".lock", "w") as lock:  # only rank 0 claims: rank 1 must hear of it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = dlsgan(tmp_path, "--images", "16", "--run-name", "busy", nproc=2, check=False)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and lines[0] == lines[1] and "in use by another process" in lines[0], r.stderr[-3000:]
    assert "[rank0]" not in r.stderr and "[rank1]" not in r.stderr  # no rank's traceback (torchrun adds its own)
    assert os.listdir(tmp_path / "runs" / "busy") == [".lock"]


# 8: a stage trained on another data set than its generator is refused
def test_lia_encoder_on_another_dataset_than_its_gan_is_refused(tmp_path):
    lia = ("--resolution 16 --width 8 --latent-dim 8 --n-mapping 2 --no-track --eval-images 16 --ppl-samples 0").split()
    r = subprocess.run(
        script_command(
            os.path.join(ROOT, "lia.py"),
            [*lia, "--stage", "gan", "--batch-size", "8", "--images", "16", "--run-name", "gan"],
        ),
        cwd=tmp_path,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    enc = [*lia, "--stage", "encoder", "--gan", "runs/gan/checkpoint.pt", "--batch-size", "4", "--images", "8"]
    [other, same_flag] = run_cases(
        [("lia.py", [*enc, "--dataset", "fashion-mnist"]), ("lia.py", [*enc, "--latent-dim", "16"])], cwd=tmp_path
    )
    assert (
        other["status"] != 0
        and "--dataset is 'fashion-mnist' but 'runs/gan/checkpoint.pt' was trained with 'mnist'" in other["stderr"]
    ), other["stderr"]
    assert "--latent-dim is 16 but" in same_flag["stderr"], same_flag["stderr"]
    assert other["changed"] == [] and same_flag["changed"] == []


# 9: eval.py checks its flags and inputs before its output directory exists
EVAL_CASES = [
    (["--n-recon", "0"], "--n-recon must be > 0"),
    (["--n-recon", "-3"], "--n-recon must be > 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--grid-images", "0"], "--grid-images must be > 0"),
    (["--kid-subsets", "0"], "--kid-subsets must be > 0"),
    (["--opt-lr", "nan"], "--opt-lr must be > 0"),
    (["--opt-steps", "-1"], "--opt-steps must be >= 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--baselines"], "has no encoder and no --baselines apply to it"),
]


@pytest.fixture(scope="module")
def eval_results(trained, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("eval_refusals")
    ckpt = common.load_checkpoint(str(trained / "runs/plain/checkpoint.pt"))
    ckpt["inversion"]["encoder"] = None  # a generator-only checkpoint
    common.save_checkpoint(ckpt, str(cwd / "gan.pt"))
    cases = [("eval.py", ["--ckpt", "gan.pt", "--n-fid", "0", "--no-semantic", *args]) for args, _ in EVAL_CASES]
    return run_cases(cases, cwd=cwd)


@pytest.mark.parametrize("case", range(len(EVAL_CASES)), ids=[" ".join(a) for a, _ in EVAL_CASES])
def test_eval_refuses_before_writing(eval_results, case):
    r, message = eval_results[case], EVAL_CASES[case][1]
    assert r["status"] != 0 and message in r["stderr"], r["stderr"]
    assert "Traceback" not in r["stderr"] and r["changed"] == []


def test_eval_defaults_names_the_unfinished_lia_directory(tmp_path):
    (tmp_path / "runs" / "quick__lia__mnist__gan").mkdir(parents=True)
    (tmp_path / "runs" / "quick__lia__mnist__gan" / "metrics.jsonl").write_text('{"step": 1}\n')
    [r] = run_cases([("eval.py", ["--defaults", "--quick", "--methods", "lia", "--train-only"])], cwd=tmp_path)
    assert r["status"] != 0 and "runs/quick__lia__mnist__gan exists but lia's default run is unfinished" in r["stderr"]
    assert r["changed"] == []


def test_eval_comparisons_started_together_get_their_own_directories(tmp_path):
    os.chdir(tmp_path)
    ns = __import__("argparse").Namespace(run_name=None, dataset="mnist", exp_name="eval", seed=0)
    a, b = common.claim_run_dir(ns, {"script": "eval.py"}), common.claim_run_dir(ns, {"script": "eval.py"})
    assert a.path != b.path and os.path.isfile(os.path.join(b.path, "run.json"))
    a.release(), b.release()

"""Bad input, for every training script: a table of (arguments, expected one-line message). Each case must exit
non-zero with exactly one line on stderr naming the problem, and leave the working directory exactly as it was
(nothing created, nothing changed). A new method script adds itself to SCRIPTS with its tiny flags, and its own
cases to EXTRA_CASES."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_cases, two_at_a_time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DLSGAN_TINY = (
    "--resolution 16 --width 8 --latent-dim 16 --batch-size 8 --eval-images 16 --v-window 32 --no-track --images 16"
).split()
INVGAN_TINY = (
    "--resolution 16 --width 8 --latent-dim 8 --w-dim 8 --batch-size 8 --eval-images 16 --no-track --images 16"
).split()
REGRESSOR_TINY = (
    "--stage gan --resolution 16 --width 8 --d-width 8 --latent-dim 16 --batch-size 8 --eval-images "
    "16 --no-track --images 16"
).split()
LIA_TINY = (
    "--stage gan --resolution 16 --width 8 --latent-dim 8 --n-mapping 2 --batch-size 8 --eval-images "
    "16 --ppl-samples 0 --no-track --images 16"
).split()
SCRIPTS = {
    "dlsgan.py": DLSGAN_TINY,
    "invgan.py": INVGAN_TINY,
    "regressor_inversion.py": REGRESSOR_TINY,
    "lia.py": LIA_TINY,
}

# (arguments, message); {tmp} is the prepared directory holding the inputs below
COMMON_CASES = [
    (["--latent-dim", "0"], "--latent-dim must be > 0 (got 0)"),
    (["--lr", "-0.1"], "--lr must be > 0 (got -0.1)"),
    (["--lr", "nan"], "--lr must be > 0 (got nan)"),
    (["--images", "-16"], "--images must be >= 0 (got -16)"),
    (["--epochs", "-1"], "--epochs must be >= 0 (got -1.0)"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--images", "4"], "--images 4 is less than one batch of 8"),
    (["--resolution", "24"], "--resolution must be a power of two"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset", "folder:{tmp}/empty"], "no readable images in"),
    (["--dataset", "folder:{tmp}/missing"], "does not exist"),
    (["--run-name", "../escape"], "must be a plain directory name"),
    (["--resume", "{tmp}/missing.pt"], "does not exist"),
    (["--resume", "{tmp}/random.pt"], "is not a checkpoint (neither a torch.save zip nor a pickle)"),
    (["--resume", "{tmp}/plain.pt"], "is not a ganinv/1 checkpoint of this project"),
    (["--resume", "{tmp}/other_method.pt"], "is a 'other-method' checkpoint, not a"),
    (["--resume", "{tmp}/truncated.pt"], "is corrupt or truncated"),
    (["--run-name", "taken"], "run directory 'runs/taken' already holds files"),
    (["--seed", "-1"], "--seed must be in [0, 2**32) (got -1)"),
    (["--imagez", "16"], "unrecognized arguments: --imagez 16; did you mean --images?"),
    (["--seed", "4294967296"], "--seed must be in [0, 2**32) (got 4294967296)"),
    (["--dataset", "folder:{tmp}/dangling"], "no readable images in"),
]
EXTRA_CASES = {
    "dlsgan.py": [
        (["--v-ema", "1.5"], "--v-ema must be in [0, 1)"),
        (["--betas", "0.9", "1.0"], "--betas must be in [0, 1)"),
        (["--resolution", "8"], "power of two >= 16"),
    ],
    "invgan.py": [
        (["--variant", "naive", "--lambda-fm", "1"], "--lambda-fm needs the real codes w_R in G's batch"),
        (["--no-real-codes"], "--grad-through-wr needs the real codes w_R in G's batch"),
        (["--batch-size", "5"], "--batch-size must be even and at least 4"),
        (["--n-mapping", "0", "--w-dim", "4"], "--n-mapping 0 means w = z"),
        (["--inpaint-size", "0"], "--inpaint-size must be in (0, 1)"),
    ],
    "lia.py": [
        (["--latent-dim", "7"], "--latent-dim must be even for coupling layers"),
        (["--stage", "encoder"], "the encoder stage needs --gan CKPT"),
        (["--stage", "refine"], "the refine stage needs --ckpt CKPT"),
        (["--stage", "encoder", "--gan", "{tmp}/other_method.pt"], "is a 'other-method' checkpoint, not a 'lia' one"),
        (["--stage", "all", "--lr", "0.1"], "--lr differs per stage"),
        (["--stage", "all", "--resume", "{tmp}/missing.pt"], "--stage all does not resume"),
        (["--gan", "{tmp}/missing.pt"], "--gan is for --stage encoder"),
        (["--mapping-lr-mul", "0"], "--mapping-lr-mul must be > 0"),
    ],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty").mkdir()
    (tmp / "dangling").mkdir()
    os.symlink(tmp / "gone.png", tmp / "dangling" / "a.png")  # a symlink to nothing: skipped, not a traceback
    (tmp / "random.pt").write_bytes(os.urandom(512).replace(b"\x80", b"\x01").replace(b"PK", b"pk"))
    common.save_checkpoint({"weights": torch.zeros(2)}, str(tmp / "plain.pt"))
    common.save_checkpoint({"format": common.CHECKPOINT_FORMAT, "method": "other-method"}, str(tmp / "other_method.pt"))
    common.save_checkpoint({"format": common.CHECKPOINT_FORMAT, "big": torch.zeros(10000)}, str(tmp / "whole.pt"))
    (tmp / "truncated.pt").write_bytes((tmp / "whole.pt").read_bytes()[:3000])
    (tmp / "runs" / "taken").mkdir(parents=True)
    (tmp / "runs" / "taken" / "metrics.jsonl").write_text('{"step": 1}\n')
    return tmp


CASES = [(script, args, msg) for script in SCRIPTS for args, msg in COMMON_CASES + EXTRA_CASES.get(script, [])]


@pytest.fixture(scope="module")
def case_results(inputs, tmp_path_factory):
    """{(script, args): {status, stderr, changed}}, every case of a script in one child process (conftest.run_cases:
    runpy as __main__, cwd = the prepared directory); ``changed`` lists the paths of the prepared directory that the
    case created, removed or modified (sha256 before and after). The same process then runs the script's tiny
    flags in a directory whose ``runs`` is a file: {(script, "runs is a file"): (result, that directory)}."""

    def one_script(script):  # in a copy of the inputs of its own, so two scripts' cases can run at once
        tmp = tmp_path_factory.mktemp(script.replace(".py", ""))
        shutil.copytree(inputs, tmp, dirs_exist_ok=True, symlinks=True)
        cases = [
            [a.replace("{tmp}", str(tmp)) for a in [*SCRIPTS[script], *args]] for s, args, _ in CASES if s == script
        ]
        runs_file = tmp_path_factory.mktemp("runs_file")
        (runs_file / "runs").write_text("not a directory")
        *results, last = run_cases([*((script, args) for args in cases), (script, SCRIPTS[script], runs_file)], cwd=tmp)
        keys = [(script, tuple(args)) for s, args, _ in CASES if s == script]
        return {**dict(zip(keys, results)), (script, "runs is a file"): (last, runs_file)}

    out = {}
    for part in two_at_a_time([lambda script=script: one_script(script) for script in SCRIPTS]):
        out.update(part)
    return out


@pytest.mark.parametrize("script,args,message", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_refused_in_one_line_and_nothing_written(script, args, message, inputs, case_results):
    result = case_results[(script, tuple(args))]
    assert result["status"] != 0, result
    stderr = result["stderr"]
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert message in stderr, stderr
    assert result["changed"] == []  # nothing created, nothing changed


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_being_a_file_is_refused(script, case_results):
    r, cwd = case_results[(script, "runs is a file")]
    assert r["status"] != 0 and "'runs' exists and is not a directory" in r["stderr"]
    assert "Traceback" not in r["stderr"]
    assert sorted(os.listdir(cwd)) == ["runs"] and r["changed"] == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_folder_with_a_truncated_jpeg_trains(script, tmp_path):
    """A truncated JPEG passes PIL's verify(); it must be skipped at the scan, not crash the DataLoader later."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for i in range(40):
        Image.fromarray(rng.randint(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    whole = (folder / "0.jpg").read_bytes()
    (folder / "0.jpg").write_bytes(whole[: len(whole) // 2])
    env_cache = {**os.environ, "GANINV_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, script),
            *SCRIPTS[script],
            "--dataset",
            f"folder:{folder}",
            "--run-name",
            "folder",
        ],
        cwd=tmp_path,
        env={**env_cache, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 1 of 40 files" in r.stdout and (tmp_path / "runs/folder/checkpoint.pt").exists()

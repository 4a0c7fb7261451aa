"""The numbers every script computes, pinned: fixed-seed tiny runs of every script and stage, with a digest of every
tensor and number of each checkpoint and every row of each metrics.jsonl (and the stage reports: ppl.json,
refine.json, final_metrics.json). tests/test_numbers.py reruns them and compares with tests/golden_numbers.json, so
a change that moves a number -- a refactor that should not, or a fix that must -- shows which number moved.

    python tests/golden.py --write     # re-record (only when a change is meant to move numbers; say which and why)
    python tests/golden.py             # rerun and compare, as the test does

Left out because they are not functions of the seed: timings (images/s, seconds, wall time), peak memory, paths.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden_numbers.json")
TIMING_KEYS = ("images_per_sec", "peak_memory_mb", "seconds", "wall_s", "seconds_per_image")
COMMON = ["--no-track", "--seed", "3", "--log-every", "2"]
DLSGAN = (
    "--resolution 16 --width 8 --latent-dim 16 --batch-size 8 --eval-images 16 --v-window 32 --images "
    "48 --eval-every 3 --save-every 3 --dist uniform --dg"
).split()
INVGAN = (
    "--resolution 16 --width 8 --latent-dim 8 --w-dim 8 --batch-size 8 --eval-images 16 --edit-images "
    "2 --images 48 --eval-every 3 --save-every 3"
).split()
LIA = (
    "--resolution 16 --width 8 --latent-dim 8 --n-mapping 2 --encoder-width 8 --eval-images 16 "
    "--eval-every 3 --save-every 3 --ppl-samples 10"
).split()
REG_GAN = (
    "--stage gan --resolution 16 --width 8 --d-width 8 --latent-dim 8 --batch-size 8 --eval-images 16 "
    "--images 48 --eval-every 3 --save-every 3"
).split()
REG = "--encoder-width 4 --batch-size 8 --images 32 --eval-images 16 --eval-every 2 --save-every 2".split()

# name: [(script, args)], run in order in one working directory; later runs read earlier runs' checkpoints
RUNS = {
    "dlsgan": [("dlsgan.py", [*DLSGAN, "--run-name", "dlsgan"])],
    "dlsgan_sg2": [
        (
            "dlsgan.py",
            [
                *DLSGAN,
                "--arch",
                "stylegan2",
                "--w-dim",
                "16",
                "--n-mapping",
                "2",
                "--d-lr-mode",
                "plain",
                "--r1-interval",
                "1",
                "--run-name",
                "dlsgan_sg2",
            ],
        )
    ],
    "invgan": [("invgan.py", [*INVGAN, "--run-name", "invgan"])],
    "invgan_naive": [
        ("invgan.py", [*INVGAN, "--variant", "naive", "--r1-interval", "1", "--run-name", "invgan_naive"])
    ],
    "lia": [
        ("lia.py", [*LIA, "--stage", "gan", "--batch-size", "8", "--images", "48", "--run-name", "lia_gan"]),
        (
            "lia.py",
            [
                *LIA,
                "--stage",
                "encoder",
                "--gan",
                "runs/lia_gan/checkpoint.pt",
                "--batch-size",
                "4",
                "--images",
                "24",
                "--run-name",
                "lia_encoder",
            ],
        ),
        (
            "lia.py",
            [
                *LIA,
                "--stage",
                "refine",
                "--ckpt",
                "runs/lia_encoder/checkpoint.pt",
                "--refine-images",
                "4",
                "--refine-steps",
                "5",
                "--run-name",
                "lia_refine",
            ],
        ),
    ],
    "regressor": [
        ("regressor_inversion.py", [*REG_GAN, "--run-name", "reg_gan"]),
        ("regressor_inversion.py", [*REG, "--generator", "runs/reg_gan/checkpoint.pt", "--run-name", "reg"]),
    ],
}


def digest_tree(obj, out: dict, prefix: str = ""):
    """Flatten a checkpoint into {path: digest}: a tensor's dtype, shape and sha256 of its bytes, a number as is."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if (
                str(k) in ("args", "gan_args", "gan_source", "encoder_source", "generator_source")
                or str(k) in TIMING_KEYS
            ):
                continue  # the command line (new flags may appear) and absolute paths are not numbers of the run
            digest_tree(obj[k], out, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        if obj and all(isinstance(v, (int, float, bool)) for v in obj) and len(obj) > 64:  # an RNG state
            out[prefix] = hashlib.sha256(json.dumps(list(obj)).encode()).hexdigest()[:16]
        elif obj and all(isinstance(v, (int, float, bool)) for v in obj):  # a curve: kept, to compare within rounding
            out[prefix] = list(obj)
        else:
            for i, v in enumerate(obj):
                digest_tree(v, out, f"{prefix}/{i}")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.reshape(-1).to(torch.uint8)
        out[prefix] = f"{t.dtype}{list(t.shape)}:{hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16]}"
    elif isinstance(obj, (int, float, bool)) or obj is None:
        out[prefix] = obj
    # strings (specs' class names, modes) are configuration, not numbers


def strip_timings(obj):
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items() if not any(t in k for t in TIMING_KEYS)}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj


def record_run(run_dir: str) -> dict:
    out = {"checkpoint": {}}
    digest_tree(torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True), out["checkpoint"])
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            out["metrics"] = [strip_timings(json.loads(line)) for line in f]
    for name in ("ppl.json", "refine.json", "final_metrics.json"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                report = strip_timings(json.load(f))
            report.pop("encoder_source", None)
            out[name] = report
    return out


def run_group(name: str, work: str) -> dict:
    """Run one group's commands in ``work`` (one thread each, as in the tests); {run name: record}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    records = {}
    for script, args in RUNS[name]:
        r = subprocess.run(
            [sys.executable, os.path.join(ROOT, script), *args, *COMMON],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(f"{script} {' '.join(args)} failed:\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}")
        run_name = args[args.index("--run-name") + 1]
        records[run_name] = record_run(os.path.join(work, "runs", run_name))
    return records


def machine() -> dict:
    """What decides the CPU kernels' rounding: two machines both named "AMD EPYC" (family 25, model 1 against
    another) gave other low bits, so the family, model and instruction-set flags are part of the fingerprint."""
    info = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    flags = hashlib.sha256(info.get("flags", "").encode()).hexdigest()[:12]
    cpu = f"{info.get('model name') or platform.processor()} family {info.get('cpu family')} model {info.get('model')}"
    return {
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_flags": flags,
        "machine": platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def record_all(groups=None) -> dict:
    import concurrent.futures

    groups = list(groups or RUNS)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {g: os.path.join(tmp, g) for g in groups}
        for d in dirs.values():
            os.makedirs(d)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two single-threaded processes for two cores
            results = dict(zip(groups, pool.map(lambda g: run_group(g, dirs[g]), groups)))
    return {k: v for g in groups for k, v in results[g].items()}


def differences(expected: dict, got: dict, limit: int = 12) -> list[str]:
    """Human-readable paths where two records differ."""
    out = []

    def walk(a, b, path):
        if len(out) >= limit:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if k not in a or k not in b:
                    out.append(f"{path}/{k}: {'missing' if k not in b else 'new'}")
                else:
                    walk(a[k], b[k], f"{path}/{k}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):  # nan == nan
            out.append(f"{path}: {a!r} -> {b!r}")

    walk(expected, got, "")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="pin (or check) the numbers of fixed-seed tiny runs of every script")
    p.add_argument("--write", action="store_true", help=f"re-record {os.path.relpath(GOLDEN, ROOT)}")
    a = p.parse_args()
    got = record_all()
    if a.write:
        with open(GOLDEN, "w") as f:
            json.dump({"machine": machine(), "runs": got}, f, indent=1, sort_keys=True)
        print(f"wrote {GOLDEN}: {len(got)} runs")
    else:
        with open(GOLDEN) as f:
            expected = json.load(f)
        diff = differences(expected["runs"], got)
        print("\n".join(diff) or f"all numbers of {len(got)} runs are identical to {os.path.relpath(GOLDEN, ROOT)}")
        sys.exit(1 if diff else 0)

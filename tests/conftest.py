import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    """A TCP port nothing listens on now, so torchrun's rendezvous never collides with another process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recording(torch.nn.Module):
    """Wraps a network and keeps every input it was called with (for the wiring tests)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One child process runs a list of cases, each as ``python SCRIPT ARGS`` would (runpy as __main__, sys.argv set, in
# the case's working directory): a table of refusals then costs one torch import, not one per case. For every case it
# records the exit status, stdout, stderr and ``changed``: the paths under the working directory that the case
# created, removed or modified (sha256 of every file before and after). Only for cases whose outcome cannot depend
# on what an earlier case left in the interpreter: refusals, a run whose files are all that is checked, an ablation
# driver (its training runs are processes of their own). Exact resume and training runs stay one process each.
CASE_RUNNER = r"""
import contextlib, hashlib, io, json, os, runpy, sys, traceback
cases, out_path = json.load(open(sys.argv[1])), sys.argv[2]
results = []
def tree_digest(root):
    out = {}
    for dirpath, dirnames, names in os.walk(root):
        for name in dirnames + names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = ("link:" + os.readlink(path) if os.path.islink(path) else
                hashlib.sha256(open(path, "rb").read()).hexdigest() if name in names else "dir")
    return out
for script, args, cwd in cases:
    os.chdir(cwd)
    before = tree_digest(".")
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        sys.argv = [script, *args]
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:  # what the interpreter would print and return for it
            status = 0 if e.code in (None, 0) else e.code if isinstance(e.code, int) else 1
            if e.code not in (None, 0) and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException:
            status = 1
            traceback.print_exc()
    after = tree_digest(".")
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    results.append({"status": status, "stdout": out.getvalue(), "stderr": err.getvalue(), "changed": changed,
                    "digest": after})
json.dump(results, open(out_path, "w"))
"""


def run_cases(cases, cwd=None) -> list[dict]:
    """cases: [(script, args)] (in ``cwd``) or [(script, args, cwd)], script relative to the repository root. All
    of them run in one child process (CASE_RUNNER), in order, with one thread; returns one {status, stdout, stderr,
    changed, digest} per case, ``digest`` being {path: sha256 or "dir"} of its working directory after it ran."""
    full = [(os.path.join(ROOT, c[0]), [str(a) for a in c[1]], str(c[2] if len(c) > 2 else cwd)) for c in cases]
    with tempfile.TemporaryDirectory() as work:  # outside every working directory: not in their digests
        with open(os.path.join(work, "cases.json"), "w") as f:
            json.dump(full, f)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        r = subprocess.run(
            [sys.executable, "-c", CASE_RUNNER, os.path.join(work, "cases.json"), os.path.join(work, "results.json")],
            cwd=full[0][2],
            env=env,
            check=False,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        with open(os.path.join(work, "results.json")) as f:
            return json.load(f)


def two_at_a_time(calls: list) -> list:
    """Call the zero-argument ``calls`` (each running one single-threaded subprocess to the end) two at a time, for
    the two CPU cores; returns their results in order and re-raises the first failure (an assertion of a call)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda call: call(), calls))


# ------------------------------------------------------------------ training scripts run by subprocess, two at a time
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}


def script_command(script, args, nproc=1):
    """``python script args``, or under torchrun with ``nproc`` processes on a free port."""
    if nproc == 1:
        return [sys.executable, script, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        script,
        *args,
    ]


def run_jobs(jobs, jobs_at_once=2):
    """jobs: {name: (cmd, cwd)} or {name: (cmd, cwd, after)}; runs them ``jobs_at_once`` at a time, in order, the
    next one as soon as any finishes; a job with ``after`` waits until the job of that name has finished. Returns
    {name: CompletedProcess-like dict}. Output goes to files (a pipe that fills up would stall a polled child)."""
    assert all(len(job) < 3 or job[2] in jobs for job in jobs.values())
    pending, running, done = list(jobs.items()), [], {}
    with tempfile.TemporaryDirectory() as logs:
        while pending or running:
            for name, job in [(n, j) for n, j in pending if len(j) < 3 or j[2] in done]:
                if len(running) == jobs_at_once:
                    break
                pending.remove((name, job))
                out, err = (open(os.path.join(logs, f"{name}.{kind}"), "w+") for kind in ("out", "err"))
                proc = subprocess.Popen(job[0], cwd=job[1], env=SUBPROCESS_ENV, stdout=out, stderr=err, text=True)
                running.append((name, proc, out, err, time.monotonic()))
            time.sleep(0.05)
            for item in list(running):
                name, proc, out, err, started = item
                if proc.poll() is None:  # no time limit: a loaded machine is slow, not broken
                    continue
                running.remove(item)
                out.seek(0), err.seek(0)
                done[name] = {"returncode": proc.returncode, "stdout": out.read(), "stderr": err.read()}
                out.close(), err.close()
    return done


def ok(r):
    assert r["returncode"] == 0, r["stdout"][-1500:] + r["stderr"][-3000:]
    return r


def odd_image_folder(root) -> dict:
    """A folder of real MNIST test digits in odd forms, as a user's folder might be: grayscale, 16-bit, RGBA, JPEG,
    a 48 x 32 image, a 96 px BMP, a sub-folder with a second 'gray.png', plus three files that are no image (a
    truncated JPEG, an empty PNG, a text file). Returns {name eval.py gives it: the 28 x 28 digit (uint8)}."""
    import numpy as np
    from PIL import Image

    import common

    root = str(root)
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    digits = [common.build_dataset("mnist", 32, train=False).images[i, 0, 2:30, 2:30].numpy() for i in range(8)]
    Image.fromarray(digits[0]).save(os.path.join(root, "gray.png"))
    Image.fromarray(digits[1].astype(np.uint16) * 257).save(os.path.join(root, "sixteen.png"))
    rgba = np.stack([digits[2]] * 3 + [np.full_like(digits[2], 255)], -1)
    Image.fromarray(rgba, "RGBA").save(os.path.join(root, "rgba.png"))
    Image.fromarray(digits[3]).convert("RGB").save(os.path.join(root, "photo.jpg"), quality=95)
    Image.fromarray(np.pad(digits[4], ((2, 2), (10, 10)))).save(os.path.join(root, "wide.png"))  # 48 x 32
    Image.fromarray(digits[5]).resize((96, 96), Image.BICUBIC).save(os.path.join(root, "big.bmp"))
    Image.fromarray(digits[6]).save(os.path.join(root, "sub", "nested.png"))
    Image.fromarray(digits[7]).save(os.path.join(root, "sub", "gray.png"))
    with open(os.path.join(root, "photo.jpg"), "rb") as f:
        data = f.read()
    with open(os.path.join(root, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    open(os.path.join(root, "empty.png"), "wb").close()
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an image\n")
    names = ["gray", "sixteen", "rgba", "photo", "wide", "big", "sub__nested", "sub__gray"]
    return dict(zip(names, digits))

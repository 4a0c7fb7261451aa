"""Every documented command runs as written: each shell command of README.md, docs/*.md and the scripts' docstrings
that runs one of the scripts is parsed by that script's own parser (a flag that does not exist, or a value of the
wrong kind, fails here), and every checkpoint under runs/ that a command reads must be one that a documented command
writes (a placeholder such as runs/<run>/checkpoint.pt is the reader's to fill in)."""

import argparse
import ast
import contextlib
import functools
import glob
import io
import json
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("dlsgan.py", "invgan.py", "lia.py", "regressor_inversion.py", "eval.py")
READ_FLAGS = ("--resume", "--gan", "--ckpt", "--generator")
METHODS = ("dlsgan", "invgan", "lia", "regressor_inversion")


def shell_lines(text):
    """Lines of the ```bash blocks, backslash continuations joined, comments dropped."""
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").split("\n"):
            yield line


def docstring_lines(path):
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    yield from doc.replace("\\\n", " ").split("\n")


VENVS = set()  # interpreters a documented command creates (python -m venv DIR)


def documented_commands():
    """(where, argv of one command) for every command that runs a script."""
    sources = [
        (os.path.relpath(p, ROOT), shell_lines(open(p).read()))
        for p in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    ]
    sources += [(s, docstring_lines(os.path.join(ROOT, s))) for s in SCRIPTS]
    out = []
    for where, lines in sources:
        for line in lines:
            for part in re.split(r"&&|;", line.split(" #")[0]):
                if not re.match(r"\s*(\S*python3?|torchrun)\s", part):  # prose that names a script
                    continue
                venv = re.match(r"\s*python3? -m venv (?:--\S+ )*(\S+)", part)
                if venv:
                    VENVS.add(os.path.join(venv.group(1), "bin", "python"))
                part = re.sub(r"<[^>]*>", lambda m: m.group(0).replace(" ", "_"), part)  # <run A>: one token
                tokens = shlex.split(part.strip())
                scripts = [i for i, t in enumerate(tokens) if t in SCRIPTS]
                if scripts:
                    out.append((where, tokens[: scripts[0]], tokens[scripts[0]], tokens[scripts[0] + 1 :]))
    return out


COMMANDS = documented_commands()


def parser_of(script):
    """The script's own ArgumentParser, caught at its first parse_args call (nothing is validated or read)."""
    caught = {}

    class Caught(Exception):
        pass

    def catch(self, *a, **k):
        caught["parser"] = self
        raise Caught

    sys.path.insert(0, ROOT)
    module = __import__(script[:-3])
    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = catch
    try:
        module.parse_args([])
    except Caught:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return caught["parser"]


@functools.lru_cache(maxsize=None)
def written_runs():
    """The run directories documented commands write: --run-name N (lia's --stage all: N__gan, N__encoder,
    N__refine), and eval.py --defaults' runs/{default|quick}__METHOD__DATASET[__stage]."""
    names = set()
    for _, _, script, argv in COMMANDS:
        if "--run-name" in argv:
            name = argv[argv.index("--run-name") + 1]
            stage = argv[argv.index("--stage") + 1] if "--stage" in argv else "all"
            names |= (
                {f"{name}__{s}" for s in ("gan", "encoder", "refine")}
                if script == "lia.py" and stage == "all"
                else {name}
            )
        if script in ("dlsgan.py", "invgan.py") and "--ablation" in argv:  # the variants' directories
            module = __import__(script[:-3])
            names |= {
                os.path.basename(d) for d in module.ablation_plan(module.parse_args(argv), argv)["run_dirs"].values()
            }
        if script == "eval.py" and "--defaults" in argv:
            dataset = argv[argv.index("--dataset") + 1] if "--dataset" in argv else "mnist"
            for prefix in ("quick",) if "--quick" in argv else ("default",):
                for method in METHODS:
                    base = f"{prefix}__{method}__{dataset}"
                    names |= {base, f"{base}__gan", f"{base}__encoder", f"{base}__refine"}
    return names


@pytest.mark.parametrize(
    "where,launcher,script,argv", COMMANDS, ids=[f"{c[0]}:{c[2]} {' '.join(c[3])}" for c in COMMANDS]
)
def test_documented_command_parses_and_reads_what_is_written(where, launcher, script, argv):
    assert (
        launcher[-1:] in (["python"], ["python3"])
        or launcher[:1] == ["torchrun"]
        or launcher[-1:]
        and launcher[-1] in VENVS
    ), f"{where}: '{' '.join(launcher)}' is not an interpreter a documented command sets up"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parser_of(script).parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: {script} {' '.join(argv)}: {err.getvalue().strip().splitlines()[-1]}")
    if script == "lia.py" and launcher[:1] == ["torchrun"] and "--stage" not in argv:
        assert "--run-name" in argv, f"{where}: lia.py --stage all under torchrun needs --run-name"
    written = written_runs()
    for flag in READ_FLAGS:
        for i, token in enumerate(argv[:-1]):
            value = argv[i + 1]
            if token == flag and value.startswith("runs/") and "<" not in value:
                name = value.split("/")[1]
                assert name in written, f"{where}: {flag} {value}: no documented command writes runs/{name}"


def test_the_readme_library_example_runs(tmp_path):
    """The README's "As a library" block, run as written with only common.py beside it, on a tiny trained checkpoint
    (its placeholder filled in) and a folder of odd image files as my_images/."""
    import shutil
    import subprocess

    from conftest import SUBPROCESS_ENV, odd_image_folder, script_command

    tiny = "--resolution 16 --width 8 --latent-dim 16 --batch-size 8 --eval-images 16 --v-window 32 --no-track"
    r = subprocess.run(
        script_command(os.path.join(ROOT, "dlsgan.py"), [*tiny.split(), "--images", "16", "--run-name", "tiny"]),
        cwd=tmp_path,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    readme = open(os.path.join(ROOT, "README.md")).read()
    (example,) = re.findall(r"## As a library.*?```python\n(.*?)```", readme, re.S)
    code = example.replace("runs/<run>/checkpoint.pt", "runs/tiny/checkpoint.pt")
    odd_image_folder(tmp_path / "my_images")
    shutil.copy(os.path.join(ROOT, "common.py"), tmp_path)  # common.py alone: no eval.py, no method file
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**SUBPROCESS_ENV, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("8 images") and float(r.stdout.strip().split()[-1]) > 0  # the PSNR it prints


def test_the_claims_records_follow_the_rule_and_the_readme_shows_the_mnist_one():
    """docs/claims/<dataset>.json are the outputs of `eval.py --claims --seeds 3` that the docs quote: every claim a
    named check of eval.CLAIMS, every recorded effect and verdict what the rule gives for the recorded per-seed values,
    and the README's claims table the MNIST record's own rows (claims.md), so no quoted number is typed by hand."""
    import eval as ev

    records = sorted(glob.glob(os.path.join(ROOT, "docs", "claims", "*.json")))
    assert "mnist.json" in {os.path.basename(r) for r in records}
    named = {c["claim"]: c for c in ev.CLAIMS}
    for path in records:
        record = json.load(open(path))
        assert not record["quick"] and record["rule"] == ev.VERDICT_RULE, path
        for row in record["claims"]:
            claim = named[row["claim"]]  # a claim eval.py no longer checks would fail here
            assert (row["kind"], row["margin"]) == (claim["kind"], claim.get("margin", 0.0)), row["claim"]
            assert row["seeds"] == [1, 2, 3], row["claim"]
            effects = [ev.claim_effect(row["kind"], a, b, row["margin"]) for a, b in row["values"]]
            assert effects == pytest.approx(row["effects"]), row["claim"]
            assert row["verdict"] == ev.verdict(effects), row["claim"]
        table = open(path[: -len(".json")] + ".md").read()
        rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
        assert len(rows) == len(record["claims"]), path
        if os.path.basename(path) == "mnist.json":
            assert len(record["claims"]) == len(ev.CLAIMS)  # every claim, the ranking's included
            readme = open(os.path.join(ROOT, "README.md")).read()
            missing = [line for line in rows if line not in readme.splitlines()]
            assert not missing, f"the README's claims table differs from docs/claims/mnist.md: {missing[0][:120]}"

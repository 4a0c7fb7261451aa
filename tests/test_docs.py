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

import numpy as np
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


def test_the_claims_records_follow_the_rule_and_the_docs_show_them_as_written():
    """docs/claims/<name>.json are outputs of `eval.py --claims --seeds 3` that the docs quote: every claim a named
    check of eval.CLAIMS, every recorded effect, mean, std and verdict what the rule gives for the recorded per-seed
    values, each <name>.md the rows eval.py writes for them, the README's claims table and each method page's rows
    those of docs/claims/mnist.md in order, and the method's own check (mnist-dlsgan) the whole one's values to the
    digit: no quoted number is typed by hand."""
    import eval as ev

    def table_rows(text):
        return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method |")]

    def shows_in_order(text, rows):
        lines = text.splitlines()
        return any(lines[i : i + len(rows)] == rows for i in range(len(lines)))

    named = {c["claim"]: c for c in ev.CLAIMS}
    records = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "claims", "*.json"))):
        record = records[os.path.basename(path)[: -len(".json")]] = json.load(open(path))
        assert not record["quick"] and record["rule"] == ev.VERDICT_RULE, path
        for row in record["claims"]:
            claim = named[row["claim"]]  # a claim eval.py no longer checks fails here
            assert (row["kind"], row["margin"]) == (claim["kind"], claim.get("margin", 0.0)), row["claim"]
            assert (row["metric"], row["paper"], row["runs"]) == (
                claim["metric"],
                claim["paper"],
                [claim["a"][0], claim["b"][0]],
            )
            assert row["seeds"] == [1, 2, 3], row["claim"]
            effects = [ev.claim_effect(row["kind"], a, b, row["margin"]) for a, b in row["values"]]
            assert effects == pytest.approx(row["effects"]), row["claim"]
            assert row["mean"] == pytest.approx(np.mean(effects)) and row["std"] == pytest.approx(
                np.std(effects, ddof=1)
            )
            assert row["verdict"] == ev.verdict(effects), row["claim"]
        args = argparse.Namespace(dataset=record["dataset"], seeds=3, quick=False, jobs=2)
        written = table_rows(ev.claims_markdown(record["claims"], args, record["wall_s"]))
        assert table_rows(open(path[: -len(".json")] + ".md").read()) == written, f"{path[:-5]}.md is not its json"
    mnist = table_rows(open(os.path.join(ROOT, "docs", "claims", "mnist.md")).read())
    assert len(mnist) == len(ev.CLAIMS)  # every claim, the ranking's included
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert shows_in_order(readme, mnist), "the README's claims table is not docs/claims/mnist.md's rows in order"
    assert f"{records['mnist']['wall_s'] / 60:.1f} min wall" in readme
    fashion = table_rows(open(os.path.join(ROOT, "docs", "claims", "fashion-mnist.md")).read())
    for method in (*METHODS, "comparison"):
        page = open(os.path.join(ROOT, "docs", f"{method}.md")).read()
        for name, record in (("mnist", mnist), ("fashion-mnist", fashion)):
            rows = [line for line in record if line.startswith(f"| {method} |")]
            assert rows and shows_in_order(page, rows), f"docs/{method}.md lacks its rows of docs/claims/{name}.md"
    # the README's two data sets side by side: each claim's mean effect and verdict, from the records
    by_claim = {r["claim"]: r for r in records["fashion-mnist"]["claims"]}

    def cell(r):
        return f"{r['mean']:.3g} ± {r['std']:.3g}, {r['verdict']}"

    side_by_side = [
        f"| {r['method']} | {r['claim']} | {cell(r)} | {cell(by_claim[r['claim']])} |"
        for r in records["mnist"]["claims"]
    ]
    assert shows_in_order(readme, side_by_side), "the README's MNIST / Fashion-MNIST table is not the records'"
    assert f"{records['fashion-mnist']['wall_s'] / 60:.1f} min wall" in readme
    # a method's own check (mnist-<method>) and the whole one trained the same runs apart: the same values to the digit
    for name, record in records.items():
        if name.startswith("mnist-"):
            method = name.removeprefix("mnist-")
            alone = {r["claim"]: r["values"] for r in record["claims"]}
            assert alone == {r["claim"]: r["values"] for r in records["mnist"]["claims"] if r["method"] == method}

"""No change moves a number unless it says so: the fixed-seed tiny runs of every script and stage (tests/golden.py)
must give the checkpoints and metrics rows recorded in tests/golden_numbers.json. On the machine and torch version
that recorded them the comparison is bitwise (every tensor's sha256, every logged value); elsewhere CPU kernels may
round differently and a short GAN run amplifies that, so it is every tensor's name, dtype and shape and every logged or
reported value to a relative 1e-2 (measured between two EPYC machines: at most 4e-6 in the metrics rows, 2e-3 in the
path lengths, whose finite differences with epsilon 1e-4 are the most sensitive number here)."""

import json
import math

import golden


def close(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(float(a) - float(b)) <= 1e-2 * max(abs(a), abs(b), 1e-6)
    if isinstance(a, str) and isinstance(b, str) and ":" in a and ":" in b:
        return a.split(":")[0] == b.split(":")[0]  # dtype and shape of a tensor
    return a == b


def test_every_number_of_every_script_is_unchanged():
    with open(golden.GOLDEN) as f:
        expected = json.load(f)
    got = golden.record_all()
    assert set(got) == set(expected["runs"])
    if expected["machine"] == golden.machine():
        diff = golden.differences(expected["runs"], got)
        assert not diff, "numbers moved (python tests/golden.py lists them):\n" + "\n".join(diff)
    else:
        bad = [name for name in got if not close(expected["runs"][name], got[name])]
        assert not bad, f"numbers moved beyond rounding in {bad} (recorded on {expected['machine']})"

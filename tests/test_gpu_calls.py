"""The GPU proof's device calls (scripts/gpu_calls.py) without a GPU: the plan fits the lease,
the docs show it, a call names the step that failed. `make gpu-rehearsal` runs the real calls
with the real wheels; this file runs what needs neither."""

import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_calls = load("gpu_calls")


def test_the_plan_fits_the_lease_with_a_retry_of_its_last_call(monkeypatch):
    monkeypatch.setattr(gpu_calls, "tree_bytes", lambda: 17_000_000)
    monkeypatch.setattr(gpu_calls, "size", lambda p: {"data": 30_900_000, "01": 16_000_000}.get(p.name, 46_000_000))
    rows = gpu_calls.plan_rows()
    total = sum(r["budget_s"] for r in rows)
    assert total <= gpu_calls.PLAN_LIMIT_S and total + rows[-1]["budget_s"] <= 15 * 60
    assert all(r["fits"] for r in rows[1:]), rows


def test_docs_show_the_plan_the_script_runs():
    """docs/gpu.md's table is `python scripts/gpu_calls.py plan`'s; budgets and what runs must agree."""
    text = (ROOT / "docs" / "gpu.md").read_text()
    for n, call in gpu_calls.CALLS.items():
        row = re.search(rf"^\| {n} \| .*\| (.*) \| (\d+) \|$", text, re.M)
        assert row, f"call {n} is not in docs/gpu.md's plan"
        assert row.group(1) == call.runs and int(row.group(2)) == call.budget_s + gpu_calls.TRANSFER_S
    assert "make gpu-rehearsal" in text and "make gpu-rehearsal" in (ROOT / "README.md").read_text()


def test_a_call_names_the_steps_that_failed_and_exits_non_zero(tmp_path, monkeypatch):
    """Call 2 on a machine where its part never arrived and call 1 left no data: both steps fail,
    call.json names them, and the exit status says so."""
    monkeypatch.setitem(gpu_calls.CALLS, 2, gpu_calls.Call((".gpu/parts/none",), 60, "d2l"))
    out = tmp_path / "out"
    assert gpu_calls.run_call(2, out, tmp_path / "scratch", dry_run=True) == 1
    s = json.loads((out / "call.json").read_text())
    assert s["failed_steps"] == ["receive .gpu/parts/none", "proof: d2l"], s["failed_steps"]
    assert "call 2: failed: receive .gpu/parts/none, proof: d2l" in (out / "call.log").read_text()


def test_a_bad_call_or_a_missing_carry_is_one_line(tmp_path, capsys, monkeypatch):
    assert gpu_calls.main(["7", "--out", str(tmp_path)]) == 2
    assert "call must be one of" in capsys.readouterr().err
    monkeypatch.setitem(gpu_calls.CALLS, 1, gpu_calls.Call((".gpu/no-such-part",), 10, "x"))
    assert gpu_calls.main(["1", "--out", str(tmp_path)]) == 2
    assert "carry them" in capsys.readouterr().err


def test_what_comes_back_is_checked_against_the_devices_limits(tmp_path):
    for i in range(9):
        (tmp_path / f"f{i}").write_text("x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep").write_text("x")
    problems = gpu_calls.check_returned(tmp_path)
    assert any("10 files" in x for x in problems) and any("too deep" in x for x in problems)


def test_keeping_the_data_fails_loudly_when_it_was_not_carried(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_calls, "ROOT", tmp_path)
    p = gpu_calls.Proof(tmp_path, 30, True, name="call")
    assert not gpu_calls.python_step(p, "keep the data", lambda: gpu_calls.keep_data(gpu_calls.Scratch(tmp_path / "s")))
    assert p.summary["failed_steps"] == ["keep the data"] and "found 0" in p.summary["stages"]["keep the data"]["detail"]

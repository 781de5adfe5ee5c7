"""`python -m training.experiments --budget cpu|gpu`: run the grid, then write the report.

Resumable: every finished arm is a JSON file under OUT/BUDGET/arms/ and is not run again
(`--fresh` reruns them all). Each arm runs in its own child process."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess  # nosec B404  # runs `python -m training` per grid cell, never a shell
import sys
import time
from pathlib import Path

from training.experiments.grid import BUDGETS

log = logging.getLogger("training.experiments")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.experiments",
                                description="Answer d2l's NiN exercises (8.3) with a declared grid of runs.")
    p.add_argument("--budget", choices=sorted(BUDGETS), required=True,
                   help="cpu: a few hours on 2 cores at 112 px; gpu: the textbook's protocol; smoke: plumbing only")
    p.add_argument("--out", default="reports/nin-exercises", help="report folder (default: reports/nin-exercises)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files (default: search)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: auto")
    p.add_argument("--synthetic", action="store_true", help="a tiny synthetic set instead of Fashion-MNIST (tests)")
    p.add_argument("--fresh", action="store_true", help="rerun every arm, even those already done")
    p.add_argument("--report-only", action="store_true", help="write the report from the arms already done")
    p.add_argument("--retime", action="store_true",
                   help="re-measure the onnxruntime CPU ms/img of every finished arm (on a quiet machine), then report")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: one arm, in this process
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # tests: no child processes
    return p


def arms_folder(out: Path, budget: str) -> Path:
    return out / budget / "arms"


def known_arms(budget, folder: Path) -> list:
    """The structural arms, and the sweep arms once both range tests have suggested an lr."""
    import json

    from training.experiments.grid import RECIPES, structural_arms, sweep_arms

    arms = structural_arms(budget)
    suggestions = {}
    for recipe in RECIPES:
        f = folder / f"range-{recipe}.json"
        if f.is_file():
            suggestions[recipe] = json.loads(f.read_text())["suggested_lr"]
    if len(suggestions) == len(RECIPES):
        arms += sweep_arms(budget, suggestions)
    return arms


def run_one(args, budget) -> int:
    """The child's work: one range test or one arm, its record written atomically."""
    from training.experiments.data import load
    from training.checkpoint import write_json
    from training.experiments.runner import range_test, train_arm
    from training.runtime import make_runtime

    folder = arms_folder(Path(args.out), budget.name)
    rt = make_runtime(args.device, "auto", "auto")
    data = load(budget, args.data_dir, args.synthetic, rt.device)
    t0 = time.perf_counter()
    if args.arm.startswith("range-"):
        record = range_test(args.arm.removeprefix("range-"), budget, data, rt, folder)
    else:
        match = [a for a in known_arms(budget, folder) if a.name == args.arm]
        if not match:
            raise ValueError(f"no arm named {args.arm!r} in the {budget.name} grid (yet)")
        record = train_arm(match[0], budget, data, rt)
    record["data"] = data["source"]
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(folder / f"{args.arm}.json", record)
    return 0


def child(args, name: str) -> int:
    if args.in_process:
        return run_one(argparse.Namespace(**{**vars(args), "arm": name}), BUDGETS[args.budget])
    cmd = [sys.executable, "-m", "training.experiments", "--budget", args.budget, "--out", args.out,
           "--device", args.device, "--arm", name]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.synthetic:
        cmd.append("--synthetic")
    return subprocess.run(cmd, env={**os.environ, "TQDM_DISABLE": "1"}).returncode  # nosec B603  # this interpreter with arguments from the grid's own table


def run_grid(args, budget) -> int:
    from training.experiments.grid import RECIPES

    folder = arms_folder(Path(args.out), budget.name)
    failed = []

    def ensure(name: str, step: str) -> None:
        record = folder / f"{name}.json"
        if record.is_file() and not args.fresh:
            log.info("%s %s: done already (%s)", step, name, record)
            return
        t = time.perf_counter()
        rc = child(args, name)
        if rc != 0 or not record.is_file():
            failed.append(name)
            log.error("%s %s: failed (exit %d)", step, name, rc)
        else:
            log.info("%s %s: %.0f s", step, name, time.perf_counter() - t)

    for recipe in RECIPES:
        ensure(f"range-{recipe}", "range test")
    if failed:
        return 1
    arms = known_arms(budget, folder)
    for i, arm in enumerate(arms, 1):
        ensure(arm.name, f"[{i}/{len(arms)}]")
    if failed:
        log.error("arms that failed: %s (rerun the same command to retry them)", ", ".join(failed))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript"):  # the ONNX exporter's pass-by-pass chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = get_args_parser().parse_args(argv)
    from training.data import DataNotFoundError

    budget = BUDGETS[args.budget]
    try:
        if args.arm:
            return run_one(args, budget)
        if not args.synthetic and not args.report_only and not args.retime:
            from training.data import find_data_root

            find_data_root(args.data_dir, allow_download=False)  # fail in one line before any child starts
        if args.retime:
            from training.experiments.runner import retime

            print(f"re-timed {retime(arms_folder(Path(args.out), budget.name), budget)} arms")
        rc = 0 if args.report_only or args.retime else run_grid(args, budget)
        from training.experiments.report import write_report

        path = write_report(Path(args.out))
        print(f"report: {path}")
        return rc
    except (DataNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

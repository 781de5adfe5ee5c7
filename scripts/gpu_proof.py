"""`make gpu-proof OUT=folder`: the training half of the GPU proof (calls 1 and 2 of docs/gpu.md's plan).

On the GPU machine (Python 3.12, torch 2.11, no network), with Fashion-MNIST sent along
(`--data-dir`), within a wall-clock budget (`--budget-s`; every step stops at it):

1. prints the GPU, driver, torch / CUDA / cuDNN versions;
2. runs the `gpu`-marked tests that need no onnxruntime-gpu, with NIN_EXPECT_GPU=1 (a missing or
   broken CUDA path fails instead of skipping);
3. profiles one training epoch (`python -m training.profile`: img/s, device busy share, host syncs);
4. measures one training step's memory at batch 128 beside its prediction (`training.stats`);
5. trains `--preset strong` at 224x224 from scratch, stopping at the first epoch with test
   accuracy >= 0.93 (or at its budget);
6. trains `--preset d2l` at 224 for the textbook's 10 epochs.

`--stage strong` runs 1-5, `--stage d2l` 6, `--stage train` both (6 if it fits), `--stage grid`
the textbook-exercise grid's GPU budget (`training.experiments`). Into OUT, at most 8 files:
summary.json and proof.log after every step, each run's metrics.csv every 5 s while it trains,
profile.txt, the strong run's best checkpoint (no optimizer state) and the curves.
`--dry-run` (`make gpu-proof DRY=1`) runs every stage that can run without CUDA on the CPU with a
tiny step budget; the test suite runs it so it cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import signal
import subprocess  # nosec B404  # runs this project's own steps, fixed argument lists, never a shell
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_ACC = 0.93
MAX_OUT_FILES = 8
MAX_OUT_BYTES = 16 * 2**20


class Proof:
    """Runs the stages as subprocesses, tees their output into one log, keeps the summary."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool, name: str = "proof") -> None:
        self.out, self.budget_s, self.dry_run = out, budget_s, dry_run
        self.t0 = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="gpu-proof-"))
        self.log_path = out / f"{name}.log"
        self.summary_path = out / ("summary.json" if name == "proof" else f"{name}.json")
        self.summary: dict = {"dry_run": dry_run, "budget_s": budget_s, "stages": {}}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def say(self, line: str) -> None:
        stamp = f"[{time.monotonic() - self.t0:7.1f}s] {line}"
        print(stamp, flush=True)
        with open(self.log_path, "a") as f:
            f.write(stamp + "\n")

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None,
            output: Path | None = None, every_5s=None) -> dict:
        """Run `cmd` from the repository root, its output into the log (or into `output`, stderr
        still to the log); SIGTERM at `timeout` (the training loop saves and exits on it),
        SIGKILL 20 s later. `every_5s()` runs while it does (copying its metrics into OUT, so a
        call killed at the device's limit still returns the epochs done)."""
        self.say(f"== {name}: {' '.join(cmd)} (limit {timeout:.0f} s)")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        t = time.monotonic()
        with open(self.log_path, "a") as log, (open(output, "w") if output else contextlib.nullcontext(log)) as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=log, env=full_env)  # nosec B603  # a step's argument list from this file's own plan
            timed_out, deadline = False, time.monotonic() + max(timeout, 1)
            try:
                while True:
                    try:
                        rc = proc.wait(timeout=max(min(5.0, deadline - time.monotonic()), 0.01))
                        break
                    except subprocess.TimeoutExpired:
                        if every_5s:
                            every_5s()
                        if time.monotonic() >= deadline:
                            raise
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.send_signal(signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
        result = {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.monotonic() - t, 1), "timed_out": timed_out}
        self.summary["stages"][name] = result
        self.say(f"== {name}: rc {rc} in {result['seconds']} s{' (stopped at its time limit)' if timed_out else ''}")
        self.write_summary()  # after every step: a call killed at its limit still returns what is done
        return result

    def write_summary(self) -> None:
        self.summary["wall_s"] = round(time.monotonic() - self.t0, 1)
        self.summary["failed_steps"] = [n for n, r in self.summary["stages"].items() if r["rc"] != 0]
        self.summary_path.write_text(json.dumps(self.summary, indent=1, default=str))


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "cudnn": None, "gpu": None, "driver": None}
    if torch.cuda.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["multiprocessors"] = props.multi_processor_count
        env["bf16"] = torch.cuda.is_bf16_supported()
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],  # nosec B603 B607  # nvidia-smi from PATH: the driver's tool, a fixed query
                           capture_output=True, text=True)
        if q.returncode == 0 and q.stdout.strip():
            env["nvidia_smi"] = q.stdout.strip()
            env["driver"] = q.stdout.strip().split(",")[1].strip()
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
    return env


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def slim_checkpoint(src: Path, dst: Path) -> None:
    """The checkpoint without optimizer, scheduler and RNG state: what export needs, < 16 MB."""
    from training.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(src)
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler", "rng")}, dst)


def train_stage(p: Proof, name: str, preset: str, extra: list[str], device_args: list[str],
                data_args: list[str], timeout: float) -> dict:
    run_dir = p.work / name
    cmd = [sys.executable, "-m", "training", "--preset", preset, "--out", str(run_dir), "--checkpoint-every", "0",
           *device_args, *data_args, *extra]
    t = time.monotonic()

    def copy_metrics() -> None:
        if (run_dir / "metrics.csv").is_file():
            shutil.copy(run_dir / "metrics.csv", p.out / f"{name}-metrics.csv")

    res = p.run(name, cmd, timeout, every_5s=copy_metrics)
    copy_metrics()
    rows = read_metrics(run_dir)
    info: dict = {"rc": res["rc"], "wall_s": round(time.monotonic() - t, 1), "epochs": len(rows)}
    if rows:
        full = [r for r in rows if int(r["image_size"]) == 224] or rows
        best = max(full, key=lambda r: float(r["test_acc"]))
        info.update({
            "best_test_acc": float(best["test_acc"]), "best_epoch": best["epoch"],
            "last": rows[-1], "img_per_s": [float(r["img_per_s"]) for r in rows],
            "epoch_seconds": [float(r["epoch_seconds"]) for r in rows],
            "peak_mem_mb": max(float(r["peak_mem_mb"]) for r in rows),
            "reached_target": any(float(r["test_acc"]) >= TARGET_ACC for r in full),
        })
        args = json.loads((run_dir / "args.json").read_text())
        info.update({"device": args["device"], "amp": args["amp"], "channels_last": args["channels_last"],
                     "batch_size": args["args"]["batch_size"]})
        p.say(f"{name}: best test accuracy {info['best_test_acc']:.4f} at epoch {info['best_epoch']}, "
              f"{len(rows)} epoch(s), {info['wall_s']} s wall, peak memory {info['peak_mem_mb']:.0f} MB")
    p.summary[name] = info
    return info


def predicted_training_mb(batch_size: int, batch_norm: bool) -> dict:
    from training.config import NiNConfig
    from training.resources import report

    mem = report(NiNConfig(batch_norm=batch_norm), batch_size)["memory"]["training"]
    return {k: round(v / 2**20, 1) for k, v in mem.items()}


def stage_train(p: Proof, data_dir: str | None, d2l_after: bool = True) -> int:
    dry = p.dry_run
    device_args = ["--device", "cpu"] if dry else ["--device", "cuda"]
    data_args = ["--data-dir", data_dir] if data_dir else []

    # there: a skip is a failure, and the real-data tests read the carried data
    expect = {} if dry else {"NIN_EXPECT_GPU": "1", **({"FASHION_MNIST_DIR": data_dir} if data_dir else {})}
    tests = p.run("gpu_tests", [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu and not cuda_ort",
                                "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"], min(240, p.left()), env=expect)

    prof_json = p.work / "profile.json"
    prof_args = (["--device", "cpu", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--width", "0.25"]
                 if dry else ["--device", "cuda", "--batch-size", "128", "--steps", "468"])
    p.run("profile", [sys.executable, "-m", "training.profile", *prof_args, "--json", str(prof_json)],
          min(180, p.left()), output=p.out / "profile.txt")
    if prof_json.is_file():
        p.summary["profile"] = json.loads(prof_json.read_text())
        p.say(f"profile: {json.dumps(p.summary['profile'])}")

    stats_args = ["--device", "cpu", "--batch-size", "2", "--width", "0.25"] if dry else ["--device", "cuda", "--batch-size", "128"]
    stats_json = p.work / "stats.json"
    stats = p.run("stats", [sys.executable, "-m", "training.stats", "--batch-norm", "--json", *stats_args],
                  min(120, p.left()), output=stats_json)
    if stats["rc"] == 0:
        rep = json.loads(stats_json.read_text())
        m = rep.get("measured") or {}
        p.summary["stats_batch"] = {
            "batch_size": rep["batch_size"], "device": m.get("device"), "method": m.get("method"),
            "predicted_training_mb": {k: round(v / 2**20, 1) for k, v in rep["memory"]["training"].items()},
            "measured_training_step_mb": round((m.get("training_step_bytes") or 0) / 2**20, 1),
        }
        p.say(f"training.stats: {json.dumps(p.summary['stats_batch'])}")
    else:
        p.say(f"training.stats failed (rc {stats['rc']}; its error is in proof.log)")

    tiny = ["--max-steps", "2", "--batch-size", "8", "--eval-limit", "32"] if dry else []
    strong = train_stage(p, "strong", "strong", ["--target-acc", str(TARGET_ACC), *tiny], device_args, data_args,
                         timeout=max(p.left() - 20, 1))
    if strong.get("batch_size"):
        strong["predicted_training_mb_fp32"] = predicted_training_mb(strong["batch_size"], batch_norm=True)
    best = p.work / "strong" / "best.pt"
    if best.is_file():
        slim_checkpoint(best, p.out / "strong-best.pt")
    if (p.work / "strong" / "curves.png").is_file():
        shutil.copy(p.work / "strong" / "curves.png", p.out / "strong-curves.png")

    d2l: dict = {}
    if d2l_after:  # d2l has no BatchNorm: its epochs cost about what strong's did. Run it only if 10 of them fit.
        per_epoch = max(strong.get("epoch_seconds") or [0]) + 5
        need = 60 if dry else 10 * per_epoch + 30
        if p.left() > need:
            d2l = stage_d2l_run(p, data_dir)
        else:
            p.summary["d2l"] = {"skipped": f"{p.left():.0f} s left, ~{need:.0f} s needed"}
            p.say(f"d2l: skipped ({p.summary['d2l']['skipped']})")
    p.summary["gpu_tests"] = {"rc": tests["rc"]}
    ok = tests["rc"] == 0 and strong.get("rc") == 0 and d2l.get("rc", 0) == 0
    return 0 if ok else 1


def stage_d2l_run(p: Proof, data_dir: str | None) -> dict:
    """The textbook's recipe at its protocol: 10 epochs at 224 on all 60,000 images."""
    tiny = ["--max-steps", "2", "--batch-size", "8", "--eval-limit", "32"] if p.dry_run else []
    d2l = train_stage(p, "d2l", "d2l", tiny, ["--device", "cpu" if p.dry_run else "cuda"],
                      ["--data-dir", data_dir] if data_dir else [], timeout=max(p.left() - 10, 1))
    if (p.work / "d2l" / "curves.png").is_file():
        shutil.copy(p.work / "d2l" / "curves.png", p.out / "d2l-curves.png")
    return d2l


def stage_grid(p: Proof, data_dir: str | None) -> int:
    args = ["--budget", "gpu", "--device", "cuda"] if not p.dry_run else ["--budget", "smoke", "--device", "cpu"]
    report = p.work / "nin-exercises"
    cmd = [sys.executable, "-m", "training.experiments", *args, "--out", str(report)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    res = p.run("grid", cmd, max(p.left() - 15, 1))
    if report.is_dir():  # the report's text, its CSV and two plots travel back
        shutil.make_archive(str(p.out / "nin-exercises"), "gztar", report)
    return res["rc"]


def check_returned(out: Path) -> list[str]:
    """What the device would not bring back: more than 8 files, over 16 MiB, over 2 folders down."""
    files = [f for f in out.rglob("*") if f.is_file()]
    problems = [f"{len(files)} files (at most {MAX_OUT_FILES})"] if len(files) > MAX_OUT_FILES else []
    problems += [f"{f.relative_to(out)}: over 16 MiB" for f in files if f.stat().st_size > MAX_OUT_BYTES]
    problems += [f"{f.relative_to(out)}: too deep" for f in files if len(f.relative_to(out).parts) > 3]
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Prove the GPU half: tests, profile, strong and d2l training at 224.")
    ap.add_argument("--out", required=True, help="output folder (at most 8 files of at most 16 MiB come back)")
    ap.add_argument("--data-dir", default=None, help="folder with the four Fashion-MNIST IDX files (default: search)")
    ap.add_argument("--stage", choices=["train", "strong", "d2l", "grid"], default="train",
                    help="train: tests, profile, memory, strong, then d2l if it fits (default); strong: all but d2l; "
                         "d2l: the textbook's recipe alone; grid: the exercise grid")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget (default: 540 = 9 min)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny step budget: check the plumbing")
    args = ap.parse_args(argv)
    if args.data_dir and not Path(args.data_dir).is_dir():
        print(f"error: --data-dir {args.data_dir} is not a folder", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    p = Proof(out, args.budget_s, args.dry_run)
    try:
        env = environment()
        p.summary["env"] = env
        p.say(f"environment: {json.dumps(env)}")
        if not args.dry_run and not env["cuda_available"]:
            p.say("error: torch sees no CUDA device; use --dry-run on a CPU machine")
            return 1
        if args.stage in ("train", "strong"):
            rc = stage_train(p, args.data_dir, d2l_after=args.stage == "train")
        elif args.stage == "d2l":
            rc = stage_d2l_run(p, args.data_dir).get("rc", 1)
        else:
            rc = stage_grid(p, args.data_dir)
        p.summary["rc"] = rc
        p.say(f"done: rc {rc}; {p.left():.0f} s of the {args.budget_s:.0f} s budget left")
        return rc
    finally:
        p.write_summary()
        shutil.rmtree(p.work, ignore_errors=True)
        if problems := check_returned(out):
            raise SystemExit(f"error: OUT would not come back whole: {'; '.join(problems)}")


if __name__ == "__main__":
    sys.exit(main())

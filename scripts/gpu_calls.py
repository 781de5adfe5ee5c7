"""The GPU proof as device calls: one plan, one command per call (docs/gpu.md "The plan").

The device is lent ~15 minutes in all (start-up, transfers, idle waits and retries counted),
takes 64 MiB per call with the tree, and keeps what a call leaves in /tmp only while it stays
warm (~30 s idle). So the proof is four calls, back to back, each carrying what it needs and
running under its own budget; the plan adds up to 13 minutes so that one retry of the last fits.

    here:   make gpu-rehearsal                 the data, the wheels in parts, then every call's
                                               command with --dry-run in the device's versions
            python scripts/gpu_calls.py plan   the table, with this tree's real sizes
    there:  python3 scripts/gpu_calls.py N --out $OUT     N = 1..4, carry: CALLS[N].carry
    here:   python scripts/gpu_home.py FOLDER...          each call's returned files, in place

Each call writes call.json (its steps: rc, seconds, stopped at a limit; failed_steps) and
call.log into OUT after every step, so a call killed at its limit still returns what is done;
its exit status is non-zero when any step failed. What later calls need stays in the scratch
folder (/tmp): the wheel parts, the data, the GPU-trained checkpoint, the assembled packages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess  # nosec B404  # this project's own steps, fixed argument lists, never a shell
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_proof import Proof, check_returned  # noqa: E402

TRANSFER_LIMIT = 64 * 2**20
STARTUP_S = 120  # the device README: "a minute or more" to start; counted at two
TRANSFER_S = 15  # per call, tree and carries both ways (estimated)
PLAN_LIMIT_S = 13 * 60


@dataclass(frozen=True)
class Call:
    carry: tuple[str, ...]
    budget_s: int
    runs: str


CALLS = {
    1: Call((".gpu/data", ".gpu/parts/01"), 210,
            "receive part 01; keep the data; GPU tests, profile, training memory; `--preset strong` to 0.93"),
    2: Call((".gpu/parts/02",), 120, "receive part 02; `--preset d2l`, the textbook's 10 epochs at 224"),
    3: Call((".gpu/parts/03",), 140,
            "receive part 03; assemble; the CUDA library's links; export the GPU-trained checkpoint "
            "(parity, fp16 gated on CUDA); CUDA against the CPU provider; in process at batch 1...256"),
    4: Call((), 105, "`bentoml serve` on CUDA with 1, 4 and 16 workers (fp16), the hand-written reference beside the first"),
}
CUDA_LIB = "onnxruntime/capi/libonnxruntime_providers_cuda.so"


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def tree_bytes() -> int:
    """What travels with every call: tracked files and untracked ones git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,  # nosec B603 B607  # git from PATH, fixed arguments
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum(size(ROOT / n.decode()) for n in names if n)


def plan_rows() -> list[dict]:
    tree = tree_bytes()
    rows = [{"call": "start-up", "carries_mb": None, "budget_s": STARTUP_S, "runs": "the machine starts"}]
    for n, c in CALLS.items():
        carried = tree + sum(size(ROOT / p) for p in c.carry)
        rows.append({"call": n, "carry": list(c.carry), "carries_mb": round(carried / 1e6, 1),
                     "fits": carried <= TRANSFER_LIMIT, "missing": [p for p in c.carry if not (ROOT / p).exists()],
                     "budget_s": c.budget_s + TRANSFER_S, "runs": c.runs})
    return rows


def print_plan() -> int:
    rows = plan_rows()
    total = sum(r["budget_s"] for r in rows)
    print(f"| call | carries (MB, tree included; limit {TRANSFER_LIMIT / 1e6:.1f}) | runs | budget (s) |")
    print("|---|---|---|---|")
    for r in rows:
        carry = "" if r["carries_mb"] is None else f"{r['carries_mb']} ({', '.join(r['carry']) or 'the tree'})"
        flag = "" if r.get("fits", True) else " **over**"
        flag += f" **missing {r['missing']}**" if r.get("missing") else ""
        print(f"| {r['call']} | {carry}{flag} | {r['runs']} | {r['budget_s']} |")
    print(f"| total | | | {total} ({total / 60:.1f} min; limit {PLAN_LIMIT_S / 60:.0f}) |")
    ok = total <= PLAN_LIMIT_S and all(r.get("fits", True) and not r.get("missing") for r in rows)
    return 0 if ok else 1


class Scratch:
    """Where a call leaves what later calls need (the device's /tmp; a temporary folder when rehearsed)."""

    def __init__(self, root: Path) -> None:
        self.store, self.site = root / "nin-gpu-parts", root / "nin-gpu-site"
        self.data, self.run = root / "nin-gpu-data", root / "nin-gpu-run"
        self.run.mkdir(parents=True, exist_ok=True)


def keep_data(s: Scratch) -> dict:
    """The carried Fashion-MNIST into the scratch folder, for calls 2 and 3 (which do not carry it)."""
    files = sorted((ROOT / ".gpu" / "data").glob("*-ubyte.gz"))
    if len(files) != 4:
        raise FileNotFoundError(f"expected the 4 Fashion-MNIST .gz files in .gpu/data, found {len(files)}")
    s.data.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, s.data / f.name)
    return {"ok": True, "files": [f.name for f in files]}


def nvidia_lib_dirs() -> list[str]:
    """The CUDA / cuDNN libraries of this interpreter's nvidia-* wheels (torch's), where
    onnxruntime's preload_dlls() finds them."""
    try:
        import nvidia  # a namespace package: cu13, cudnn, ...
    except ImportError:
        return []
    return sorted(str(d) for base in nvidia.__path__ for d in Path(base).glob("*/lib") if d.is_dir())


def library_check(site: Path, dry_run: bool) -> dict:
    """The CUDA provider library after assembly: every library it needs resolves against the
    nvidia-* wheels (libcuda, the driver's, only where a driver is); and, where cuobjdump is,
    that its GPU code is the sm_90 code alone."""
    lib = site / CUDA_LIB
    dirs = [*nvidia_lib_dirs(), str(lib.parent)]
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join([*dirs, os.environ.get("LD_LIBRARY_PATH", "")])}
    ldd = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, env=env)  # nosec B603 B607  # ldd from PATH on the library just assembled
    missing = [ln.split()[0] for ln in ldd.stdout.splitlines() if "not found" in ln]
    result: dict = {"library": str(lib), "nvidia_lib_dirs": dirs[:-1], "not_found": missing,
                    "resolved": {ln.split()[0]: ln.split("=>")[1].split("(")[0].strip()
                                 for ln in ldd.stdout.splitlines() if "=>" in ln and "not found" not in ln}}
    if shutil.which("readelf"):
        dyn = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout  # nosec B603 B607  # readelf from PATH, read-only
        result["needed"] = [ln.split("[")[1].rstrip("]") for ln in dyn.splitlines() if "(NEEDED)" in ln]
    cudnn = [d for d in dirs if (Path(d) / "libcudnn.so.9").is_file()]
    result["cudnn_found"] = bool(cudnn)  # dlopen'ed, not NEEDED: onnxruntime finds it at run time
    cuobjdump = shutil.which("cuobjdump") or next((str(p) for d in dirs for p in [Path(d).parent / "bin" / "cuobjdump"]
                                                    if p.is_file()), None)
    if cuobjdump:
        listed = subprocess.run([cuobjdump, "--list-elf", str(lib)], capture_output=True, text=True)  # nosec B603  # cuobjdump (CUDA's) on the library just assembled
        archs: dict[str, int] = {}
        for ln in listed.stdout.splitlines():
            arch = ln.rsplit(".", 2)[-2] if ln.endswith(".cubin") else "?"
            archs[arch] = archs.get(arch, 0) + 1
        result["cuobjdump"] = {"rc": listed.returncode, "cubins_by_arch": archs}
    allowed = {"libcuda.so.1"} if dry_run else set()  # the driver's: none without a GPU
    result["ok"] = not (set(missing) - allowed) and bool(cudnn) and result.get("cuobjdump", {}).get("rc", 0) == 0
    return result


def python_step(p: Proof, name: str, fn) -> bool:
    """A step run in this process, recorded beside the subprocess steps."""
    t = time.monotonic()
    try:
        detail = fn()
        rc = 0 if not isinstance(detail, dict) or detail.get("ok", True) else 1
    except Exception as e:  # noqa: BLE001 - recorded as the step's failure, and the exit status
        detail, rc = f"{type(e).__name__}: {e}", 1
    p.summary["stages"][name] = {"rc": rc, "seconds": round(time.monotonic() - t, 1), "timed_out": False, "detail": detail}
    p.say(f"== {name}: rc {rc}: {json.dumps(detail, default=str)[:600]}")
    p.write_summary()
    return rc == 0


def run_call(n: int, out: Path, scratch: Path, dry_run: bool) -> int:
    call = CALLS[n]
    out.mkdir(parents=True, exist_ok=True)
    p = Proof(out, call.budget_s, dry_run, name="call")
    p.summary.update(call=n, carry=list(call.carry))
    s = Scratch(scratch)
    py, dry = sys.executable, ["--dry-run"] if dry_run else []
    site_env = {"PYTHONPATH": os.pathsep.join([str(s.site), os.environ.get("PYTHONPATH", "")])}
    try:
        for part in (c for c in call.carry if c.startswith(".gpu/parts/")):
            p.run(f"receive {part}", [py, "scripts/gpu_parts.py", "receive", part, "--store", str(s.store)], 60)
        if n == 1:
            python_step(p, "keep the data", lambda: keep_data(s))
            p.run("proof: strong", [py, "scripts/gpu_proof.py", "--stage", "strong", "--out", str(out), "--data-dir",
                                    str(s.data), "--budget-s", str(int(p.left() - 15)), *dry], p.left() - 5)
            if (out / "strong-best.pt").is_file():
                shutil.copy(out / "strong-best.pt", s.run / "strong-best.pt")
        elif n == 2:
            p.run("proof: d2l", [py, "scripts/gpu_proof.py", "--stage", "d2l", "--out", str(out), "--data-dir",
                                 str(s.data), "--budget-s", str(int(p.left() - 10)), *dry], p.left() - 5)
        elif n == 3:
            if p.run("assemble", [py, "scripts/gpu_parts.py", "assemble", "--store", str(s.store), "--site", str(s.site)],
                     min(90, p.left()))["rc"] == 0:
                python_step(p, "library check", lambda: library_check(s.site, dry_run))
            model = s.run / "model"
            ckpt = s.run / "strong-best.pt"
            if ckpt.is_file():
                small = ["--limit", "64", "--calibration-images", "16"] if dry_run else []
                p.run("export on the GPU", [py, "-m", "export", str(ckpt), "--out", str(model), "--data-dir", str(s.data),
                                            "--no-register", "--no-timing", *small], min(100, p.left() - 30), env=site_env)
                for f in ("card.json", "card.md"):
                    if (model / f).is_file():
                        shutil.copy(model / f, out / f"gpu-{f}")
            else:
                p.summary["stages"]["export on the GPU"] = {"rc": 1, "seconds": 0, "timed_out": False,
                                                           "detail": f"no {ckpt}: call 1 ran on another machine?"}
                p.write_summary()
            p.run("serve proof: cuda", [py, "scripts/gpu_serve_proof.py", "--part", "cuda", "--out", str(out),
                                        "--data-dir", str(s.data), "--budget-s", str(int(p.left() - 5)), *dry,
                                        *(["--model", str(model)] if (model / "card.json").is_file() else [])],
                  p.left(), env=site_env)
        elif n == 4:
            p.run("serve proof: serve", [py, "scripts/gpu_serve_proof.py", "--part", "serve", "--out", str(out),
                                         "--data-dir", str(s.data), "--budget-s", str(int(p.left() - 5)), *dry],
                  p.left(), env=site_env)
    finally:
        p.write_summary()
        shutil.rmtree(p.work, ignore_errors=True)
    failed = p.summary["failed_steps"]
    p.say(f"call {n}: {'failed: ' + ', '.join(failed) if failed else 'every step passed'}; "
          f"{p.left():.0f} s of {call.budget_s} s left")
    return 1 if failed else 0


def rehearse(python: str, keep: Path | None) -> int:
    """Every call's command, --dry-run, in `python` (the device's versions), in plan order, with
    the same carries: what it returns, its time, its exit status."""
    if print_plan() != 0:
        print("error: the plan does not fit (see the table); make gpu-data gpu-parts first?", file=sys.stderr)
        return 1
    root = keep or Path(tempfile.mkdtemp(prefix="gpu-rehearsal-"))
    scratch, failures, t_all = root / "scratch", [], time.monotonic()
    for n, call in CALLS.items():
        out = root / f"call-{n}"
        t = time.monotonic()
        r = subprocess.run([python, "scripts/gpu_calls.py", str(n), "--out", str(out), "--scratch", str(scratch),  # nosec B603  # this script under the given interpreter
                            "--dry-run"], cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"})
        problems = check_returned(out) + ([f"exit status {r.returncode}"] if r.returncode else [])
        print(f"rehearsal call {n}: {time.monotonic() - t:.0f} s, {len(list(out.rglob('*')))} files back"
              + (f"; PROBLEMS: {problems}" if problems else ""), flush=True)
        failures += [f"call {n}: {x}" for x in problems]
    print(f"rehearsal: {time.monotonic() - t_all:.0f} s; {'FAILED: ' + '; '.join(failures) if failures else 'every call passed'}")
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The GPU proof's device calls (docs/gpu.md).")
    ap.add_argument("call", help="1..4: run that call here/there; 'plan': the table; 'rehearse': every call, dry")
    ap.add_argument("--out", help="output folder ($OUT on the device)")
    ap.add_argument("--scratch", default="/tmp",  # nosec B108  # the device's scratch, kept between calls while it stays warm
                    help="where calls leave what later calls need (default: /tmp)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the plumbing")
    ap.add_argument("--python", default=str(ROOT / ".gpu" / "venv312" / "bin" / "python"),
                    help="rehearse: the interpreter with the device's versions (default: .gpu/venv312)")
    ap.add_argument("--keep", default=None, help="rehearse: keep every call's output in this folder")
    args = ap.parse_args(argv)
    if args.call == "plan":
        return print_plan()
    if args.call == "rehearse":
        if not Path(args.python).is_file():
            print(f"error: no {args.python}; make gpu-env-check builds it", file=sys.stderr)
            return 2
        return rehearse(args.python, Path(args.keep) if args.keep else None)
    if not args.call.isdigit() or int(args.call) not in CALLS:
        print(f"error: call must be one of {sorted(CALLS)}, 'plan' or 'rehearse', not {args.call!r}", file=sys.stderr)
        return 2
    if not args.out:
        print("error: --out is required for a call", file=sys.stderr)
        return 2
    missing = [c for c in CALLS[int(args.call)].carry if not (ROOT / c).exists()]
    if missing:
        print(f"error: call {args.call} carries {missing}, which are not here (carry them)", file=sys.stderr)
        return 2
    return run_call(int(args.call), Path(args.out), Path(args.scratch), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())

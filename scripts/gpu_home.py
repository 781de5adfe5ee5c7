"""Bring the GPU proof's results home: `python scripts/gpu_home.py FOLDER...`.

Each FOLDER is what one device call returned (the `files_at` of `scripts/gpu_calls.py N`; the
call number is read from its call.json). This puts the figures in place:

- bench/<gpu>/call-N/: every returned file but checkpoints (<gpu> from the card's name, e.g.
  nvidia-h200);
- .gpu/home/<gpu>/strong-best.pt: the GPU-trained checkpoint, out of the tree (ignored), with its
  sha256 printed;
- docs/gpu.md, between its gpu-results markers: the table of what was measured, with the card's
  name, driver and versions, and every failed or skipped step;
- when the GPU-trained model beats the shipped one on the card's measure (fp32 accuracy on all
  10,000 test images, as exported on the GPU): `python -m export` here, into
  models/nin-fashion-mnist (every check runs again), and README's accuracy table from the new card.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess  # nosec B404  # python -m export under this interpreter, fixed arguments
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_parts import sha256  # noqa: E402

START, END = "<!-- gpu-results:start", "<!-- gpu-results:end -->"
SHIPPED = Path("models") / "nin-fashion-mnist"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def gather(folders: list[Path]) -> dict[int, Path]:
    calls = {}
    for f in folders:
        call = read_json(f / "call.json").get("call")
        if call is None:
            raise SystemExit(f"error: {f} holds no call.json: not what a device call returned")
        calls[int(call)] = f
    return calls


def fmt(x, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def levels(result: dict, name: str) -> dict:
    return (result.get("levels") or {}).get(name) or {}


def results_table(calls: dict[int, Path], gpu_dir: str) -> str:
    s = {n: read_json(f / "summary.json") for n, f in calls.items()}
    c = {n: read_json(f / "call.json") for n, f in calls.items()}
    env = s.get(1, {}).get("env") or {}
    gpu = env.get("gpu") or s.get(3, {}).get("gpu") or s.get(4, {}).get("gpu") or "unknown GPU"
    ort = s.get(3, {}).get("onnxruntime") or s.get(4, {}).get("onnxruntime")
    rows = []
    strong = s.get(1, {}).get("strong") or {}
    if strong:
        secs, ips = strong.get("epoch_seconds") or [None], strong.get("img_per_s") or [None]
        rows.append(("`--preset strong` from scratch: best test accuracy (epoch); epochs; s per epoch; img/s",
                     f"{fmt(strong.get('best_test_acc'))} ({strong.get('best_epoch')}); {strong.get('epochs')}; "
                     f"{fmt(max(secs) if secs[0] is not None else None, '.1f')}; {fmt(max(ips) if ips[0] is not None else None, '.0f')}"))
    d2l_csv = calls.get(2, Path("/nonexistent")) / "d2l-metrics.csv"
    if d2l_csv.is_file():
        import csv

        accs = [float(r["test_acc"]) for r in csv.DictReader(d2l_csv.open())]
        rows.append(("`--preset d2l` (10 epochs at 224): test accuracy by epoch", ", ".join(f"{a:.3f}" for a in accs)))
    mem = s.get(1, {}).get("stats_batch") or {}
    if mem:
        rows.append((f"training step at batch {mem.get('batch_size')}: predicted / measured memory (MB)",
                     f"{(mem.get('predicted_training_mb') or {}).get('total')} / {mem.get('measured_training_step_mb')}"))
    prof = s.get(1, {}).get("profile") or {}
    if prof:
        rows.append(("profiled epoch: img/s; device busy share; host syncs per step",
                     f"{prof.get('img_per_s')}; {prof.get('device_busy_share')}; {prof.get('host_syncs_per_step')}"))
    card = read_json(calls.get(3, Path("/nonexistent")) / "gpu-card.json")
    if card:
        v = card.get("variants") or {}
        fp16 = (v.get("fp16") or {}).get("accuracy_by_provider") or {}
        rows.append(("export on the GPU: fp32 / int8 / fp16 test accuracy (fp16 on CUDA)",
                     f"{fmt((v.get('fp32') or {}).get('accuracy'))} / {fmt((v.get('int8') or {}).get('accuracy'))} / "
                     f"{fmt(fp16.get('CUDAExecutionProvider'))}"))
    agree = (s.get(3, {}).get("agreement") or {}).get("variants") or {}
    if agree:
        rows.append(("CUDA against the CPU provider, all test images: argmax agreement fp32 / fp16",
                     " / ".join(fmt(agree.get(k, {}).get("argmax_agreement_with_cpu_fp32")) for k in ("fp32", "fp16"))))
    for v, r in (s.get(3, {}).get("in_process") or {}).items():
        one = ((r.get("by_batch") or {}).get("1") or {})
        rows.append((f"in process, {v}: batch 1 (ms) plain / IO binding; best img/s (batch)",
                     f"{(one.get('plain') or {}).get('ms')} / {(one.get('iobinding_on_device') or {}).get('ms')}; "
                     f"{r.get('best_img_s_plain')} ({r.get('best_batch_plain')})"))
    for n, r in (s.get(4, {}).get("serve_by_workers") or {}).items():
        for name in sorted(r.get("levels") or {}):
            lv = levels(r, name)
            top = lv.get(max(lv, key=int)) if lv else {}
            rows.append((f"`bentoml serve`, {n} worker(s), {name}: img/s at c={max(lv, key=int) if lv else '—'}; "
                         f"p50 at c=1 (ms); GPU MB per worker",
                         f"{(top or {}).get('throughput_img_s')}; {(lv.get('1') or {}).get('p50')}; {(top or {}).get('gpu_mb')}"))
    problems = [f"call {n}: {x}" for n in sorted(c) for x in c[n].get("failed_steps") or []]
    problems += [f"call {n}: {x}" for n in sorted(s) for x in (s[n].get("failed_steps") or []) + (s[n].get("skipped_steps") or [])]
    rows.append(("failed or skipped steps", "; ".join(problems) or "none"))
    head = (f"Measured on one {gpu} (driver {env.get('driver')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
            f"cuDNN {env.get('cudnn')}, onnxruntime-gpu {ort}); calls {', '.join(map(str, sorted(calls)))} of the plan; "
            f"every returned file in [{gpu_dir}/](../{gpu_dir}/).")
    return "\n".join([head, "", "| what | figure |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows]])


def replace_block(path: Path, body: str) -> None:
    text = path.read_text()
    a, b = text.find(START), text.find(END)
    if a < 0 or b < 0:
        raise SystemExit(f"error: {path} has no {START} ... {END} block")
    a = text.index("\n", a) + 1
    path.write_text(text[:a] + body.rstrip() + "\n" + text[b:])


def readme_accuracy(card: dict, gpu: str) -> str:
    v = card["variants"]
    return "\n".join([
        "| variant | test accuracy | served by default on |", "|---|---|---|",
        f"| fp32 `model.onnx` | {v['fp32']['accuracy']:.4f} | GPU (until fp16 is gated on one) |",
        *([f"| int8 `model.int8.onnx` | {v['int8']['accuracy']:.4f} | CPU |"] if "int8" in v else []),
        *([f"| fp16 `model.fp16.onnx` | {v['fp16']['accuracy']:.4f} | GPU, once its gate ran on CUDA |"] if "fp16" in v else []),
        "", f"Trained on one {gpu} (`--preset strong` from scratch): [docs/gpu.md](docs/gpu.md).",
    ])


def bring_home(folders: list[Path], root: Path, export: bool = True) -> int:
    calls = gather(folders)
    s1, s3 = read_json(calls.get(1, Path("/nonexistent")) / "summary.json"), read_json(calls.get(3, Path("/nonexistent")) / "summary.json")
    gpu = (s1.get("env") or {}).get("gpu") or s3.get("gpu") or "unknown GPU"
    gpu_dir = f"bench/{slug(gpu)}"
    for n, folder in calls.items():
        dest = root / gpu_dir / f"call-{n}"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for f in folder.rglob("*"):
            if f.is_file() and f.suffix != ".pt":
                (dest / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, dest / f.relative_to(folder))
    print(f"{gpu_dir}/: calls {sorted(calls)}")
    ckpt = next((f for f in calls.get(1, Path("/nonexistent")).glob("strong-best.pt")), None)
    if ckpt:
        kept = root / ".gpu" / "home" / slug(gpu) / "strong-best.pt"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ckpt, kept)
        print(f"{kept.relative_to(root)}: sha256 {sha256(kept)} (out of the tree)")
    replace_block(root / "docs" / "gpu.md", results_table(calls, gpu_dir))
    print("docs/gpu.md: results written")
    gpu_card = read_json(calls.get(3, Path("/nonexistent")) / "gpu-card.json")
    shipped = read_json(root / SHIPPED / "card.json")
    new_acc = ((gpu_card.get("variants") or {}).get("fp32") or {}).get("accuracy")
    old_acc = shipped.get("test_accuracy")
    if new_acc is not None and old_acc is not None and new_acc > old_acc and ckpt:
        print(f"the GPU-trained model beats the shipped one ({new_acc:.4f} > {old_acc:.4f}): exporting it here")
        if export:
            r = subprocess.run([sys.executable, "-m", "export", str(kept), "--out", str(root / SHIPPED),  # nosec B603  # export under this interpreter, paths from this script
                                "--hardware", f"one {gpu}"], cwd=root)
            if r.returncode != 0:
                print("error: the export here failed; models/ is unchanged", file=sys.stderr)
                return 1
            card = read_json(root / SHIPPED / "card.json")
            text = (root / "README.md").read_text()
            a = text.index("| variant | test accuracy | served by default on |")
            b = text.index("\n\n", text.index("\n\n", a) + 2)  # the table, then its sentence
            (root / "README.md").write_text(text[:a] + readme_accuracy(card, gpu) + text[b:])
            print(f"README.md: accuracy table from the new card ({card['test_accuracy']:.4f})")
    elif new_acc is not None:
        print(f"the shipped model stays: GPU-trained {new_acc:.4f} <= shipped {old_acc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Put the GPU proof's returned files in place (docs/gpu.md).")
    ap.add_argument("folders", nargs="+", help="each device call's returned folder (files_at)")
    ap.add_argument("--no-export", action="store_true", help="never replace the shipped model")
    args = ap.parse_args(argv)
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing:
        print(f"error: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    return bring_home([Path(f) for f in args.folders], ROOT, export=not args.no_export)


if __name__ == "__main__":
    sys.exit(main())

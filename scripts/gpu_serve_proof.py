"""Stage 4 of the GPU proof: onnxruntime's CUDA provider and `bentoml serve` on the GPU.

Run on the GPU machine after `scripts/gpu_parts.py assemble`, by `scripts/gpu_calls.py` (calls 3
and 4 of docs/gpu.md's plan):

    PYTHONPATH=/tmp/site python3 scripts/gpu_serve_proof.py --out $OUT --data-dir DATA [--part cuda|serve] [--model DIR]

--part cuda:
1. the CUDA execution provider is active, not a silent fallback (`session.get_providers()`);
2. the `cuda_ort` tests with NIN_EXPECT_GPU=1;
3. CUDA fp32 and fp16 of --model against the CPU provider on all 10,000 test images: argmax
   agreement and accuracy beside the card's (+-0.05 pp);
4. in process, per variant and batch size 1..256: plain `run` (numpy in, numpy out), IO binding
   with input and output on the GPU (what the GPU alone costs), a uint8-input graph (4x fewer
   bytes to copy: normalization moves into the graph), several batches in flight (threads on one
   session, and two sessions), and cuDNN's algorithm search (HEURISTIC, EXHAUSTIVE, DEFAULT) with
   each shape's first-run cost;
--part serve:
5. `bentoml serve` on the GPU under `python -m bench` with 1, 4 and 16 workers (SERVE_PLAN) at
   concurrency 1, 64, 256, with the GPU memory each worker's answers report, and the
   hand-written reference beside the one-worker service.

Within --budget-s: a step that would not fit is skipped and named in `skipped_steps`. Writes
summary.json after every step, serve-proof.log, and each serving run's bench-workers-N.json.
`--dry-run` runs it on the CPU provider with tiny sizes and 2 workers (the test suite does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess  # nosec B404  # runs pytest and the benchmark, fixed argument lists, never a shell
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHIPPED = ROOT / "models" / "nin-fashion-mnist"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def log(out: Path, line: str) -> None:
    print(line, flush=True)
    with open(out / "serve-proof.log", "a") as f:
        f.write(line + "\n")


def session(path: Path, provider: str, algo: str = "HEURISTIC"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if provider == CUDA:
        providers = [(CUDA, {"cudnn_conv_algo_search": algo, "do_copy_in_default_stream": "1"}), CPU]
    else:
        providers = [CPU]
    s = ort.InferenceSession(str(path), opts, providers=providers)
    if s.get_providers()[0] != provider:
        raise SystemExit(f"error: asked for {provider}, onnxruntime runs {s.get_providers()[0]}: a silent fallback")
    return s


def uint8_input_model(path: Path, contract: dict):
    """The model with normalization inside: uint8 (N, 1, H, W) in, same logits out."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(path))
    g = m.graph
    old = g.input[0]
    shape = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    float_name = old.name + "_f32"
    for node in g.node:
        node.input[:] = [float_name if i == old.name else i for i in node.input]
    consts = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in
              (("u8_scale", contract["scale"]), ("u8_mean", contract["mean"]), ("u8_std", contract["std"]))]
    g.initializer.extend(consts)
    pre = [helper.make_node("Cast", [old.name], ["u8_cast"], to=TensorProto.FLOAT),
           helper.make_node("Mul", ["u8_cast", "u8_scale"], ["u8_scaled"]),
           helper.make_node("Sub", ["u8_scaled", "u8_mean"], ["u8_centered"]),
           helper.make_node("Div", ["u8_centered", "u8_std"], [float_name])]
    nodes = pre + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    new_input = helper.make_tensor_value_info(old.name, TensorProto.UINT8, shape)
    g.input.remove(old)
    g.input.insert(0, new_input)
    return m  # not onnx.checker'd: the fp16 export lists its input Cast after its users, which onnxruntime accepts


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def in_process(path: Path, provider: str, x_u8: np.ndarray, contract: dict, batches: list[int], repeats: int) -> dict:
    """ms per batch and img/s for plain run, IO binding on the device, and uint8 input."""
    import onnxruntime as ort

    from serving.imaging import normalize

    s = session(path, provider)
    name = s.get_inputs()[0].name
    device = "cuda" if provider == CUDA else "cpu"
    m_u8 = uint8_input_model(path, contract)
    s_u8 = ort.InferenceSession(m_u8.SerializeToString(), providers=s.get_providers())
    out = {}
    for b in batches:
        xb_u8 = np.ascontiguousarray(np.resize(x_u8, (b, *x_u8.shape[1:])))
        xb = normalize(list(xb_u8[:, 0]), contract)
        plain = timed(lambda: s.run(None, {name: xb}), repeats)
        binding = s.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(xb, device, 0))
        binding.bind_output(s.get_outputs()[0].name, device)
        bound = timed(lambda: s.run_with_iobinding(binding), repeats)
        u8 = timed(lambda: s_u8.run(None, {name: xb_u8}), repeats)
        row = {k: {"ms": round(v * 1000, 3), "img_s": round(b / v, 1)} for k, v in
               (("plain", plain), ("iobinding_on_device", bound), ("uint8_input", u8))}
        out[b] = row
    best = max(out, key=lambda b: out[b]["plain"]["img_s"])
    return {"by_batch": out, "best_batch_plain": best, "best_img_s_plain": out[best]["plain"]["img_s"]}


def in_flight(path: Path, provider: str, x: np.ndarray, batch: int, seconds: float) -> dict:
    """Throughput with 1, 2 and 4 threads on one session, and 2 threads on 2 sessions."""
    xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
    shared = session(path, provider)
    two = [shared, session(path, provider)]
    name = shared.get_inputs()[0].name
    result = {}
    for label, sessions in (("1 thread", [shared]), ("2 threads, 1 session", [shared] * 2),
                            ("4 threads, 1 session", [shared] * 4), ("2 threads, 2 sessions", two)):
        for s in set(sessions):
            s.run(None, {name: xb})
        counts = [0] * len(sessions)
        stop = time.perf_counter() + seconds

        def work(i: int) -> None:
            while time.perf_counter() < stop:
                sessions[i].run(None, {name: xb})
                counts[i] += 1

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sessions))]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        result[label] = round(sum(counts) * batch / (time.perf_counter() - t), 1)
    return {"batch": batch, "img_s": result}


def algo_search(path: Path, x: np.ndarray, batches: list[int], repeats: int) -> dict:
    """cuDNN's convolution algorithm search: first-run (search) and steady cost per shape."""
    out = {}
    for algo in ("HEURISTIC", "EXHAUSTIVE", "DEFAULT"):
        s = session(path, CUDA, algo)
        name = s.get_inputs()[0].name
        rows = {}
        for b in batches:
            xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))
            t = time.perf_counter()
            s.run(None, {name: xb})
            first = time.perf_counter() - t
            rows[b] = {"first_run_ms": round(first * 1000, 1), "ms": round(timed(lambda: s.run(None, {name: xb}), repeats) * 1000, 3)}
        out[algo] = rows
    return out


def agreement(card: dict, model: Path, provider: str, data_dir: str | None, limit: int | None, out: Path) -> dict:
    """CUDA (or, dry, CPU) fp32 and fp16 against the CPU provider's fp32 on the test images."""
    from export.variants import run_batched
    from serving.imaging import as_uploads, normalize
    from serving.model_files import VARIANT_FILES
    from training.data import find_data_root, load_split

    images, labels = load_split(find_data_root(data_dir, allow_download=False), train=False)
    if limit:
        images, labels = images[:limit], labels[:limit]
    labels = labels.numpy()
    contract = card["input_contract"]
    variants = [v for v in ("fp32", "fp16") if (model / VARIANT_FILES[v]).is_file()]
    ref = session(model / VARIANT_FILES["fp32"], CPU)
    cand = {v: session(model / VARIANT_FILES[v], provider) for v in variants}
    logits = {k: [] for k in ["cpu-fp32", *variants]}
    for i in range(0, len(images), 500):
        x = normalize(as_uploads(images[i : i + 500].numpy(), contract["image_size"]), contract)
        logits["cpu-fp32"].append(run_batched(ref, x))
        for v, s in cand.items():
            logits[v].append(run_batched(s, x))
    logits = {k: np.concatenate(v) for k, v in logits.items()}
    cpu_pred = logits["cpu-fp32"].argmax(1)
    res = {"images": int(len(labels)), "provider": provider,
           "cpu_fp32_accuracy": float((cpu_pred == labels).mean()), "variants": {}}
    for v in variants:
        pred = logits[v].argmax(1)
        acc = float((pred == labels).mean())
        card_acc = (card["variants"].get(v) or {}).get("accuracy")
        res["variants"][v] = {
            "accuracy": acc, "card_accuracy": card_acc,
            "within_0.05pp_of_card": card_acc is not None and abs(acc - card_acc) <= 0.0005 + 1e-12,
            "argmax_agreement_with_cpu_fp32": float((pred == cpu_pred).mean()),
            "max_abs_logit_diff": float(np.abs(logits[v] - logits["cpu-fp32"]).max()),
        }
        log(out, f"{v} on {provider}: accuracy {acc:.4f} (card {card_acc}), agreement with CPU fp32 "
                 f"{res['variants'][v]['argmax_agreement_with_cpu_fp32']:.4%}")
    return res


# docs/gpu.md "Serving on the GPU host": one worker, then 4 and 16 (the device's 16 cores), each
# worker with its own CUDA session; fp16 where its gate ran on CUDA; the hand-written reference
# beside the one-worker service. The dry run: one start of 2 workers with the reference, CPU provider, int8.
# The last number is the run's share of the time left: two servers take twice one's.
SERVE_PLAN = ((1, "fp16", "service,reference", 2), (4, "fp16", "service", 1), (16, "fp16", "service", 1))
SERVE_PLAN_DRY = ((2, "int8", "service,reference", 1),)  # the plan's code paths, several workers, in one start


def serve_with_workers(out: Path, workers: int, variants: str, servers: str, data_dir: str | None, dry_run: bool,
                       timeout: float) -> dict:
    """`python -m bench` against `bentoml serve` with NIN_WORKERS=workers: img/s and p50 per level
    and variant, and each worker's memory; its bench.json into out/bench-workers-N.json."""
    levels, duration = ("1,16", "1") if dry_run else ("1,64,256", "2")
    with tempfile.TemporaryDirectory() as folder:
        cmd = [sys.executable, "-m", "bench", "--variants", variants, "--provider", "cpu" if dry_run else "cuda",
               "--servers", servers, "--python-concurrency", levels, "--native-concurrency", "", "--duration", duration,
               "--images", "32" if dry_run else "500", "--out", folder] + (["--data-dir", data_dir] if data_dir else [])
        t0 = time.monotonic()
        try:
            b = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,  # nosec B603  # the benchmark under this interpreter, arguments from this file
                               env={**os.environ, "NIN_WORKERS": str(workers)})
            rc, text = b.returncode, b.stdout[-3000:] + b.stderr[-2000:]
        except subprocess.TimeoutExpired as e:
            rc, text = 124, f"stopped at its limit of {timeout:.0f} s\n{(e.stdout or b'')[-3000:]!r}"
        log(out, f"workers {workers}: rc {rc} in {time.monotonic() - t0:.0f} s\n{text}")
        result: dict = {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "servers": servers}
        try:
            bench = json.loads((Path(folder) / "bench.json").read_text())
            (out / f"bench-workers-{workers}.json").write_text(json.dumps(bench, indent=1))
            result["levels"] = {name: {c: {k: r.get(k) for k in ("throughput_img_s", "p50", "p99", "peak_rss_mb", "gpu_mb",
                                                                "server_cpu_ms_per_answer")}
                                       for c, r in run["python"].items()} for name, run in bench["runs"].items()}
        except (OSError, ValueError, KeyError) as e:
            result["error"] = f"no bench.json: {e}"
            result["rc"] = result["rc"] or 1
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Prove onnxruntime CUDA and bentoml serve on the GPU.")
    ap.add_argument("--out", required=True, help="output folder (files come back from there)")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: search)")
    ap.add_argument("--model", default=str(SHIPPED), help="exported model folder for the agreement check (default: the shipped one)")
    ap.add_argument("--part", choices=["all", "cuda", "serve"], default="all",
                    help="cuda: provider, tests, agreement, in-process runs; serve: bentoml serve by workers; all: both")
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall-clock budget; a step that would not fit is skipped and named")
    ap.add_argument("--dry-run", action="store_true", help="CPU provider, tiny sizes, 2 workers")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def left() -> float:
        return args.budget_s - (time.monotonic() - t0)

    import onnxruntime as ort

    from serving.engine import cuda_device_count
    from serving.model_files import CARD, VARIANT_FILES

    model = Path(args.model)
    card = json.loads((model / CARD).read_text())
    summary: dict = {"dry_run": args.dry_run, "part": args.part, "model": str(model), "budget_s": args.budget_s,
                     "onnxruntime": ort.__version__, "onnxruntime_file": ort.__file__,
                     "available_providers": ort.get_available_providers(), "cuda_devices": cuda_device_count()}
    provider = CPU if args.dry_run else CUDA
    rc, failed, skipped, step = 0, [], [], "environment"

    def fits(name: str, need_s: float) -> bool:
        if left() >= need_s:
            return True
        skipped.append(f"{name}: {left():.0f} s left, ~{need_s:.0f} s needed")
        log(out, f"SKIPPED {skipped[-1]}")
        return False

    def save() -> None:  # after every step: a call killed at its limit still returns what is done
        summary.update(rc=int(rc), failed_steps=failed, skipped_steps=skipped, wall_s=round(time.monotonic() - t0, 1))
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    try:
        if not args.dry_run:
            if CUDA not in ort.get_available_providers():
                raise RuntimeError("this onnxruntime has no CUDA provider (PYTHONPATH=/tmp/site after assemble?)")
            ort.preload_dlls()  # CUDA 13 / cuDNN 9 from the machine's nvidia-* wheels (torch's)
        s = session(model / VARIANT_FILES["fp32"], provider)
        summary["active_providers"] = s.get_providers()
        log(out, f"environment: {json.dumps(summary)}")
        if not args.dry_run:
            try:
                import torch

                summary["gpu"] = torch.cuda.get_device_name(0)
            except Exception as e:  # noqa: BLE001 - the name is a label, not a check
                summary["gpu"] = f"unknown ({e})"
        save()
        if args.part in ("all", "cuda"):
            if not args.dry_run and fits("cuda_ort tests", 30):
                step = "cuda_ort tests"
                t = subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "cuda_ort", "-q",  # nosec B603  # pytest under this interpreter, fixed arguments
                                    "-p", "no:cacheprovider", "-o", "addopts=-ra"], cwd=ROOT, capture_output=True, text=True,
                                   env={**os.environ, "NIN_EXPECT_GPU": "1",  # a skip is a failure there
                                        **({"FASHION_MNIST_DIR": args.data_dir} if args.data_dir else {})},
                                   timeout=max(left() - 5, 5))
                log(out, t.stdout[-3000:] + t.stderr[-2000:])
                summary["cuda_ort_tests_rc"] = t.returncode
                if t.returncode != 0:
                    rc, failed = 1, failed + ["cuda_ort tests"]
                save()
            if fits("agreement with the CPU provider", 20):
                step = "agreement with the CPU provider"
                summary["agreement"] = agreement(card, model, provider, args.data_dir, 64 if args.dry_run else None, out)
                save()

            from bench.images import real_test_pngs
            from serving.imaging import normalize, to_contract

            pngs, _ = real_test_pngs(64, args.data_dir)
            contract = card["input_contract"]
            images = [to_contract(p, contract, 10**8).image for p in pngs]
            x_u8, x = np.stack([np.asarray(i) for i in images])[:, None], normalize(images, contract)
            batches, repeats = ([1, 2], 2) if args.dry_run else ([1, 2, 4, 8, 16, 32, 64, 128, 256], 20)
            summary["in_process"] = {}
            for v in ("fp32", "fp16"):
                path = model / VARIANT_FILES[v]
                if path.is_file() and fits(f"in-process {v}", 15):
                    step = f"in-process {v}"
                    summary["in_process"][v] = in_process(path, provider, x_u8, contract, batches, repeats)
                    log(out, f"in-process {v}: {json.dumps(summary['in_process'][v])}")
                    save()
            if fits("batches in flight", 15):
                step = "batches in flight"
                summary["in_flight"] = in_flight(model / VARIANT_FILES["fp32"], provider, x, 2 if args.dry_run else 64,
                                                 0.5 if args.dry_run else 2.0)
                log(out, f"in flight: {json.dumps(summary['in_flight'])}")
                save()
            if not args.dry_run and fits("cuDNN algorithm search", 20):
                step = "cuDNN algorithm search"
                summary["cudnn_conv_algo_search"] = algo_search(model / VARIANT_FILES["fp32"], x, [1, 16, 64, 256], 10)
                log(out, f"cudnn_conv_algo_search: {json.dumps(summary['cudnn_conv_algo_search'])}")
                save()
        if args.part in ("all", "serve"):
            summary["serve_by_workers"] = {}
            plan = SERVE_PLAN_DRY if args.dry_run else SERVE_PLAN
            for i, (n, variants, servers, weight) in enumerate(plan):
                step = f"bentoml serve with {n} workers"
                share = left() * weight / sum(w for *_, w in plan[i:])  # what is left, by the runs still to come
                if not fits(step, 20):
                    continue
                result = serve_with_workers(out, n, variants, servers, args.data_dir, args.dry_run, timeout=share)
                summary["serve_by_workers"][str(n)] = result
                if result["rc"] != 0:
                    rc, failed = 1, failed + [step]
                save()
    except Exception as e:  # noqa: BLE001 - said in the summary, and the exit status
        rc, failed = 1, failed + [f"{step}: {type(e).__name__}: {str(e)[:300]}"]
        log(out, f"FAILED at {step}: {type(e).__name__}: {e}")
    finally:
        save()
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m serving.bench`: latency, throughput and memory of the running service, beside
in-process baselines on the same images.

The load generator is httpx + asyncio in one process: N coroutines each keep one request in
flight (closed loop), so concurrency is exact and the client costs little CPU (locust's
gevent workers would cost more of the same 2 cores the server runs on). Note that client and
server share the machine: on 2 cores the client's CPU use is part of every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

import torch

from serving import imaging
from serving.model_files import VARIANT_FILES
from serving.procfs import read_status_kb
from training.runtime import hardware_name

ROOT = Path(__file__).resolve().parents[1]


# ---- inputs -------------------------------------------------------------------------------

def real_test_pngs(n: int, data_dir: str | None = None) -> tuple[list[bytes], np.ndarray]:
    """The first n real Fashion-MNIST test images as uploads: 224x224 8-bit PNG (PIL bilinear)."""
    import io

    from serving.imaging import as_uploads
    from training.data import find_data_root, load_split

    x, y = load_split(find_data_root(data_dir, allow_download=False), train=False)
    out = []
    for img in as_uploads(x[:n].numpy(), 224):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, y[:n].numpy()


# ---- statistics ---------------------------------------------------------------------------

def error_kind(response: httpx.Response | None, exc: Exception | None = None) -> str:
    """One short line per failed request, so a report says what failed, not only how often."""
    if exc is not None:
        message = str(exc)[:80]
        return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return f"HTTP {response.status_code}: {response.text[:80]}"


async def classify(client: httpx.AsyncClient, png: bytes, errors: Counter) -> httpx.Response | None:
    """POST one PNG to /classify: the 200 response, or None with the failure counted by kind."""
    try:
        r = await client.post("/classify", content=png, headers={"Content-Type": "image/png"})
    except httpx.HTTPError as e:
        errors[error_kind(None, e)] += 1
        return None
    if r.status_code != 200:
        errors[error_kind(r)] += 1
        return None
    return r


def summarize(latencies_ms: list[float], errors: Counter, seconds: float, server: list[dict]) -> dict:
    lat = np.asarray(latencies_ms) if latencies_ms else np.zeros(1)
    pct = {f"p{p}": round(float(np.percentile(lat, p)), 2) for p in (50, 90, 95, 99)}
    mean = lambda key: round(float(np.mean([s["timing_ms"][key] for s in server])), 3) if server else None  # noqa: E731
    return {
        "requests": len(latencies_ms), "errors": sum(errors.values()), "error_kinds": dict(errors),
        "seconds": round(seconds, 2),
        "throughput_img_s": round(len(latencies_ms) / seconds, 1) if seconds else 0.0,
        **pct, "max": round(float(lat.max()), 2),
        "server_queue_ms": mean("queue"), "server_inference_ms": mean("inference"), "server_total_ms": mean("total"),
        "mean_batch_size": round(float(np.mean([s["batch_size"] for s in server])), 2) if server else None,
        "peak_rss_mb": max((s["memory"]["peak_rss_mb"] for s in server), default=None),
        "gpu_mb": max((s["memory"]["gpu_mb"] for s in server if s["memory"].get("gpu_mb") is not None), default=None),
    }


# ---- load ---------------------------------------------------------------------------------

async def load_level(url: str, pngs: list[bytes], concurrency: int, duration: float | None, count: int | None) -> dict:
    """Closed-loop load: `concurrency` clients, each sending the next image as soon as the last
    answer came, for `duration` seconds or `count` requests in all."""
    latencies, server, errors = [], [], Counter()
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start, cpu0 = time.perf_counter(), time.process_time()
        stop_at = start + duration if duration else None

        async def worker(i: int) -> None:
            nonlocal sent
            while True:
                if (stop_at and time.perf_counter() >= stop_at) or (count is not None and sent >= count):
                    return
                png = pngs[sent % len(pngs)]
                sent += 1
                t = time.perf_counter()
                r = await classify(client, png, errors)
                if r is not None:
                    latencies.append((time.perf_counter() - t) * 1000)
                    server.append(r.json())

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        seconds = time.perf_counter() - start
        client_cores = (time.process_time() - cpu0) / seconds
    return {**summarize(latencies, errors, seconds, server), "client_cpu_cores": round(client_cores, 2)}


def rss_mb(pid: int) -> float:
    kb = read_status_kb("VmRSS", pid)
    if kb is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return kb / 1024


async def soak(url: str, pngs: list[bytes], requests: int, concurrency: int, pid: int, warmup: int = 500) -> dict:
    """`requests` requests; the worker's RSS sampled every 250; growth measured after `warmup`."""
    samples, done, errors = [], 0, Counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def worker() -> None:
            nonlocal done
            while done < requests:
                png = pngs[done % len(pngs)]
                done += 1
                if done % 250 == 0:
                    samples.append((done, round(rss_mb(pid), 1)))
                await classify(client, png, errors)

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t
    after = [rss for n, rss in samples if n >= warmup] or [samples[-1][1]]
    return {"requests": requests, "errors": sum(errors.values()), "error_kinds": dict(errors),
            "seconds": round(seconds, 1), "rss_samples": samples,
            "rss_after_warmup_mb": after[0], "rss_end_mb": after[-1], "rss_max_mb": max(after),
            "rss_growth_mb": round(max(after) - after[0], 1)}


# ---- baselines ----------------------------------------------------------------------------

def ort_baseline(path: Path, x: np.ndarray, batches=(1, 8, 16, 32, 64), repeats: int = 3, provider: str = "cpu") -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = (["CUDAExecutionProvider"] if provider == "cuda" else []) + ["CPUExecutionProvider"]
    s = ort.InferenceSession(str(path), opts, providers=providers)
    if provider == "cuda" and s.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError("--provider cuda: onnxruntime's CUDA execution provider did not start")
    name = s.get_inputs()[0].name
    out = {}
    for b in batches:
        xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))
        s.run(None, {name: xb})
        runs = max(3, 64 // b) * repeats
        t = time.perf_counter()
        for _ in range(runs):
            s.run(None, {name: xb})
        sec = (time.perf_counter() - t) / runs
        out[b] = {"ms_per_batch": round(sec * 1000, 2), "img_s": round(b / sec, 1)}
    best = max(out, key=lambda b: out[b]["img_s"])
    return {"by_batch": out, "batch1_ms": out[1]["ms_per_batch"], "best_batch": best, "best_img_s": out[best]["img_s"]}


def torch_baseline(folder: Path, x: np.ndarray, repeats: int = 20) -> dict:
    """PyTorch eager, fp32, on the card's architecture (BatchNorm unfolded, as eager runs it);
    the cost does not depend on the weight values."""
    import torch

    from training.config import NiNConfig
    from training.model import NiN

    card = json.loads((folder / "card.json").read_text())
    model = NiN(NiNConfig.from_dict(card["model_config"])).eval()
    out = {}
    with torch.inference_mode():
        for b in (1, 8, 32):
            xb = torch.from_numpy(np.ascontiguousarray(np.resize(x, (b, *x.shape[1:]))))
            model(xb)
            n = max(3, repeats // b)
            t = time.perf_counter()
            for _ in range(n):
                model(xb)
            sec = (time.perf_counter() - t) / n
            out[b] = {"ms_per_batch": round(sec * 1000, 2), "img_s": round(b / sec, 1)}
    return {"by_batch": out, "threads": torch.get_num_threads()}


# ---- server -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    """Poll URL/readyz until it answers 200; fail early if `proc` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}\n{server_output(proc)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout:g} s")


def start_server(model: str | Path, port: int, env: dict | None = None, quiet: bool = False) -> subprocess.Popen:
    """`bentoml serve` from the repository root, in its own process group. Its output goes to an
    unnamed temporary file (`proc.log`), never to a pipe: a pipe nobody reads fills up with access
    log lines after a few hundred requests and then blocks the server."""
    log = None if quiet else tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(  # `python -m bentoml`: also where bentoml travels as wheels without its script
        [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
        env={**os.environ, "NIN_MODEL": str(model), **(env or {})},
        stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.log = log
    return proc


def server_output(proc: subprocess.Popen, tail: int = 3000) -> str:
    log = getattr(proc, "log", None)
    if log is None:
        return ""
    log.seek(0)
    return log.read()[-tail:]


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    if getattr(proc, "log", None) is not None:
        proc.log.close()


class Server:
    """`bentoml serve` in a subprocess for one model variant, ready on return."""

    def __init__(self, model: str, variant: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_server(model, self.port, {"NIN_VARIANT": variant}, quiet=True)
        try:
            wait_ready(self.url, self.proc)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        stop_server(self.proc)


# ---- report -------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    lines = [f"Hardware: {result['hardware']}; {result['images']} real test images as 224x224 PNG; "
             f"{result['duration_s']} s per level.", ""]
    for variant, v in result["service"].items():
        gpu = any(r.get("gpu_mb") is not None for r in v["levels"].values())
        lines += [f"### service, {variant} ({v['provider']})", "",
                  "| concurrency | img/s | p50 ms | p90 | p95 | p99 | max | errors | server queue ms | server inference ms | mean batch | peak RSS MB | client CPU (cores) |"
                  + (" GPU MB |" if gpu else ""),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
        for c, r in v["levels"].items():
            lines.append(f"| {c} | {r['throughput_img_s']} | {r['p50']} | {r['p90']} | {r['p95']} | {r['p99']} | {r['max']} | "
                         f"{r['errors']} | {r['server_queue_ms']} | {r['server_inference_ms']} | {r['mean_batch_size']} | {r['peak_rss_mb']} | "
                         f"{r['client_cpu_cores']} |" + (f" {r.get('gpu_mb')} |" if gpu else ""))
        failed = [f"- c={c}: {n} x {kind}" for c, r in v["levels"].items() for kind, n in r.get("error_kinds", {}).items()]
        lines += (["", "Failed requests:", *failed] if failed else []) + [""]
    lines += ["### in-process baselines", "", "| engine | batch 1 ms | best batch | best img/s |", "|---|---|---|---|"]
    for name, b in result["baselines"].items():
        if b is None:
            continue
        by_batch = {int(k): v for k, v in b["by_batch"].items()}  # JSON keys are strings
        best = max(by_batch, key=lambda k: by_batch[k]["img_s"])
        engine = f"onnxruntime {name}" if name != "torch" else f"PyTorch eager fp32 ({b['threads']} threads)"
        lines.append(f"| {engine} | {by_batch[1]['ms_per_batch']} | {best} | {by_batch[best]['img_s']} |")
    if result.get("targets"):
        lines += ["", "### targets", ""] + [f"- {'met' if t['met'] else 'MISSED'}: {t['what']} ({t['detail']})" for t in result["targets"]]
    if result.get("soak"):
        s = result["soak"]
        lines += ["", f"### soak: {s['requests']:,} requests, {s['errors']} errors, RSS {s['rss_after_warmup_mb']} MB after warm-up, "
                      f"max {s['rss_max_mb']} MB, growth {s['rss_growth_mb']} MB ({s['seconds']} s)"]
        lines += [f"- {n} x {kind}" for kind, n in s.get("error_kinds", {}).items()]
    return "\n".join(lines) + "\n"


def targets(result: dict) -> list[dict]:
    out = []
    svc, base = result["service"], result["baselines"]
    for variant, v in svc.items():
        b = base.get(variant)
        if b and "1" in v["levels"]:
            p50 = v["levels"]["1"]["p50"]
            out.append({"what": f"{variant}: service p50 at c=1 <= in-process batch-1 + 3 ms", "met": p50 <= b["batch1_ms"] + 3,
                        "detail": f"{p50} ms vs {b['batch1_ms']} + 3 ms"})
        if b and "16" in v["levels"]:
            thr = v["levels"]["16"]["throughput_img_s"]
            out.append({"what": f"{variant}: throughput at c=16 >= 80% of in-process best batch", "met": thr >= 0.8 * b["best_img_s"],
                        "detail": f"{thr} img/s vs {b['best_img_s']} (batch {b['best_batch']}): {thr / b['best_img_s']:.0%}"})
    if "int8" in svc and "fp32" in svc:
        top = lambda v: max(r["throughput_img_s"] for r in svc[v]["levels"].values())  # noqa: E731
        out.append({"what": "int8 serving throughput >= 2.5x fp32", "met": top("int8") >= 2.5 * top("fp32"),
                    "detail": f"{top('int8')} vs {top('fp32')} img/s: {top('int8') / top('fp32'):.2f}x"})
    if result.get("soak"):
        s = result["soak"]
        out.append({"what": "soak: zero errors and RSS growth < 50 MB after warm-up", "met": s["errors"] == 0 and s["rss_growth_mb"] < 50,
                    "detail": f"{s['errors']} errors, {s['rss_growth_mb']} MB"})
    return out


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for variant, v in result["service"].items():
        cs = [int(c) for c in v["levels"]]
        for p, style in (("p50", "-o"), ("p99", "--o")):
            a.plot(cs, [v["levels"][str(c)][p] for c in cs], style, label=f"{variant} {p}")
        b.plot(cs, [v["levels"][str(c)]["throughput_img_s"] for c in cs], "-o", label=f"{variant} service")
        if result["baselines"].get(variant):
            b.axhline(result["baselines"][variant]["best_img_s"], ls=":", color=b.lines[-1].get_color(),
                      label=f"{variant} in-process best batch")
    a.set(xscale="log", xlabel="concurrency", ylabel="client latency (ms)", title="latency")
    b.set(xscale="log", xlabel="concurrency", ylabel="images / s", title="throughput")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the NiN service against in-process baselines.")
    p.add_argument("--url", default=None, help="a running service (default: start `bentoml serve` per variant)")
    p.add_argument("--model", default=str(ROOT / "models" / "nin-fashion-mnist"), help="exported model folder (default: the shipped one)")
    p.add_argument("--variants", default="int8,fp32", help="variants to serve when starting the service (default: int8,fp32)")
    p.add_argument("--concurrency", default="1,4,16,64", help="levels (default: 1,4,16,64)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per level (default: 15)")
    p.add_argument("--images", type=int, default=500, help="real test images cycled through (default: 500)")
    p.add_argument("--soak", type=int, default=0, help="requests of the soak run on the first variant (default: 0 = none)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: search)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="execution provider of the in-process baselines (default: cpu; cuda on a GPU machine)")
    p.add_argument("--out", default="bench", help="folder for bench.md, bench.json, bench.png (default: bench)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
        if min(levels) < 1 or args.duration <= 0 or args.images < 1:
            raise ValueError
    except ValueError:
        print("error: --concurrency must be positive integers like 1,4,16; --duration and --images positive", file=sys.stderr)
        return 2
    folder = Path(args.model)
    if not (folder / "card.json").is_file():
        print(f"error: no exported model in {folder} (card.json missing)", file=sys.stderr)
        return 2
    pngs, _ = real_test_pngs(args.images, args.data_dir)
    card = json.loads((folder / "card.json").read_text())
    contract = card["input_contract"]
    x = imaging.normalize([imaging.to_contract(p, contract, 10**8).image for p in pngs[:64]], contract)
    device = torch.device("cuda" if args.provider == "cuda" else "cpu")
    result = {"hardware": hardware_name(device) + (f" + {hardware_name(torch.device('cpu'))}" if args.provider == "cuda" else ""), "images": len(pngs), "duration_s": args.duration,
              "service": {}, "baselines": {}}
    variants = args.variants.split(",") if not args.url else ["running"]
    # against a running service, the baseline is the variant it serves
    baseline_variants = variants if not args.url else [httpx.get(f"{args.url}/model", timeout=10).json()["variant"]]
    for v in baseline_variants:
        if v in VARIANT_FILES and (folder / VARIANT_FILES[v]).is_file():
            print(f"baseline: onnxruntime {v} in-process ...", flush=True)
            result["baselines"][v] = ort_baseline(folder / VARIANT_FILES[v], x, provider=args.provider,
                                                  batches=(1, 8, 16, 32, 64) + ((128, 256) if args.provider == "cuda" else ()))
    print("baseline: PyTorch eager ...", flush=True)
    result["baselines"]["torch"] = torch_baseline(folder, x)

    for v in variants:
        server = None if args.url else Server(str(folder), v)
        url = args.url or server.url
        try:
            info = httpx.get(f"{url}/model", timeout=10).json()
            name = info["variant"] if args.url else v
            entry = result["service"][name] = {"provider": info["provider"], "levels": {}}
            asyncio.run(load_level(url, pngs, 1, 2.0, None))  # client warm-up
            for c in levels:
                print(f"service {name}: concurrency {c} for {args.duration:g} s ...", flush=True)
                entry["levels"][str(c)] = asyncio.run(load_level(url, pngs, c, args.duration, None))
                print("   ", entry["levels"][str(c)], flush=True)
            if args.soak and v == variants[0]:
                pid = info["pid"]
                print(f"soak: {args.soak:,} requests ...", flush=True)
                result["soak"] = asyncio.run(soak(url, pngs, args.soak, 16, pid))
        finally:
            if server:
                server.close()
    result["targets"] = targets(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(markdown(result))
    plot(result, out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

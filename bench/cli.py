"""`python -m bench`: the service and the reference server, both clients, in-process baselines."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

from bench.baselines import ort_baseline, torch_baseline
from bench.images import real_test_pngs
from bench.load import CpuMeter, combine_rounds, have_wrk, load_level, soak, wrk_level
from bench.report import markdown, plot, targets
from bench.servers import Server, write_results
from serving import imaging
from serving.model_files import CARD, DEFAULT_MODEL, VARIANT_FILES, available_variants


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the service beside a hand-written FastAPI server and in-process onnxruntime.")
    p.add_argument("--url", default=None, help="measure this running service only (default: start the servers)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="exported model folder (default: the shipped one)")
    p.add_argument("--variants", default="int8,fp32", help="variants to serve (default: int8,fp32)")
    p.add_argument("--servers", default="service,reference", help="service, reference or both (default: both)")
    p.add_argument("--python-concurrency", default="1,16,64,256",
                   help="levels for the Python client, which also reads the server's figures (default: 1,16,64,256)")
    p.add_argument("--native-concurrency", default="1,16,64,256", help="levels for wrk (default: 1,16,64,256; '' = none)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per level (default: 10)")
    p.add_argument("--images", type=int, default=500, help="real test images cycled through (default: 500)")
    p.add_argument("--soak", type=int, default=0, help="requests of the soak run on the first service variant (default: 0 = none)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="execution provider of the in-process baselines (default: cpu; cuda on a GPU machine)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: search)")
    p.add_argument("--out", default="bench/latest", help="folder for bench.md, bench.json, bench.png (default: bench/latest)")
    return p


def _levels(text: str) -> list[int]:
    levels = [int(c) for c in text.split(",") if c.strip()]
    if any(c < 1 for c in levels):
        raise ValueError
    return levels


def settle(server_url: str, timeout: float = 15.0) -> None:
    """Wait until the work a level left behind is done, so the next level starts from an idle
    service (the service's `nin_images_in_service` gauge; the reference has none: a pause)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = httpx.get(f"{server_url}/metrics", timeout=10)
        line = [m for m in metrics.text.splitlines() if m.startswith("nin_images_in_service")] if metrics.status_code == 200 else []
        if not line:
            time.sleep(2.0)
            return
        if float(line[0].split()[-1]) == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{server_url} still busy {timeout:g} s after a level ended")


def warm(server_url: str, pngs: list[bytes]) -> None:
    asyncio.run(load_level(server_url, pngs, 1, 2.0))  # connections, first requests


def run_level(client: str, server_url: str, pngs: list[bytes], c: int, duration: float, pid: int | None = None) -> dict:
    """One level; with the server's root process, also its CPU per answer and the idle share."""
    meter = CpuMeter(pid)
    if client == "python":
        level = asyncio.run(load_level(server_url, pngs, c, duration))
    else:
        level = wrk_level(server_url, pngs[0], c, duration)
    return meter.add_to(level)


def measure(server_url: str, pngs: list[bytes], python_levels: list[int], native_levels: list[int], duration: float,
            done: dict | None = None, pid: int | None = None) -> dict:
    """Every level not already in `done` ({"python": {...}, "native": {...}}), one after another."""
    out: dict = done or {"python": {}, "native": {}}
    for client, levels in (("python", python_levels), ("native", native_levels)):
        for c in levels:
            if str(c) in out[client]:
                continue
            settle(server_url)
            print(f"  {'wrk' if client == 'native' else 'python client'}, concurrency {c} for {duration:g} s ...", flush=True)
            out[client][str(c)] = run_level(client, server_url, pngs, c, duration, pid)
            print("   ", {k: out[client][str(c)][k] for k in ("throughput_img_s", "p50", "p99", "errors")}, flush=True)
    return out


C1_ROUNDS = 5


def interleaved_c1(urls: dict[str, str], pngs: list[bytes], clients: list[str], duration: float,
                   pids: dict[str, int | None] | None = None) -> dict:
    """c=1 for every server, in `rounds` short rounds that alternate between them (ABBA...):
    a fraction of a millisecond is less than a VM drifts in a minute (docs/benchmark.md). Each server gets `duration` seconds in all; combine_rounds() merges its rounds."""
    rounds = max(1, min(C1_ROUNDS, int(duration)))  # rounds of whole seconds (wrk takes no fractions)
    per = {kind: {"python": [], "native": []} for kind in urls}
    for client in clients:
        print(f"  c=1, {' and '.join(urls)} alternating, {rounds} rounds of {duration / rounds:g} s, "
              f"{'wrk' if client == 'native' else 'python client'} ...", flush=True)
        for r in range(rounds):
            for kind in (list(urls) if r % 2 == 0 else list(urls)[::-1]):
                per[kind][client].append(run_level(client, urls[kind], pngs, 1, duration / rounds, (pids or {}).get(kind)))
    out = {kind: {"python": {}, "native": {}} for kind in urls}
    for kind in urls:
        for client in clients:
            out[kind][client]["1"] = combine_rounds(per[kind][client])
            print(f"    {kind}:", {k: out[kind][client]["1"][k] for k in ("throughput_img_s", "p50", "p99", "errors")}, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        python_levels, native_levels = _levels(args.python_concurrency), _levels(args.native_concurrency)
        kinds = [k for k in args.servers.split(",") if k]
        if args.duration <= 0 or args.images < 1 or not set(kinds) <= {"service", "reference"}:
            raise ValueError
    except ValueError:
        print("error: concurrency levels must be positive integers like 1,16; --duration and --images positive; "
              "--servers service and/or reference", file=sys.stderr)
        return 2
    if native_levels and not have_wrk():
        print("error: wrk is not installed (apt-get install wrk), or pass --native-concurrency ''", file=sys.stderr)
        return 2
    folder = Path(args.model)
    if not (folder / CARD).is_file():
        print(f"error: no exported model in {folder} (card.json missing)", file=sys.stderr)
        return 2
    if args.url:  # the running service says what it serves; ask before any slow step
        args.url = args.url.rstrip("/")
        try:
            info = httpx.get(f"{args.url}/model", timeout=10)
            info.raise_for_status()
            variants, kinds = [info.json()["variant"]], ["service"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            print(f"error: no NiN service answers GET {args.url}/model ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else 'no detail'})", file=sys.stderr)
            return 2
    else:
        variants = [v for v in args.variants.split(",") if v]
        have = [v for v in available_variants(json.loads((folder / CARD).read_text()))
                if (folder / VARIANT_FILES[v]).is_file()]
        bad = [v for v in variants if v not in have]
        if bad or not variants:
            what = f"{', '.join(bad)} not in {folder}" if bad else "no variant named"
            print(f"error: --variants {args.variants!r}: {what} (it serves {', '.join(have)})", file=sys.stderr)
            return 2
    import torch

    from training.runtime import hardware_name

    pngs, _ = real_test_pngs(args.images, args.data_dir)
    card = json.loads((folder / CARD).read_text())
    contract = card["input_contract"]
    x = imaging.normalize([imaging.to_contract(p, contract, 10**8).image for p in pngs[:64]], contract)
    hardware = hardware_name(torch.device("cpu"))
    if args.provider == "cuda":
        hardware = f"{hardware_name(torch.device('cuda'))} + {hardware}"
    result = {"hardware": hardware, "images": len(pngs), "duration_s": args.duration, "runs": {}, "baselines": {}}
    for v in variants:
        if v in VARIANT_FILES and (folder / VARIANT_FILES[v]).is_file():
            print(f"baseline: onnxruntime {v} in-process ...", flush=True)
            result["baselines"][v] = ort_baseline(folder / VARIANT_FILES[v], x, provider=args.provider,
                                                  batches=(1, 8, 16, 32, 64) + ((128, 256) if args.provider == "cuda" else ()))
    print("baseline: PyTorch eager ...", flush=True)
    result["baselines"]["torch"] = torch_baseline(folder, x)

    for v in variants:
        servers: dict[str, Server | None] = {}
        try:
            for kind in kinds:
                servers[kind] = None if args.url else Server(kind, str(folder), v)
            urls = {kind: args.url or servers[kind].url for kind in kinds}
            pids = {kind: servers[kind].root_pid if servers[kind] else None for kind in kinds}  # CPU: each one's process tree
            for url in urls.values():
                warm(url, pngs)
            c1_clients = [c for c, levels in (("python", python_levels), ("native", native_levels)) if 1 in levels]
            done = (interleaved_c1(urls, pngs, c1_clients, args.duration, pids) if len(urls) > 1 and c1_clients
                    else {kind: None for kind in urls})
            for kind, url in urls.items():
                print(f"{kind} {v}:", flush=True)
                run = {"kind": kind, "variant": v, "provider": "CPUExecutionProvider"}
                if kind == "service":
                    info = httpx.get(f"{url}/model", timeout=10).json()
                    run["provider"] = info["provider"]
                    run["latency_budget_ms"] = info.get("limits", {}).get("latency_budget_ms")
                run.update(measure(url, pngs, python_levels, native_levels, args.duration, done[kind], pids[kind]))
                result["runs"][f"{kind}-{v}"] = run
                if args.soak and kind == "service" and v == variants[0]:
                    settle(url)
                    print(f"soak: {args.soak:,} requests ...", flush=True)
                    pid = httpx.get(f"{url}/model", timeout=10).json()["pid"]
                    result["soak"] = asyncio.run(soak(url, pngs, args.soak, 16, pid))
        finally:
            for server in servers.values():
                if server:
                    server.close()
    result["targets"] = targets(result)
    write_results(args.out, "bench", result, markdown(result))
    plot(result, Path(args.out))
    print(markdown(result))
    return 0

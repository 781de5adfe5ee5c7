"""`python -m bench.breakdown`: where a lone request's time goes, in the service and in the
hand-written reference server, side by side.

Both servers up at once, one keep-alive client (httpx) sending real 224x224 test PNGs one at a
time, alternating between the servers in rounds (ABBA...: a VM's drift over a minute can exceed
the differences measured). Per request, each server's own clocks split its time into
  before     from the request entering the app to the model's run (the service: reading and
             parsing the body, decoding, normalizing, the queue; the reference: FastAPI's routing
             and form parsing, the hop to its thread pool, decoding, normalizing),
  inference  the model's run (the service: from handing the batch over to its logits, with the
             peak-memory reading),
  after      from the run to the answer (softmax, top-k, the JSON),
and `outside` = the client's latency minus those three: HTTP parsing, the layers in front of the
app (for the service, BentoML's outer middlewares) and the client itself. Medians over every
request. The service reports its phases in `timing_ms`; the reference runs as
bench/reference_timed.py (the same app with two clocks, its code unchanged).

    .venv/bin/python -m bench.breakdown                          # int8 and fp32, 8 rounds of 200 requests
    .venv/bin/python -m bench.breakdown --variants int8 --rounds 2 --requests 20 --out breakdown.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

from bench.images import real_test_pngs
from bench.servers import free_port, start_reference, start_server, stop_server, wait_ready
from serving.model_files import CARD, DEFAULT_MODEL

PHASES = ("client", "in_app", "before", "inference", "after", "outside")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="exported model folder")
    p.add_argument("--variants", default="int8,fp32", help="comma-separated: int8, fp32")
    p.add_argument("--rounds", type=int, default=8, help="rounds per server, alternating (default 8)")
    p.add_argument("--requests", type=int, default=200, help="requests per round (default 200)")
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    return p


def server_timing(header: str) -> dict[str, float]:
    """'before;dur=0.8, inference;dur=6.2' -> {'before': 0.8, 'inference': 6.2} (ms)."""
    out = {}
    for item in header.split(","):
        name, _, dur = item.strip().partition(";dur=")
        if name and dur:
            out[name] = float(dur)
    return out


def phases_of(kind: str, response: httpx.Response, client_ms: float) -> dict[str, float]:
    """One answer's phases (ms): from the service's timing_ms or the reference's Server-Timing."""
    if kind == "service":
        t = response.json()["timing_ms"]
        before = t["read"] + t["decode"] + t["preprocess"] + t["queue"]
        row = {"before": before, "inference": t["inference"], "after": t["total"] - before - t["inference"]}
    else:
        row = server_timing(response.headers["server-timing"])
    row["in_app"] = row["before"] + row["inference"] + row["after"]
    return {**row, "client": client_ms, "outside": client_ms - row["in_app"]}


def measure(urls: dict[str, str], pngs: list[bytes], rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    rows: dict[str, list[dict]] = {kind: [] for kind in urls}
    with httpx.Client(timeout=30) as client:
        for kind, url in urls.items():  # connections and first requests
            for png in pngs[:20]:
                client.post(f"{url}/classify", files={"image": ("a.png", png, "image/png")}).raise_for_status()
        for r in range(rounds):
            for kind in (list(urls) if r % 2 == 0 else list(urls)[::-1]):
                for i in range(per_round):
                    png = pngs[i % len(pngs)]
                    t = time.perf_counter()
                    response = client.post(f"{urls[kind]}/classify", files={"image": ("a.png", png, "image/png")})
                    client_ms = (time.perf_counter() - t) * 1000
                    response.raise_for_status()
                    rows[kind].append(phases_of(kind, response, client_ms))
    return {kind: {p: round(statistics.median(row[p] for row in rows[kind]), 3) for p in PHASES} | {"requests": len(rows[kind])}
            for kind in urls}


def table(results: dict[str, dict]) -> str:
    lines = ["| variant | server | client p50 ms | in the app | before the run | inference | after | outside the app |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, by_server in results.items():
        for kind, m in by_server.items():
            lines.append(f"| {variant} | {kind} | " + " | ".join(f"{m[p]:.2f}" for p in PHASES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not variants or not set(variants) <= {"int8", "fp32"} or args.rounds < 1 or args.requests < 1:
        print("error: --variants takes int8 and/or fp32; --rounds and --requests must be positive", file=sys.stderr)
        return 2
    if not (Path(args.model) / CARD).is_file():
        print(f"error: no exported model in {args.model} (card.json missing)", file=sys.stderr)
        return 2
    pngs = real_test_pngs(100)[0]
    results = {}
    for variant in variants:
        ports = {"service": free_port(), "reference": free_port()}
        procs = {"service": start_server(args.model, ports["service"], {"NIN_VARIANT": variant}, quiet=True),
                 "reference": start_reference(args.model, variant, ports["reference"], quiet=True,
                                              module="bench.reference_timed")}
        urls = {kind: f"http://127.0.0.1:{port}" for kind, port in ports.items()}
        try:
            for kind in urls:
                wait_ready(urls[kind], procs[kind])
            print(f"{variant}: {args.rounds} alternating rounds of {args.requests} requests per server ...", flush=True)
            results[variant] = measure(urls, pngs, args.rounds, args.requests)
        finally:
            for proc in procs.values():
                stop_server(proc)
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

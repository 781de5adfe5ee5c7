"""`python -m bench.ab`: servers side by side on one machine, in alternating rounds, with wrk.

Every arm is started at once on its own port (the service, its layers swapped for BentoML's own
in bench/arms.py, the hand-written FastAPI server in both styles, LitServe with and without its
batching); then, round after round, each concurrency level is measured on every arm in turn, the
order rotating each round, so no arm owns the machine's quiet or busy minutes. Figures are the
medians over rounds. Nothing else should run meanwhile (pause a training run with SIGSTOP).

    .venv/bin/python -m bench.ab --arms service,fastapi-routes,adaptive-100 --levels 1,16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.baselines import ort_baseline
from bench.images import real_test_pngs
from bench.load import CpuMeter, have_wrk, wrk_level
from bench.servers import _spawn, free_port, stop_server, wait_ready, write_results
from serving import imaging
from serving.model_files import CARD, DEFAULT_MODEL, VARIANT_FILES
from training.runtime import hardware_name

PY = sys.executable
SERVE = [PY, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", "{port}"]
# name -> (command, extra environment, path, multipart field, readiness path[, images per request])
ARMS: dict[str, tuple] = {
    "service": (SERVE + ["bench.arms:svc"], {"NIN_AB_ARM": "service"}, "/classify", "image", "/readyz"),
    **{f"workers-{n}": (SERVE + ["bench.arms:svc"], {"NIN_AB_ARM": "service", "NIN_WORKERS": str(n)}, "/classify", "image",
                        "/readyz") for n in (1, 2, 4)},
    "workers-2-threads-1": (SERVE + ["bench.arms:svc"], {"NIN_AB_ARM": "service", "NIN_WORKERS": "2", "NIN_THREADS": "1"},
                            "/classify", "image", "/readyz"),
    "batch16": (SERVE + ["bench.arms:svc"], {"NIN_AB_ARM": "service"}, "/classify_batch", "images", "/readyz", 16),
    "workers-1-batch16": (SERVE + ["bench.arms:svc"], {"NIN_AB_ARM": "service", "NIN_WORKERS": "1"}, "/classify_batch",
                          "images", "/readyz", 16),
    "fastapi-routes": (SERVE + ["bench.arms:svc"], {"NIN_AB_ARM": "fastapi-routes"}, "/classify", "image", "/readyz"),
    "no-bentoml-layers": (SERVE + ["bench.arms:svc"], {"NIN_AB_ARM": "no-bentoml-layers"}, "/classify", "image", "/readyz"),
    "max-concurrency": (SERVE + ["bench.arms:svc"], {"NIN_AB_ARM": "max-concurrency", "NIN_MAX_QUEUE": "100000"},
                        "/classify", "image", "/readyz"),
    **{f"adaptive-{ms}": (SERVE + ["bench.arms:svc"], {"NIN_AB_ARM": "adaptive", "NIN_AB_MAX_LATENCY_MS": str(ms),
                                                       "NIN_LANES": "0"}, "/classify_adaptive", "images", "/readyz")
       for ms in (20, 100, 1000)},
    "fastapi-def": ([PY, "-m", "uvicorn", "bench.reference:app", "--host", "127.0.0.1", "--port", "{port}",
                     "--log-level", "warning"], {}, "/classify", "image", "/readyz"),
    "fastapi-async": ([PY, "-m", "uvicorn", "bench.reference:app", "--host", "127.0.0.1", "--port", "{port}",
                       "--log-level", "warning"], {}, "/classify_async", "image", "/readyz"),
    "litserve": ([PY, "-m", "bench.litserve_peer", "{port}"], {"NIN_LITSERVE_BATCH": "1"}, "/predict", "image", "/health"),
    "litserve-batch": ([PY, "-m", "bench.litserve_peer", "{port}"], {"NIN_LITSERVE_BATCH": "16"}, "/predict", "image",
                       "/health"),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Servers side by side in alternating rounds (wrk).")
    p.add_argument("--arms", default="service,fastapi-def,fastapi-async,litserve,litserve-batch",
                   help=f"comma-separated, from {', '.join(ARMS)} (default: the service and its peers)")
    p.add_argument("--variant", choices=["int8", "fp32"], default="int8", help="model variant every arm serves (default: int8)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="exported model folder")
    p.add_argument("--null-model", action="store_true",
                   help="serve a near-free model of the same contract instead (bench/null_model.py): the serving cost alone")
    p.add_argument("--levels", default="1,16", help="concurrency levels (default: 1,16)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the arms' order rotating each round (default: 3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per arm, level and round (default: 5)")
    p.add_argument("--out", default=None, help="folder for ab.json and ab.md (default: print only)")
    return p


def start(name: str, model: str, variant: str):
    cmd, env, path, field, ready, *images = ARMS[name]
    port = free_port()
    proc = _spawn([c.replace("{port}", str(port)) for c in cmd],
                  {"NIN_MODEL": model, "NIN_VARIANT": variant, "NIN_REF_MODEL": model, "NIN_REF_VARIANT": variant, **env},
                  quiet=True)
    proc.url, proc.path, proc.field, proc.ready = f"http://127.0.0.1:{port}", path, field, ready
    proc.images = images[0] if images else 1
    return proc


def median_level(runs: list[dict]) -> dict:
    keys = ("p50", "p90", "p99", "mean", "throughput_img_s", "rejected_share", "server_cpu_ms_per_answer",
            "server_cpu_ms_per_image")
    out = {k: round(statistics.median(r[k] for r in runs if r.get(k) is not None), 3)
           for k in keys if any(r.get(k) is not None for r in runs)}
    out["rounds"] = [{k: r.get(k) for k in keys} for r in runs]
    out["errors"] = sum(r["errors"] - r.get("rejected_503", 0) for r in runs)
    out["error_kinds"] = sorted({k for r in runs for k in r.get("error_kinds", {})})
    return out


def paired(mine: list[dict], other: list[dict]) -> dict:
    """Two arms' rounds side by side: median p50 difference (mine - other), rounds mine was
    behind, median throughput ratio. Pairing by round takes out the minutes' noise both shared."""
    diffs = [a["p50"] - b["p50"] for a, b in zip(mine, other)]
    ratios = [a["throughput_img_s"] / b["throughput_img_s"] for a, b in zip(mine, other) if b["throughput_img_s"]]
    return {"p50_diff_ms": round(statistics.median(diffs), 3), "behind": sum(d > 0 for d in diffs), "rounds": len(diffs),
            "img_s_ratio": round(statistics.median(ratios), 3) if ratios else float("nan")}


def markdown(result: dict) -> str:
    levels = result["levels"]
    head = "| arm | " + " | ".join(f"c={c} p50 ms | c={c} img/s | c={c} p99 ms" for c in levels) + " |"
    lines = [f"# A/B: {result['variant']}{' (null model: serving cost alone)' if result.get('null_model') else ''}, "
             f"{result['hardware']}", "",
             f"{result['rounds']} rounds of {result['duration_s']:g} s per arm and level, order rotating; medians "
             "over rounds (wrk, one thread, keep-alive).", "", head, "|---|" + "---|---|---|" * len(levels)]
    for arm, by_level in result["arms"].items():
        cells = []
        for c in levels:
            r = by_level[str(c)]
            refused = f" ({r['rejected_share']:.0%} 503)" if r.get("rejected_share") else ""
            failed = f" [{r['errors']} failed: {', '.join(r['error_kinds'])}]" if r["errors"] else ""
            cells.append(f"{r['p50']} | {r['throughput_img_s']}{refused}{failed} | {r['p99']}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Server CPU per image (core-ms: user + system time of the server's processes over the level, per image "
              "answered):", "", "| arm | " + " | ".join(f"c={c}" for c in levels) + " |", "|---|" + "---|" * len(levels)]
    for arm, by_level in result["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(str(by_level[str(c)].get("server_cpu_ms_per_image", "–")) for c in levels) + " |")
    first = next(iter(result["arms"]))
    lines += ["", f"{first} against each other arm, paired by round (same round, same minutes): the median of its p50 "
              "minus the other's (negative: ahead) and the rounds it was behind; its img/s over the other's:", "",
              "| arm | " + " | ".join(f"c={c} p50 diff ms, rounds behind | c={c} img/s ratio" for c in levels) + " |",
              "|---|" + "---|---|" * len(levels)]
    for arm in list(result["arms"])[1:]:
        cells = []
        for c in levels:
            d = paired(result["arms"][first][str(c)]["rounds"], result["arms"][arm][str(c)]["rounds"])
            cells.append(f"{d['p50_diff_ms']:+.2f}, {d['behind']} of {d['rounds']} | {d['img_s_ratio']:.2f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    ip = result.get("in_process")
    if ip:
        lines += ["", f"In process, no server (onnxruntime's defaults, the same image): batch 1 {ip['batch1_ms']} ms; "
                      f"best {ip['best_img_s']} img/s at batch {ip['best_batch']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    try:
        levels = [int(c) for c in args.levels.split(",") if c.strip()]
    except ValueError:
        levels = []
    if unknown or not arms or not levels or min(levels) < 1 or args.rounds < 1 or args.duration < 1:
        print(f"error: bad arguments (unknown arms {unknown}; levels {args.levels!r}; rounds and duration >= 1)", file=sys.stderr)
        return 2
    if not have_wrk():
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    png = real_test_pngs(1)[0][0]
    procs = {}
    if args.null_model:
        from bench.null_model import make_null_model

        args.model = str(make_null_model(tempfile.mkdtemp(prefix="nin-null-"), args.model))
    try:
        for name in arms:
            procs[name] = start(name, args.model, args.variant)
        for proc in procs.values():
            wait_ready(proc.url, proc, timeout=240, path=proc.ready)
        for proc in procs.values():  # one short pass each: first-request costs out of the rounds
            wrk_level(proc.url, png, 1, 1, path=proc.path, field=proc.field, images=proc.images)
        runs: dict[str, dict[int, list]] = {a: {c: [] for c in levels} for a in arms}
        for rnd in range(args.rounds):
            order = arms[rnd % len(arms):] + arms[: rnd % len(arms)]
            for c in levels:
                for name in order:
                    proc = procs[name]
                    meter = CpuMeter(proc.pid)
                    level = meter.add_to(wrk_level(proc.url, png, c, args.duration, path=proc.path, field=proc.field,
                                                   images=proc.images))
                    per = level.get("server_cpu_ms_per_answer")
                    level["server_cpu_ms_per_image"] = round(per / proc.images, 3) if per is not None else None
                    runs[name][c].append(level)
                    print(f"round {rnd + 1} c={c} {name}: p50 {level['p50']} ms, {level['throughput_img_s']} img/s, "
                          f"{level['rejected_share']:.0%} 503, {level['errors'] - level['rejected_503']} failed", flush=True)
                    time.sleep(1)  # what a level left queued drains before the next arm's
    finally:
        for proc in procs.values():
            stop_server(proc)
    result = {"variant": args.variant, "null_model": args.null_model, "hardware": hardware_name(torch.device("cpu")), "rounds": args.rounds,
              "duration_s": args.duration,
              "levels": levels, "arms": {a: {str(c): median_level(runs[a][c]) for c in levels} for a in arms},
              "in_process": in_process(Path(args.model), args.variant, png)}
    text = markdown(result)
    print(text)
    write_results(args.out, "ab", result, text)
    return 0


def in_process(folder: Path, variant: str, png: bytes) -> dict:
    """onnxruntime alone on the same image, servers stopped: the ceiling every arm sits under."""
    card = json.loads((folder / CARD).read_text())
    x = imaging.normalize([imaging.to_contract(png, card["input_contract"], 10**8).image], card["input_contract"])
    return ort_baseline(folder / VARIANT_FILES[variant], x)


if __name__ == "__main__":
    sys.exit(main())

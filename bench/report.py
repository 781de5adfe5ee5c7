"""bench.md, the service's targets against the reference and the ceiling (met or missed, with the figures), and bench.png."""

from __future__ import annotations

from pathlib import Path

COLUMNS = ("concurrency", "client", "img/s", "p50 ms", "p90", "p95", "p99", "max", "errors", "503 share",
           "server queue ms", "server inference ms", "mean batch", "peak RSS MB", "client CPU (cores)",
           "server CPU ms / answer", "idle CPU")


def _row(c: str, r: dict, gpu: bool) -> str:
    cells = [c, r["client"], r["throughput_img_s"], r["p50"], r["p90"], r["p95"], r["p99"], r["max"], r["errors"],
             f"{r.get('rejected_share', 0):.1%}", r.get("server_queue_ms"), r.get("server_inference_ms"),
             r.get("mean_batch_size"), r.get("peak_rss_mb"), r.get("client_cpu_cores"), r.get("server_cpu_ms_per_answer"),
             None if r.get("idle_share") is None else f"{r['idle_share']:.1%}"]
    if gpu:
        cells.append(r.get("gpu_mb"))
    return "| " + " | ".join("–" if v is None else str(v) for v in cells) + " |"


def markdown(result: dict) -> str:
    lines = [f"Hardware: {result['hardware']}; {result['images']} real test images as 224x224 PNG "
             f"(multipart field `image`); {result['duration_s']} s per level. Python client: aiohttp, "
             "latency over answered requests; wrk: one prebuilt body, latency over all answers. Server CPU: "
             "utime + stime of the server's process tree over the level (/proc), per answer (200s and 503s); "
             "idle CPU: the machine's idle share over the level.", ""]
    for key, run in result["runs"].items():
        levels = [(c, r) for client in ("python", "native") for c, r in run.get(client, {}).items()]
        gpu = any(r.get("gpu_mb") is not None for _, r in levels)
        title = "service" if run["kind"] == "service" else "reference FastAPI server (bench/reference.py)"
        lines += [f"### {title}, {run['variant']} ({run['provider']})", "",
                  "| " + " | ".join(COLUMNS + (("GPU MB",) if gpu else ())) + " |",
                  "|" + "---|" * (len(COLUMNS) + gpu)]
        lines += [_row(c, r, gpu) for c, r in levels]
        failed = [f"- {r['client']} c={c}: {n} x {kind}" for c, r in levels for kind, n in r.get("error_kinds", {}).items()]
        lines += (["", "Failed or refused requests:", *failed] if failed else []) + [""]
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


def _level(result: dict, kind: str, variant: str, client: str, c: int) -> dict | None:
    return result["runs"].get(f"{kind}-{variant}", {}).get(client, {}).get(str(c))


def targets(result: dict) -> list[dict]:
    """The service's goals (c=1 latency and throughput beside the reference, near the ceiling), each met or missed with its figures."""
    out = []
    variants = sorted({run["variant"] for run in result["runs"].values()})
    for v in variants:
        base = result["baselines"].get(v)
        for client in ("python", "native"):
            svc, ref = _level(result, "service", v, client, 1), _level(result, "reference", v, client, 1)
            if svc and ref:
                out.append({"what": f"{v}, {client} client: service p50 at c=1 below the reference's",
                            "met": svc["p50"] < ref["p50"], "detail": f"{svc['p50']} vs {ref['p50']} ms"})
        svc = _level(result, "service", v, "native", 1) or _level(result, "service", v, "python", 1)
        if svc and base:
            over = svc["p50"] - base["batch1_ms"]
            out.append({"what": f"{v} (aim): service overhead at c=1 <= 3 ms over in-process batch 1",
                        "met": over <= 3, "detail": f"p50 {svc['p50']} ({svc['client']}) - {base['batch1_ms']} = {over:.2f} ms"})
        svc, ref = _level(result, "service", v, "native", 16), _level(result, "reference", v, "native", 16)
        if svc and ref and ref["throughput_img_s"]:
            ratio = svc["throughput_img_s"] / ref["throughput_img_s"]
            out.append({"what": f"{v}, native client: service throughput at c=16 >= 1.3x the reference's",
                        "met": ratio >= 1.3, "detail": f"{svc['throughput_img_s']} vs {ref['throughput_img_s']} img/s: {ratio:.2f}x"})
        if svc and base:
            share = svc["throughput_img_s"] / base["best_img_s"]
            out.append({"what": f"{v} (aim): service throughput at c=16 >= 0.80 of in-process best batch",
                        "met": share >= 0.8, "detail": f"{svc['throughput_img_s']} vs {base['best_img_s']} (batch {base['best_batch']}): {share:.0%}"})
        budget = result["runs"].get(f"service-{v}", {}).get("latency_budget_ms")
        for c in (64, 256):
            lvl = _level(result, "service", v, "python", c)  # it times each answer: admitted ones apart
            if lvl and budget:
                out.append({"what": f"{v}: at c={c} admitted requests' p99 within the {budget:g} ms budget",
                            "met": lvl["p99"] <= budget and lvl["errors"] == lvl["rejected_503"],
                            "detail": f"p99 {lvl['p99']} ms over {lvl['requests']} answered; 503 share {lvl['rejected_share']:.1%}; "
                                      f"other failures {lvl['errors'] - lvl['rejected_503']}"})
        lvl = _level(result, "service", v, "native", 16) or _level(result, "service", v, "python", 16)
        if lvl:
            out.append({"what": f"{v}: no request fails below the bound (c=16)", "met": lvl["errors"] == 0,
                        "detail": f"{lvl['errors']} failed of {lvl['requests'] + lvl['errors']} ({lvl['client']})"})
    if result.get("soak"):
        s = result["soak"]
        out.append({"what": "soak: zero errors and RSS growth < 50 MB after warm-up", "met": s["errors"] == 0 and s["rss_growth_mb"] < 50,
                    "detail": f"{s['errors']} errors, {s['rss_growth_mb']} MB"})
    return out


def plot(result: dict, out: Path) -> None:
    """Left: p99 of answered requests (Python client: refusals apart); right: throughput (wrk,
    else the Python client)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, run in result["runs"].items():
        style = "-o" if run["kind"] == "service" else "--s"
        answered = run.get("python") or {}
        if answered:
            cs = [int(c) for c in answered]
            a.plot(cs, [answered[str(c)]["p99"] for c in cs], style, label=key)
        levels = run.get("native") or answered
        if levels:
            cs = [int(c) for c in levels]
            b.plot(cs, [levels[str(c)]["throughput_img_s"] for c in cs], style, label=key)
    for v, base in result["baselines"].items():
        if base and v != "torch":
            b.axhline(base["best_img_s"], ls=":", color="grey")
            b.annotate(f"in-process {v} best", (1, base["best_img_s"]), fontsize=7, va="bottom")
    client = "wrk" if any(run.get("native") for run in result["runs"].values()) else "Python client"
    a.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="p99 of answered requests (ms)",
          title="latency of admitted requests (Python client)")
    b.set(xscale="log", xlabel="concurrency", ylabel="images / s", title=f"throughput ({client})")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    plt.close(fig)

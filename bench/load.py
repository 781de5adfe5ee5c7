"""Load generators: a Python client (aiohttp + asyncio, every answer parsed, the server's own
timing figures collected) and a native one (wrk, one prebuilt multipart body), so the Python
client's own CPU does not hide the server's cost.

Both are closed loops: N connections, each sending the next request when the last answer came,
and both behave as a client should after a 503: wait its Retry-After before sending again (a
client that re-sends at once turns refusals into a busy loop that eats the cores they protect).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import subprocess  # nosec B404  # the benchmark runs wrk, a fixed argument list, never a shell
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np
import psutil

from bench.images import multipart_body
from serving.procfs import read_status_kb


def error_kind(exc: Exception) -> str:
    """One short line per request that failed with an exception (an HTTP failure is named by its
    status and body where it is read), so a report says what failed, not only how often."""
    message = str(exc)[:80]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


async def classify(session: aiohttp.ClientSession, body: tuple[bytes, str], errors: Counter) -> dict | None:
    """POST one prebuilt multipart body (field `image`: what `curl -F image=@x.png` sends) to
    /classify: the parsed 200 answer, or None with the failure counted by kind, after waiting a
    503's Retry-After."""
    data, ctype = body
    try:
        async with session.post("/classify", data=data, headers={"Content-Type": ctype}) as r:
            text = await r.text()
            if r.status == 200:
                return json.loads(text)
            errors[f"HTTP {r.status}: {text[:80]}"] += 1
            after = r.headers.get("Retry-After", "")
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        errors[error_kind(e)] += 1
        return None
    if r.status == 503 and after.isdigit():
        await asyncio.sleep(int(after))
    return None


def summarize(latencies_ms: list[float], errors: Counter, seconds: float, server: list[dict]) -> dict:
    """Percentiles over the answered (200) requests; failures counted by kind beside them."""
    lat = np.asarray(latencies_ms) if latencies_ms else np.zeros(1)
    pct = {f"p{p}": round(float(np.percentile(lat, p)), 2) for p in (50, 90, 95, 99)}
    timed = [s for s in server if "timing_ms" in s]  # the reference server reports no timings
    mean = lambda key: round(float(np.mean([s["timing_ms"][key] for s in timed])), 3) if timed else None  # noqa: E731
    rejected = sum(n for kind, n in errors.items() if kind.startswith("HTTP 503"))
    total = len(latencies_ms) + sum(errors.values())
    return {
        "requests": len(latencies_ms), "errors": sum(errors.values()), "error_kinds": dict(errors),
        "rejected_503": rejected, "rejected_share": round(rejected / total, 4) if total else 0.0,
        "seconds": round(seconds, 2),
        "throughput_img_s": round(len(latencies_ms) / seconds, 1) if seconds else 0.0,
        **pct, "max": round(float(lat.max()), 2),
        "server_queue_ms": mean("queue"), "server_inference_ms": mean("inference"), "server_total_ms": mean("total"),
        "mean_batch_size": round(float(np.mean([s["batch_size"] for s in timed])), 2) if timed else None,
        "peak_rss_mb": max((s["memory"]["peak_rss_mb"] for s in timed), default=None),
        "gpu_mb": max((s["memory"]["gpu_mb"] for s in timed if s["memory"].get("gpu_mb") is not None), default=None),
    }


def combine_rounds(rounds: list[dict]) -> dict:
    """One level measured in several short rounds as one result: counts and seconds summed,
    percentiles the median of the rounds' (wrk reports percentiles, not latencies), max the
    max, the server's timings averaged over its answers, memory the highest."""
    out = dict(rounds[0])
    n, seconds = sum(r["requests"] for r in rounds), sum(r["seconds"] for r in rounds)
    errors, rejected = sum(r["errors"] for r in rounds), sum(r["rejected_503"] for r in rounds)
    kinds: Counter = Counter()
    for r in rounds:
        kinds.update(r["error_kinds"])
    out.update(requests=n, errors=errors, error_kinds=dict(kinds), rejected_503=rejected, rounds=len(rounds),
               rejected_share=round(rejected / (n + errors), 4) if n + errors else 0.0, seconds=round(seconds, 2),
               throughput_img_s=round(n / seconds, 1) if seconds else 0.0,
               max=max(r["max"] for r in rounds), client_cpu_cores=round(float(np.mean([r["client_cpu_cores"] for r in rounds])), 2))
    for key in ("p50", "p90", "p95", "p99", "mean"):
        if key in out:
            out[key] = round(float(np.median([r[key] for r in rounds])), 2)
    for key in ("server_queue_ms", "server_inference_ms", "server_total_ms", "mean_batch_size"):
        if out.get(key) is not None:
            out[key] = round(sum(r[key] * r["requests"] for r in rounds) / n, 3) if n else None
    for key in ("peak_rss_mb", "gpu_mb"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = max(values) if values else None
    if all("server_cpu_s" in r for r in rounds):
        out.update({k: sum(r[k] for r in rounds) for k in ("cpu_idle_ticks", "cpu_total_ticks")},
                   server_cpu_s=round(sum(r["server_cpu_s"] for r in rounds), 2))
        with_cpu_figures(out)
    return out


async def load_level(url: str, pngs: list[bytes], concurrency: int, duration: float) -> dict:
    """`concurrency` clients, each sending the next image as soon as the last answer came, for
    `duration` seconds. aiohttp with bodies built beforehand: a few times less client CPU than
    httpx, so at c=256 the client measures the server, not itself."""
    bodies = [multipart_body(p) for p in pngs]
    latencies, server, errors = [], [], Counter()
    sent = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        start, cpu0 = time.perf_counter(), time.process_time()
        stop_at = start + duration

        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < stop_at:
                body = bodies[sent % len(bodies)]
                sent += 1
                t = time.perf_counter()
                answer = await classify(session, body, errors)
                if answer is not None:
                    latencies.append((time.perf_counter() - t) * 1000)
                    server.append(answer)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
        client_cores = (time.process_time() - cpu0) / seconds
    return {**summarize(latencies, errors, seconds, server), "client": "python", "client_cpu_cores": round(client_cores, 2)}


def rss_mb(pid: int) -> float:
    kb = read_status_kb("VmRSS", pid)
    if kb is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return kb / 1024


class CpuMeter:
    """The CPU a server's processes (the root process and its descendants: `bentoml serve`, the
    circus arbiter and the worker, which runs in a process group of its own; or uvicorn) used over
    a level, and the machine's idle share, from Linux's /proc: steadier than wall-clock throughput
    on a noisy VM. Off Linux, or without a root, it adds nothing."""

    def __init__(self, root_pid: int | None) -> None:
        self.root_pid = root_pid
        self.start = self._read() if root_pid else None

    def _read(self) -> tuple[float, int, int] | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]
            root = psutil.Process(self.root_pid)
            tree = [root, *root.children(recursive=True)]
        except (OSError, psutil.Error):
            return None
        cpu = 0.0
        for proc in tree:
            try:
                cpu += sum(proc.cpu_times()[:2])  # user + system
            except psutil.Error:  # gone meanwhile
                pass
        return cpu, ticks[3] + ticks[4], sum(ticks)

    def add_to(self, level: dict) -> dict:
        """`level` with server_cpu_s, cpu_idle_ticks / cpu_total_ticks (raw, for combine_rounds), and
        server CPU ms per answer (200s and 503s alike: each is a full HTTP exchange) and idle share."""
        end = self._read() if self.start else None
        if end is None:
            return level
        cpu, idle, total = (b - a for a, b in zip(self.start, end))
        level.update(server_cpu_s=round(cpu, 2), cpu_idle_ticks=idle, cpu_total_ticks=total)
        return with_cpu_figures(level)


def with_cpu_figures(level: dict) -> dict:
    answers = level["requests"] + level.get("rejected_503", 0)
    level["server_cpu_ms_per_answer"] = round(level["server_cpu_s"] * 1000 / answers, 2) if answers else None
    level["idle_share"] = round(level["cpu_idle_ticks"] / level["cpu_total_ticks"], 3) if level["cpu_total_ticks"] else None
    return level


async def soak(url: str, pngs: list[bytes], requests: int, concurrency: int, pid: int, warmup: int = 500) -> dict:
    """`requests` requests; the worker's RSS sampled every 250; growth measured after `warmup`."""
    bodies = [multipart_body(p) for p in pngs]
    samples, done, errors = [], 0, Counter()
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def worker() -> None:
            nonlocal done
            while done < requests:
                body = bodies[done % len(bodies)]
                done += 1
                if done % 250 == 0:
                    samples.append((done, round(rss_mb(pid), 1)))
                await classify(session, body, errors)

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t
    after = [rss for n, rss in samples if n >= warmup] or [samples[-1][1]]
    return {"requests": requests, "errors": sum(errors.values()), "error_kinds": dict(errors),
            "seconds": round(seconds, 1), "rss_samples": samples,
            "rss_after_warmup_mb": after[0], "rss_end_mb": after[-1], "rss_max_mb": max(after),
            "rss_growth_mb": round(max(after) - after[0], 1)}


# ---- native client ------------------------------------------------------------------------

WRK_SCRIPT = r"""
wrk.method = "POST"
local f = assert(io.open(os.getenv("NIN_BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("NIN_BENCH_CTYPE")
statuses = {}
local backoffs = {}  -- one Retry-After wait owed per 503, taken before the next request is sent
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 503 then
    local after = tonumber(headers["retry-after"] or headers["Retry-After"] or "")
    if after then backoffs[#backoffs + 1] = after * 1000 end
  end
end
delay = function()
  if #backoffs > 0 then return table.remove(backoffs, 1) end
  return 0
end
-- each wrk thread has its own Lua state; done() runs in the main one and reads theirs
local threads = {}
setup = function(thread) threads[#threads + 1] = thread end
done = function(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[k] = (total[k] or 0) + v end
  end
  local s = {}
  for k, v in pairs(total) do s[#s + 1] = string.format('"%d": %d', k, v) end
  io.write(string.format('NIN_WRK {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50": %.3f, "p90": %.3f, "p95": %.3f, "p99": %.3f, "max": %.3f, "mean": %.3f}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(95) / 1000, latency:percentile(99) / 1000, latency.max / 1000, latency.mean / 1000))
  io.write("NIN_WRK_STATUS {" .. table.concat(s, ", ") .. "}\n")
end
"""


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def wrk_level(url: str, png: bytes, concurrency: int, duration: float, timeout_s: float = 10.0,
              path: str = "/classify", field: str = "image", images: int = 1) -> dict:
    """wrk (one thread, `concurrency` keep-alive connections) posting one prebuilt multipart
    body (the PNG in `field`, `images` times) to `path` for `duration` seconds (whole seconds: wrk
    takes no fractions); after a 503 one request waits its Retry-After. Latencies are over every
    answer, 503s included; the share of 503s is reported beside them."""
    if not have_wrk():
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    body, ctype = multipart_body(png, field, count=images)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "body").write_bytes(body)
        (Path(tmp) / "post.lua").write_text(WRK_SCRIPT)
        cmd = ["wrk", "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(duration))}s", "--timeout", f"{timeout_s:g}s",
               "-s", str(Path(tmp) / "post.lua"), f"{url}{path}"]
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60,  # nosec B603  # wrk with arguments built here from the benchmark's own options
                           env={**os.environ, "NIN_BENCH_BODY": str(Path(tmp) / "body"), "NIN_BENCH_CTYPE": ctype})
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith("NIN_WRK")}
    if r.returncode != 0 or "NIN_WRK" not in lines:
        raise RuntimeError(f"wrk failed ({r.returncode}): {(r.stdout + r.stderr)[-500:]}")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w, statuses = json.loads(lines["NIN_WRK"]), json.loads(lines["NIN_WRK_STATUS"])
    seconds = w["duration_us"] / 1e6
    client_cores = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / seconds
    ok = statuses.get("200", 0)
    rejected = statuses.get("503", 0)
    socket_errors = w["connect"] + w["read"] + w["write"] + w["timeout"]
    other = w["requests"] - ok - rejected
    errors = {**({"HTTP 503": rejected} if rejected else {}),
              **{f"HTTP {k}": v for k, v in statuses.items() if k not in ("200", "503")},
              **({"socket errors": socket_errors} if socket_errors else {})}
    return {
        "client": "wrk", "requests": ok, "errors": other + rejected + socket_errors,
        "error_kinds": errors, "rejected_503": rejected,
        "rejected_share": round(rejected / w["requests"], 4) if w["requests"] else 0.0,
        "seconds": round(seconds, 2), "throughput_img_s": round(ok * images / seconds, 1), "images_per_request": images,
        **{k: round(w[k], 2) for k in ("p50", "p90", "p95", "p99", "max", "mean")},
        "latency_over": "all answers", "client_cpu_cores": round(client_cores, 2),
    }

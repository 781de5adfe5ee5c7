"""`python -m bench.rollout` (`make rollout`): a real rolling restart on this machine.

Two replicas of the service (`bentoml serve`) behind Debian's haproxy, which health-checks
/readyz; a closed-loop load of C concurrent clients runs through haproxy for D/2 seconds, then
one replica gets SIGTERM (it drains: serving/drain.py), exits, and is started again; once it is
ready, the other one is restarted the same way; the load goes on for D/2 seconds more. Every request's outcome and latency is kept;
the report gives failures and latency percentiles before, during and after the restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess  # nosec B404  # starts haproxy and the replicas, fixed argument lists, never a shell
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from bench.servers import free_port, start_server, stop_server, wait_ready, write_results
from serving.model_files import DEFAULT_MODEL
from serving.page import SAMPLES

HAPROXY_CFG = """
global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
    retry-on conn-failure empty-response response-timeout
frontend web
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 1 rise 2
{servers}
"""


def haproxy_config(port: int, backends: list[int]) -> str:
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p} check" for i, p in enumerate(backends))
    return HAPROXY_CFG.format(port=port, servers=servers)


def percentiles(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    a = np.asarray(ms)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": len(ms), "p50": round(float(p50), 2), "p90": round(float(p90), 2), "p99": round(float(p99), 2),
            "max": round(float(a.max()), 2)}


def summarize(records: list[tuple[float, float, object]], during: tuple[float, float]) -> dict:
    """records: (start s, latency ms, status or error name); phases split by the restart window."""
    out = {}
    for name, keep in (("before", lambda t: t < during[0]), ("during", lambda t: during[0] <= t <= during[1]),
                       ("after", lambda t: t > during[1])):
        rows = [r for r in records if keep(r[0])]
        ok = [lat for _, lat, s in rows if s == 200]
        failed = [s for _, _, s in rows if s != 200]
        out[name] = {**percentiles(ok), "requests": len(rows), "failed": len(failed),
                     "failures": sorted({str(f) for f in failed})}
    out["total"] = {"requests": len(records), "failed": sum(out[p]["failed"] for p in ("before", "during", "after"))}
    return out


async def load(url: str, png: bytes, concurrency: int, stop: asyncio.Event, records: list) -> None:
    t0 = time.monotonic()

    async def worker(session):
        while not stop.is_set():
            start = time.monotonic()
            try:
                async with session.post(f"{url}/classify", data=png, headers={"Content-Type": "image/png"}) as r:
                    await r.read()
                    status = r.status
            except Exception as e:  # noqa: BLE001 - every failure is a result here
                status = type(e).__name__
            records.append((start - t0, (time.monotonic() - start) * 1e3, status))

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))


def restart(replicas: list, i: int, model: Path, env: dict, log) -> float:
    """SIGTERM replica i, wait for it to exit by itself, start it again, wait until ready; seconds."""
    t = time.monotonic()
    proc, port = replicas[i]
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)
    log(f"replica {i} (port {port}) exited with {rc} after {time.monotonic() - t:.1f} s")
    stop_server(proc)  # its log and BentoML home
    new = start_server(model, port, env)
    wait_ready(f"http://127.0.0.1:{port}", new)
    replicas[i] = (new, port)
    log(f"replica {i} ready again after {time.monotonic() - t:.1f} s")
    return time.monotonic() - t


def run(model: Path, concurrency: int, duration: float, drain_s: float, log=print) -> dict:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise RuntimeError("haproxy is not installed (apt-get install haproxy; make setup does it)")
    png = (SAMPLES / "test0000-ankle-boot.png").read_bytes()
    env = {"NIN_DRAIN_SECONDS": str(drain_s), "NIN_LANES": "0"}  # replicas share the cores: no extra lanes each
    ports = [free_port(), free_port()]
    replicas = [(start_server(model, p, env), p) for p in ports]
    front = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
        f.write(haproxy_config(front, ports))
    lb = subprocess.Popen([haproxy, "-f", f.name, "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # nosec B603  # haproxy (found by shutil.which) on a config file written just above
    try:
        for proc, p in replicas:
            wait_ready(f"http://127.0.0.1:{p}", proc)
        url = f"http://127.0.0.1:{front}"
        wait_ready(url, lb, timeout=30)
        time.sleep(1.5)  # both replicas marked up (rise 2 x 500 ms)
        records: list = []
        window: list[float] = []

        async def scenario():
            t0, stop = time.monotonic(), asyncio.Event()
            task = asyncio.create_task(load(url, png, concurrency, stop, records))
            await asyncio.sleep(duration / 2)  # before
            window.append(time.monotonic() - t0)
            loop = asyncio.get_running_loop()
            for i in range(len(replicas)):  # one at a time, as a rolling update does
                await loop.run_in_executor(None, restart, replicas, i, model, env, log)
                await asyncio.sleep(1.5)  # haproxy sees it up (rise 2) before the next goes
            window.append(time.monotonic() - t0)
            await asyncio.sleep(duration / 2)  # after
            stop.set()
            await task

        asyncio.run(scenario())
        summary = summarize(records, (window[0], window[1]))
        summary["setup"] = {"concurrency": concurrency, "duration_s": duration, "drain_s": drain_s,
                            "restart_window_s": [round(w, 1) for w in window], "replicas": 2,
                            "load_balancer": subprocess.run([haproxy, "-v"], capture_output=True, text=True).stdout.split("\n")[0]}  # nosec B603  # haproxy -v: its version, for the report
        return summary
    finally:
        lb.terminate()
        for proc, _ in replicas:
            if proc.poll() is None:
                stop_server(proc)
        Path(f.name).unlink(missing_ok=True)


def markdown(s: dict) -> str:
    st = s["setup"]
    lines = [f"Rolling restart: 2 replicas behind {st['load_balancer']}, c={st['concurrency']} for "
             f"{st['duration_s']:g} s plus the restarts, drain {st['drain_s']:g} s, restarts from {st['restart_window_s'][0]} s to "
             f"{st['restart_window_s'][1]} s; {s['total']['requests']} requests, {s['total']['failed']} failed.", "",
             "| phase | requests | failed | p50 ms | p90 | p99 | max |", "|---|---|---|---|---|---|---|"]
    for phase in ("before", "during", "after"):
        p = s[phase]
        lines.append(f"| {phase} | {p['requests']} | {p['failed']} | {p.get('p50', '–')} | {p.get('p90', '–')} "
                     f"| {p.get('p99', '–')} | {p.get('max', '–')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load before plus after the restarts")
    p.add_argument("--drain", type=float, default=5.0, help="NIN_DRAIN_SECONDS of the replicas (default 5)")
    p.add_argument("--out", default=None, help="folder for rollout.json and rollout.md (default: print only)")
    args = p.parse_args(argv)
    try:
        s = run(Path(args.model), args.concurrency, args.duration, args.drain, log=lambda m: print(m, file=sys.stderr))
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = markdown(s)
    print(md)
    write_results(args.out, "rollout", s, md)
    return 0 if s["total"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

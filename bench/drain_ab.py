"""`python -m bench.drain_ab`: SIGTERM in the middle of a ramp of requests, the service's drain
(serving/drain.py) beside uvicorn's own graceful shutdown (`--timeout-graceful-shutdown`, BentoML's
readiness), in alternating rounds. Each request opens a fresh connection, so a connection the
kernel accepted and nobody answered shows up as dropped.

    .venv/bin/python -m bench.drain_ab --rounds 3 --out bench/cpu-2core-amx/drain-ab
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections import Counter

import aiohttp

from bench.servers import _spawn, free_port, stop_server, wait_ready, write_results
from serving.model_files import DEFAULT_MODEL
from serving.page import SAMPLES

PNG = (SAMPLES / "test0000-ankle-boot.png").read_bytes()
ARMS = {
    "drain": ({"NIN_AB_ARM": "service"}, []),
    "uvicorn": ({"NIN_AB_ARM": "no-drain"}, ["--timeout-graceful-shutdown", "20"]),
}


async def _one(url: str, delay: float, out: list) -> None:
    await asyncio.sleep(delay)
    try:  # a fresh connection per request: no keep-alive race explains anything
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.post(f"{url}/classify", data=PNG, headers={"Content-Type": "image/png"},
                              timeout=aiohttp.ClientTimeout(total=60)) as r:
                await r.read()
                out.append(r.status)
    except aiohttp.ClientConnectorError:
        out.append("refused at connect")
    except Exception as e:  # the server accepted the connection and never answered
        out.append(f"dropped ({type(e).__name__})")


async def ramp_and_sigterm(proc, url: str, n: int, span_s: float, signal_at_s: float) -> dict:
    """`n` requests spread over `span_s`, SIGTERM to `bentoml serve` itself at `signal_at_s` (as
    `docker stop` and the kubelet send it); what each request got, and how soon /readyz failed."""
    outcomes: list = []
    tasks = [asyncio.create_task(_one(url, span_s * i / n, outcomes)) for i in range(n)]
    await asyncio.sleep(signal_at_s)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    readyz, readyz_s = 200, None
    async with aiohttp.ClientSession() as s:
        while time.monotonic() - t0 < 5:
            try:
                async with s.get(f"{url}/readyz") as r:
                    if r.status == 503:
                        readyz, readyz_s = 503, time.monotonic() - t0
                        break
            except aiohttp.ClientError:
                break
            await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)
    rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60)
    return {"outcomes": Counter(outcomes), "readyz_after_signal": readyz, "readyz_failed_after_s": readyz_s,
            "exit_s": time.monotonic() - t0, "rc": rc}


def one_round(arm: str, model: str, n: int, span_s: float, signal_at_s: float, drain_s: float) -> dict:
    env, flags = ARMS[arm]
    port = free_port()
    proc = _spawn([sys.executable, "-m", "bentoml", "serve", "bench.arms:svc", "--host", "127.0.0.1", "--port", str(port),
                   *flags], {"NIN_MODEL": model, "NIN_MAX_QUEUE": "10000", "NIN_DRAIN_SECONDS": str(drain_s), **env},
                  quiet=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        result = asyncio.run(ramp_and_sigterm(proc, url, n, span_s, signal_at_s))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stop_server(proc)
    result["outcomes"] = {str(k): v for k, v in result["outcomes"].items()}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="SIGTERM mid-ramp: the service's drain beside uvicorn's graceful shutdown.")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="exported model folder")
    p.add_argument("--rounds", type=int, default=3, help="rounds, arms alternating (default: 3)")
    p.add_argument("--requests", type=int, default=128, help="requests per ramp (default: 128)")
    p.add_argument("--span", type=float, default=3.0, help="seconds the ramp lasts (default: 3)")
    p.add_argument("--drain", type=float, default=1.0, help="NIN_DRAIN_SECONDS of the drain arm (default: 1)")
    p.add_argument("--out", default=None, help="folder for drain_ab.json and drain_ab.md (default: print only)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.requests < 1 or args.span <= 0.5 or args.drain < 0:
        print("error: --rounds and --requests >= 1, --span > 0.5 s, --drain >= 0", file=sys.stderr)
        return 2
    rounds = []
    for r in range(args.rounds):
        for arm in (list(ARMS) if r % 2 == 0 else list(ARMS)[::-1]):
            res = one_round(arm, args.model, args.requests, args.span, 0.5, args.drain)
            rounds.append({"round": r + 1, "arm": arm, **res})
            print(f"round {r + 1} {arm}: {res['outcomes']}, /readyz {res['readyz_after_signal']} after the signal, "
                  f"exit {res['rc']} in {res['exit_s']:.1f} s", flush=True)
    lines = ["| round | arm | outcomes | /readyz after SIGTERM | exit |", "|---|---|---|---|---|"]
    lines += [f"| {x['round']} | {x['arm']} | {', '.join(f'{k}: {v}' for k, v in sorted(x['outcomes'].items()))} | "
              f"{x['readyz_after_signal']} | {x['rc']} in {x['exit_s']:.1f} s |" for x in rounds]
    text = (f"SIGTERM 0.5 s into a ramp of {args.requests} requests over {args.span:g} s, each on a fresh connection "
            f"(drain arm: NIN_DRAIN_SECONDS={args.drain:g}).\n\n" + "\n".join(lines) + "\n")
    print(text)
    write_results(args.out, "drain_ab", rounds, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

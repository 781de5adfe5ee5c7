"""`python -m bench.big_upload`: what one large upload does to everyone else's latency.

Clients send real 224x224 test PNGs in a closed loop while, every `--every` seconds, another
client uploads one large photo-sized PNG (`--size`, default 4000x3000 = 12 MP). Prints (and with
`--out`, writes as JSON) the small requests' p50 / p99 / max and each large upload's status and
time. Decoding a 12 MP PNG takes a good part of a second; the service decodes uploads over 512x512
pixels on a thread of its own (serving/http.py), so the small requests should not wait for it.

    .venv/bin/python -m bench.big_upload                      # starts `bentoml serve` on the shipped model
    .venv/bin/python -m bench.big_upload --url http://127.0.0.1:3000
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.images import real_test_pngs
from bench.servers import free_port, start_server, stop_server, wait_ready
from serving.model_files import CARD, DEFAULT_MODEL


def large_png(width: int, height: int) -> bytes:
    """A smooth, photo-like grayscale PNG (random 100x75 pixels, bicubic-upscaled), zlib level 1."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (75, 100), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


async def measure(url: str, smalls: list[bytes], big: bytes, clients: int, duration: float, every: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    bigs: list[dict] = []
    stop = time.perf_counter() + duration

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients + 1)) as c:
        async def small(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await c.post(f"{url}/classify", content=smalls[i % len(smalls)], headers={"Content-Type": "image/png"})
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                i += clients

        async def large() -> None:
            while True:
                await asyncio.sleep(every)
                if time.perf_counter() + 1 > stop:
                    return
                t = time.perf_counter()
                r = await c.post(f"{url}/classify", content=big, headers={"Content-Type": "image/png"})
                bigs.append({"status": r.status_code, "ms": round((time.perf_counter() - t) * 1000, 1)})

        await asyncio.gather(*(small(k) for k in range(clients)), large())
    p50, p99 = np.percentile(latencies, [50, 99])  # as bench.load.summarize computes them
    return {"small_requests": len(latencies), "small_statuses": statuses, "p50": round(float(p50), 1),
            "p99": round(float(p99), 1), "max": round(max(latencies), 1), "large_uploads": bigs}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Small requests' latency while large uploads arrive.")
    p.add_argument("--url", default=None, help="a running service (default: start `bentoml serve` on --model)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (default: the shipped one)")
    p.add_argument("--size", default="4000x3000", help="the large upload's WxH (default: 4000x3000)")
    p.add_argument("--clients", type=int, default=2, help="closed-loop clients sending 224x224 PNGs (default: 2)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds (default: 6)")
    p.add_argument("--every", type=float, default=1.5, help="seconds between large uploads (default: 1.5)")
    p.add_argument("--out", default=None, help="write the result here as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
        if width < 1 or height < 1 or args.clients < 1 or args.duration <= 0 or args.every <= 0:
            raise ValueError
    except ValueError:
        print("error: --size is WxH with positive integers; --clients, --duration and --every positive", file=sys.stderr)
        return 2
    if not args.url and not (Path(args.model) / CARD).is_file():
        print(f"error: no exported model in {args.model} (card.json missing)", file=sys.stderr)
        return 2
    smalls, _ = real_test_pngs(16)
    big = large_png(width, height)
    proc = None
    url = args.url.rstrip("/") if args.url else None
    try:
        if url is None:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start_server(args.model, port, quiet=True)
            wait_ready(url, proc)
        result = asyncio.run(measure(url, smalls, big, args.clients, args.duration, args.every))
    except httpx.HTTPError as e:
        print(f"error: the service at {url} did not answer ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    finally:
        if proc is not None:
            stop_server(proc)
    result.update(large_size=[width, height], large_bytes=len(big), clients=args.clients, duration_s=args.duration)
    print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench.layers`: what each of BentoML's outer middlewares costs a /classify request.

The service's ASGI app is called in process (no socket, no client), on the near-free model of
bench/null_model.py so the serving path is all there is to time, with Prometheus in BentoML's
multiprocess mode and uvloop, as in a worker. Each variant (all layers; one, or all four, made
pass-throughs; the hand-written FastAPI `async def` route of bench/reference.py on the same model
and image) runs a block of 100 calls in turn, the order rotating; block medians, paired by round.
The wire-level counterpart is `python -m bench.ab --arms service,no-bentoml-layers,fastapi-async` (bench/arms.py).

    .venv/bin/python -m bench.layers --calls 6000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

from bench.images import multipart_body, real_test_pngs
from serving.model_files import DEFAULT_MODEL


ROUTE = "FastAPI async def route"
# Calls in a row per variant: one app at a time keeps its code in the caches, as in a server
# (alternating call by call, each paid for the other's misses: the route came out level, not ahead).
BLOCK = 100


def bentoml_layers() -> dict[str, type]:
    """The four middlewares BentoML puts in front of every route, outermost first."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
    from bentoml._internal.server.http.traffic import MaxConcurrencyMiddleware, TimeoutMiddleware
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return {"metrics": RunnerTrafficMetricsMiddleware, "opentelemetry": OpenTelemetryMiddleware,
            "timeout": TimeoutMiddleware, "max-concurrency": MaxConcurrencyMiddleware}


async def pass_through(self, scope, receive, send) -> None:
    """A layer's `__call__` that only calls the app inside it (a coroutine function: asgiref takes
    a plain function for an ASGI 2 app)."""
    await self.app(scope, receive, send)


async def call(app, body: bytes, ctype: str, path: str = "/classify") -> int:
    """One POST `path` through `app` (no TestClient: its thread hop and httpx would be timed too); its status."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "state": {},
             "headers": [(b"host", b"x"), (b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    sent, status = False, []

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)  # no disconnect while the answer is written
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


async def measure(calls: int) -> dict[str, list[float]]:
    """Per variant, the median µs of each block of calls, blocks in the order they ran."""
    from serving.service import NiNClassifier

    layers = bentoml_layers()
    original = {name: cls.__call__ for name, cls in layers.items()}
    app = NiNClassifier.to_asgi()
    startup = asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    asyncio.get_running_loop().create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                               startup.get, lambda message: asyncio.sleep(0)))
    body, ctype = multipart_body(real_test_pngs(1)[0][0])
    while await call(app, body, ctype) != 200:  # 503 not_ready until the warm-up is done
        await asyncio.sleep(0.2)
    import bench.reference as ref

    variants = {"all layers": set(), **{f"without {name}": {name} for name in layers}, "without the four": set(layers),
                ROUTE: set()}
    blocks: dict[str, list[float]] = {v: [] for v in variants}
    names = list(variants)
    for block in range(calls // BLOCK + 2):  # the first two rounds of blocks warm every path up
        for variant in names[block % len(names):] + names[:block % len(names)]:
            off = variants[variant]
            for name, cls in layers.items():
                cls.__call__ = pass_through if name in off else original[name]
            times = []
            for _ in range(BLOCK):
                t = time.perf_counter()
                status = await (call(ref.app, body, ctype, "/classify_async") if variant == ROUTE else call(app, body, ctype))
                if status != 200:
                    raise RuntimeError(f"{variant}: HTTP {status}")
                times.append(time.perf_counter() - t)
            if block >= 2:
                blocks[variant].append(statistics.median(times) * 1e6)
    return blocks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="What each of BentoML's outer middlewares costs a request, in process.")
    p.add_argument("--calls", type=int, default=6000, help="timed calls per variant, in blocks of 100 (rounded down; default: 6000)")
    args = p.parse_args(argv)
    if args.calls < BLOCK:
        print(f"error: --calls must be at least {BLOCK}, got {args.calls}", file=sys.stderr)
        return 2
    from bench.null_model import make_null_model

    os.environ["NIN_MODEL"] = os.environ["NIN_REF_MODEL"] = str(make_null_model(tempfile.mkdtemp(prefix="nin-null-"), DEFAULT_MODEL))
    os.environ["NIN_REF_VARIANT"] = "int8"
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="nin-prom-"))
    import uvloop  # uvicorn's loop in a BentoML worker

    blocks = uvloop.run(measure(args.calls))
    base = blocks["all layers"]
    print(f"µs per call, null model, {len(base)} blocks of {BLOCK} calls per variant: the median block, and the")
    print("service with all four layers minus the variant, paired by round (median; the blocks where it was more)")
    for variant, us in blocks.items():
        diff = [b - u for b, u in zip(base, us)]
        print(f"  {variant:26s} {statistics.median(us):8.1f}" + ("" if variant == "all layers" else
              f"   {statistics.median(diff):+7.1f}   ({sum(d > 0 for d in diff)} of {len(diff)})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

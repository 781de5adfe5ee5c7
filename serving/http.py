"""HTTP routes for /classify, /classify_batch and /model (a Starlette app mounted into BentoML).

BentoML's own request parsing cannot cap the body before reading it, takes multipart or a raw
body per route but not both, and answers an undecodable upload with a 500; these routes do the
reading themselves and answer every bad input with a 4xx JSON body {"error", "detail"}.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from prometheus_client import Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving import imaging
from serving.admission import Admission
from serving.batching import MicroBatcher
from serving.engine import Engine
from serving.imaging import InputError

log = logging.getLogger("serving")

INFERENCE = Histogram("nin_inference_seconds", "onnxruntime run time of one batch", ["variant"],
                      buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
BATCH = Histogram("nin_batch_size", "images per onnxruntime run", buckets=(1, 2, 4, 8, 16, 32, 64))
QUEUE = Histogram("nin_queue_seconds", "time a request waited for its batch to start",
                  buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1))
PEAK_RSS = Gauge("nin_peak_rss_bytes", "peak resident set size of the worker during the last batch")
REJECTED = Counter("nin_rejected_requests_total", "requests answered with a 4xx", ["reason"])
OVERLOADED = Counter("nin_overload_rejections_total", "requests refused with 503: the service held its bound of images")
IN_SYSTEM = Gauge("nin_images_in_service", "images admitted and not yet answered (the queue the bound limits)")
RAW_TYPES = ("image/", "application/octet-stream")


class State:
    """What the routes share; set by the service once the engine is built."""

    engine: Engine | None = None
    batcher: MicroBatcher | None = None
    admission: Admission = Admission()


state = State()


def attach(engine: Engine) -> None:
    state.engine = engine

    def run(x, lane):
        t = time.perf_counter()
        logits, info = engine.run(x, lane)
        INFERENCE.labels(engine.variant).observe(time.perf_counter() - t)
        BATCH.observe(len(x))
        PEAK_RSS.set(info["peak_rss_mb"] * 2**20)
        return logits, info

    state.batcher = MicroBatcher(run, engine.settings.max_batch_size, engine.settings.max_wait_ms,
                                 lanes=len(engine.lane_sessions))
    state.admission = Admission(max_batch_size=engine.settings.max_batch_size)


def arm_admission(engine: Engine) -> None:
    """After warm-up has timed a full batch: bound the images in the service (serving/admission.py)."""
    state.admission.full_batch_ms = engine.full_batch_ms
    state.admission.limit = engine.queue_bound()
    log.info("admitting at most %s images at once (latency budget %g ms, a batch of %d takes %.1f ms)",
             state.admission.limit, engine.settings.latency_budget_ms, engine.settings.max_batch_size, engine.full_batch_ms)


def overloaded(n: int) -> JSONResponse:
    OVERLOADED.inc()
    a = state.admission
    retry = a.retry_after_s()
    return JSONResponse({"error": "overloaded",
                         "detail": f"{a.in_system} images are already in the service (limit {a.limit}, about "
                                   f"{a.in_system / a.max_batch_size * a.full_batch_ms:.0f} ms of work); "
                                   f"{n} more would pass it: retry after {retry} s"},
                        status_code=503, headers={"Retry-After": str(retry)})


def reject(e: InputError) -> JSONResponse:
    REJECTED.labels(e.error).inc()
    return JSONResponse(e.to_json(), status_code=e.status)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it passes `max_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise InputError(413, "body_too_large", f"{int(declared):,} bytes declared; the limit is {max_bytes:,}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise InputError(413, "body_too_large", f"more than {max_bytes:,} bytes; the limit is {max_bytes:,}")
            chunks.append(chunk)
    except ClientDisconnect:
        raise InputError(400, "client_disconnected", "the body ended early") from None
    return b"".join(chunks)


async def uploads(request: Request, field: str, max_files: int) -> list[bytes]:
    """The image bytes of a request: the multipart fields named `field`, or the raw body."""
    e = state.engine.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not ctype.startswith("multipart/form-data") and not ctype.startswith(RAW_TYPES):
        raise InputError(415, "unsupported_media_type",
                         f"Content-Type {ctype or '(none)'}; send multipart/form-data with a file field "
                         f"{field!r}, or the image itself as image/* or application/octet-stream")
    body = await read_body(request, e.max_bytes)
    if not ctype.startswith("multipart/"):
        return [body]

    async def stream():
        yield body

    try:
        form = await MultiPartParser(Headers(scope=request.scope), stream(), max_files=max_files,
                                     max_fields=16, max_part_size=e.max_bytes).parse()
    except MultiPartException as err:
        raise InputError(400, "bad_multipart", str(err)) from None
    files = [v for v in form.getlist(field) if isinstance(v, UploadFile)]
    if not files:
        got = sorted(form.keys())
        raise InputError(422, "missing_field", f"expected a file field named {field!r}; got {got or 'no fields'}")
    return [await f.read() for f in files]


def _top_k(request: Request, n_classes: int) -> int:
    raw = request.query_params.get("top_k", "3")
    if not raw.isdigit() or not 1 <= int(raw) <= n_classes:
        raise InputError(422, "bad_top_k", f"top_k must be an integer from 1 to {n_classes}, got {raw!r}")
    return int(raw)


async def _classify(request: Request, field: str, max_files: int) -> JSONResponse:
    engine, t0 = state.engine, time.perf_counter()
    if engine is None or not engine.ready.is_set():
        return JSONResponse({"error": "not_ready", "detail": "the model is still warming up"}, status_code=503)
    held = 0  # images this request holds in the admission count
    try:
        if field == "image":  # one image: refused before its body is read
            if not state.admission.try_enter(1):
                return overloaded(1)
            held = 1
        try:
            k = _top_k(request, len(engine.class_names))
            blobs = await uploads(request, field, max_files)
            if len(blobs) > max_files:
                raise InputError(413, "too_many_images", f"{len(blobs)} images; the limit is {max_files}")
            if field != "image":  # a batch: once its images are counted, before decoding them
                if not state.admission.try_enter(len(blobs)):
                    return overloaded(len(blobs))
                held = len(blobs)
            t_read = time.perf_counter()
            decoded = []
            for i, blob in enumerate(blobs):
                try:
                    decoded.append(imaging.to_contract(blob, engine.contract, engine.settings.max_pixels))
                except InputError as err:
                    if len(blobs) > 1:
                        err.detail = f"image {i}: {err.detail}"
                    raise
        except InputError as err:
            return reject(err)
        return await _infer(engine, field, k, decoded, {"t0": t0, "read": t_read, "decode": time.perf_counter()})
    finally:
        state.admission.leave(held)
        IN_SYSTEM.set(state.admission.in_system)


async def _infer(engine: Engine, field: str, k: int, decoded: list, t: dict) -> JSONResponse:
    """Normalize, run through the micro-batcher, build the response with its timing and memory."""
    x = imaging.normalize([d.image for d in decoded], engine.contract)
    t_pre = time.perf_counter()
    step = engine.settings.max_batch_size
    parts = await asyncio.gather(*(state.batcher.submit(x[i : i + step]) for i in range(0, len(x), step)))
    QUEUE.observe(max(p.queue_ms for p in parts) / 1000)
    preds = imaging.softmax_top_k(np.concatenate([p.logits for p in parts]), engine.class_names, k)
    timing = {
        "read": (t["read"] - t["t0"]) * 1000,
        "decode": (t["decode"] - t["read"]) * 1000,
        "preprocess": (t_pre - t["decode"]) * 1000,
        "queue": max(p.queue_ms for p in parts),
        "inference": sum(p.inference_ms for p in parts),
    }
    timing["total"] = (time.perf_counter() - t["t0"]) * 1000
    timing = {name: round(v, 3) for name, v in timing.items()}
    memory = {"peak_rss_mb": max(p.info["peak_rss_mb"] for p in parts)}
    if engine.gpu is not None:
        memory["gpu_mb"] = parts[-1].info.get("gpu_mb")
    results = [{**p, "input": d.describe()} for p, d in zip(preds, decoded)]
    common = {"timing_ms": timing, "memory": memory, "batch_size": max(p.batch_size for p in parts),
              "model": {"variant": engine.variant, "provider": engine.provider}}
    payload = {**results[0], **common} if field == "image" else {"results": results, **common}
    headers = {"Server-Timing": ", ".join(f"{name};dur={v}" for name, v in timing.items())}
    return JSONResponse(payload, headers=headers)


async def classify(request: Request) -> JSONResponse:
    return await _classify(request, "image", 1)


async def classify_batch(request: Request) -> JSONResponse:
    return await _classify(request, "images", state.engine.settings.max_batch_images if state.engine else 1)


async def model_info(request: Request) -> JSONResponse:
    if state.engine is None:
        return JSONResponse({"error": "not_ready", "detail": "the model is not loaded"}, status_code=503)
    return JSONResponse(state.engine.describe())


app = Starlette(routes=[
    Route("/classify", classify, methods=["POST"]),
    Route("/classify_batch", classify_batch, methods=["POST"]),
    Route("/model", model_info, methods=["GET"]),
])

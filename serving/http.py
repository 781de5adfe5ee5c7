"""HTTP routes for /classify, /classify_batch, /model and the /ui page (a FastAPI app mounted into BentoML).

BentoML's own request parsing cannot cap the body before reading it, takes multipart or a raw
body per route but not both, and answers an undecodable upload with a 500; these routes do the
reading themselves and answer every bad input with a 4xx JSON body {"error", "detail"}.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import Counter, Gauge, Histogram
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from serving import auth, forms, imaging
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
# With several workers (BentoML's multiprocess directory) /metrics shows the peak per live worker
# (a `pid` label) and the images in service summed over them.
PEAK_RSS = Gauge("nin_peak_rss_bytes", "peak resident set size of the worker during the last batch",
                 multiprocess_mode="liveall")
REJECTED = Counter("nin_rejected_requests_total", "requests answered with a 4xx", ["reason"])
OVERLOADED = Counter("nin_overload_rejections_total", "requests refused with 503: the service held its bound of images")
IN_SYSTEM = Gauge("nin_images_in_service", "images admitted and not yet answered (the queue the bound limits)",
                  multiprocess_mode="livesum")
RAW_TYPES = ("image/", "application/octet-stream")


class ServiceState:
    """What the routes share: one engine, its micro-batcher and its admission bound. The service
    instance builds and holds it; nothing here is module-level."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        inference = INFERENCE.labels(engine.variant)  # the labelled child once, not per batch

        def run(x, lane):
            t = time.perf_counter()
            logits, info = engine.run(x, lane)
            inference.observe(time.perf_counter() - t)
            BATCH.observe(len(x))
            PEAK_RSS.set(info["peak_rss_mb"] * 2**20)
            return logits, info

        # on CPUs with throughput lanes a lone image runs inline (serving/batching.py); a GPU's
        # one lane keeps its thread, so the event loop never waits on a device
        self.batcher = MicroBatcher(run, engine.settings.max_batch_size, engine.settings.max_wait_ms,
                                    lanes=len(engine.lane_sessions), inline_single=bool(engine.lane_sessions))
        self.admission = Admission(max_batch_size=engine.settings.max_batch_size)
        # large uploads decode here, not on the event loop (decode_all)
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")
        # set by arm_admission(): the classify routes answer 503 not_ready until then, so no
        # request is served by a cold engine or past an unarmed bound
        self.open = threading.Event()

    def close(self) -> None:
        """At shutdown, once nothing is in flight: stop the lanes and the decoding thread."""
        self.batcher.close()
        self.decoder.shutdown(wait=True, cancel_futures=True)

    def arm_admission(self) -> None:
        """After warm-up has timed a full batch: bound the images in the service
        (serving/admission.py) and open the classify routes."""
        engine, a = self.engine, self.admission
        a.full_batch_ms = engine.full_batch_ms
        a.limit = engine.queue_bound()
        self.open.set()
        log.info("admitting at most %s images at once (latency budget %g ms, a batch of %d takes %.1f ms)",
                 a.limit, engine.settings.latency_budget_ms, engine.settings.max_batch_size, engine.full_batch_ms)


def overloaded(state: ServiceState, n: int) -> JSONResponse:
    OVERLOADED.inc()
    a = state.admission
    retry = a.retry_after_s()
    return JSONResponse({"error": "overloaded",
                         "detail": f"{a.in_system} images are already in the service (limit {a.limit}, about "
                                   f"{a.in_system / a.max_batch_size * a.full_batch_ms:.0f} ms of work); "
                                   f"{n} more would pass it: retry after {retry} s"},
                        status_code=503, headers={"Retry-After": str(retry)})


def not_ready() -> JSONResponse:
    return JSONResponse({"error": "not_ready", "detail": "the model is still warming up"}, status_code=503)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it passes `max_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > max_bytes):
        raise InputError(413, "body_too_large", f"{declared} bytes declared; the limit is {max_bytes:,}")
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


async def parse_multipart(headers: Headers, body: bytes, max_files: int, max_bytes: int) -> FormData:
    """A multipart body already held whole, parsed by Starlette (at most `max_files` files, 16
    fields, `max_bytes` a part); a bad one is a 4xx InputError. The caller
    closes the form (its files may be spooled to disk)."""
    async def stream():
        yield body

    try:
        return await MultiPartParser(headers, stream(), max_files=max_files, max_fields=16,
                                     max_part_size=max_bytes).parse()
    except MultiPartException as err:
        if "too many files" in str(err).lower():  # Starlette's own count, before ours could run
            raise InputError(413, "too_many_images", f"more than {max_files} images; the limit is {max_files}") from None
        raise InputError(400, "bad_multipart", str(err)) from None


async def receive_upload(request: Request, e, field: str) -> tuple[str, bytes]:
    """A classify request's media type and whole body, refused with 415 for a content type that
    carries no image and with 413 past the byte cap; `e` holds the engine's settings."""
    ctype = forms.media_type(request.headers)
    if ctype != forms.MULTIPART and not ctype.startswith(RAW_TYPES):
        raise InputError(415, "unsupported_media_type",
                         f"Content-Type {ctype or '(none)'}; send multipart/form-data with a file field "
                         f"{field!r}, or the image itself as image/* or application/octet-stream")
    return ctype, await read_body(request, e.max_bytes)


async def uploads(request: Request, ctype: str, body: bytes, e, field: str, max_files: int) -> list[bytes]:
    """The image bytes of a received body (receive_upload): the multipart fields named `field`,
    or the raw body itself."""
    if ctype != forms.MULTIPART:
        return [body]
    form = await parse_multipart(Headers(scope=request.scope), body, max_files, e.max_bytes)
    try:
        files = [v for v in form.getlist(field) if isinstance(v, UploadFile)]
        if not files:
            got = sorted(form.keys())
            raise InputError(422, "missing_field", f"expected a file field named {field!r}; got {got or 'no fields'}")
        return [await f.read() for f in files]
    finally:
        await form.close()


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "false").lower()
    if raw not in ("1", "0", "true", "false", "yes", "no"):
        raise InputError(422, f"bad_{name}", f"{name} must be true or false, got {raw!r}")
    return raw in ("1", "true", "yes")


def parse_top_k(raw, n_classes: int) -> int:
    """top_k as a client sent it, checked in one place: at most three ASCII digits (isdigit() takes
    "٣", int() refuses 4,300 digits), from 1 to n_classes."""
    text = raw.strip() if isinstance(raw, str) else ""
    k = int(text) if text and len(text) <= 3 and text.isascii() and text.isdigit() else 0
    if not 1 <= k <= n_classes:
        shown = (raw if len(raw) <= 20 else raw[:20] + "...") if isinstance(raw, str) else "a file"
        raise InputError(422, "bad_top_k", f"top_k must be an integer from 1 to {n_classes}, got {shown!r}")
    return k


async def classify(state: ServiceState, field: str, request: Request | None = None,
                   blobs: list[bytes] | None = None, top_k: int = 3) -> JSONResponse:
    """Every classify route's one path: the upload (from `request`, whose body it reads, or the
    `blobs` BentoML has read for a typed endpoint), admission, decoding, the micro-batcher, the
    answer. A request is admitted only once its body has arrived, so stalled uploads hold no
    place (docs/decisions.md)."""
    t0 = time.perf_counter()
    if not state.open.is_set():
        return not_ready()
    engine, single = state.engine, field == "image"
    limit, n_classes = 1 if single else engine.settings.max_batch_images, len(engine.class_names)
    held = 0  # images this request holds in the admission count
    try:
        try:
            if request is not None:
                ctype, body = await receive_upload(request, engine.settings, field)
            if single:
                if not state.admission.try_enter(1):
                    return overloaded(state, 1)
                held = 1
            if request is not None:
                k, show = parse_top_k(request.query_params.get("top_k", "3"), n_classes), _flag(request, "show_input")
                blobs = await uploads(request, ctype, body, engine.settings, field, limit)
            else:
                k, show = parse_top_k(str(top_k), n_classes), False
            if not blobs:
                raise InputError(422, "missing_field", "no image was uploaded")
            if len(blobs) > limit:
                raise InputError(413, "too_many_images", f"{len(blobs)} images; the limit is {limit}")
            if not single:
                if not state.admission.try_enter(len(blobs)):
                    return overloaded(state, len(blobs))
                held = len(blobs)
            t_read = time.perf_counter()
            decoded = await decode_all(blobs, state)
        except InputError as err:
            REJECTED.labels(err.error).inc()
            return JSONResponse(err.to_json(), status_code=err.status)
        payload, headers = await infer(state, single, k, decoded,
                                       {"t0": t0, "read": t_read, "decode": time.perf_counter()}, show)
        return JSONResponse(payload, headers=headers)
    finally:
        state.admission.leave(held)
        IN_SYSTEM.set(state.admission.in_system)


# Uploads up to this many pixels decode on the event loop (cheaper than a hand-off to a thread and
# back); larger ones on the decoding thread, so a phone photo does not stop every other request.
INLINE_MAX_PIXELS = 512 * 512


async def decode_all(blobs: list[bytes], state: ServiceState) -> list:
    engine = state.engine
    decoded = []
    for i, blob in enumerate(blobs):
        try:
            img = imaging.open_upload(blob, engine.settings.max_pixels)  # the header: checks, no pixels
            if img.size[0] * img.size[1] <= INLINE_MAX_PIXELS:
                decoded.append(imaging.finish(img, engine.contract))
            else:
                decoded.append(await asyncio.get_running_loop().run_in_executor(
                    state.decoder, imaging.finish, img, engine.contract))
        except InputError as err:
            if len(blobs) > 1:
                err.detail = f"image {i}: {err.detail}"
            raise
    return decoded


async def infer(state: ServiceState, single: bool, k: int, decoded: list, t: dict,
                show_input: bool = False) -> tuple[dict, dict]:
    """Normalize, run through the micro-batcher; the response body (one image's answer, or
    {"results": [...]}) with its timing and memory, and the Server-Timing header."""
    engine = state.engine
    x = imaging.normalize([d.image for d in decoded], engine.contract)
    t_pre = time.perf_counter()
    step = engine.settings.max_batch_size
    if len(x) <= step:  # one chunk: no gather (it wraps each awaitable in a task)
        parts = [await state.batcher.submit(x)]
    else:
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
    memory = {"peak_rss_mb": max(p.info["peak_rss_mb"] for p in parts), "pid": engine.pid}
    if engine.gpu is not None:
        memory["gpu_mb"] = parts[-1].info.get("gpu_mb")
    results = [{**p, "input": d.describe()} for p, d in zip(preds, decoded)]
    if show_input:
        for r, d in zip(results, decoded):
            r["input"]["png_base64"] = imaging.png_base64(d.image)
    common = {"timing_ms": timing, "memory": memory, "batch_size": max(p.batch_size for p in parts),
              "model": {"variant": engine.variant, "provider": engine.provider}}
    payload = {**results[0], **common} if single else {"results": results, **common}
    headers = {"Server-Timing": ", ".join(f"{name};dur={v}" for name, v in timing.items())}
    return payload, headers


def current_service():
    """The running service instance (BentoML sets it when a worker starts), or None before."""
    import bentoml

    try:
        return bentoml.get_current_service()
    except Exception:  # noqa: BLE001 - not instantiated yet: the routes answer 503 not_ready
        return None


class Edge:
    """ASGI middleware in front of BentoML's inner stack, for three things (docs/decisions.md):

    API keys, when set (serving/auth.py), checked before any body is read, for every route.

    Direct routes: POST /classify and /classify_batch go straight to the service's route methods,
    past BentoML's inner ASGI layers (more throughput); BentoML's outer middlewares still wrap them.

    Typed endpoints (POST /api/classify, /api/classify_batch), which BentoML parses: the body is
    capped while it arrives, and a form BentoML would answer with a 500 or a non-JSON 400 gets the
    usual 4xx JSON first (serving/forms.py). `get_service` gives the running service."""

    DIRECT = {"/classify": "classify_route", "/classify_batch": "classify_batch_route"}
    TYPED = {"/api/classify": "image", "/api/classify_batch": "images"}

    def __init__(self, app, get_service=current_service) -> None:
        self.app, self.get_service, self.keys = app, get_service, auth.ApiKeys.from_env()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.keys and (refused := self._check_key(scope, path)):
            return await refused(scope, receive, send)
        if scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        if (route := self.DIRECT.get(path)) is not None:
            return await self._direct(scope, receive, send, route)
        if (field := self.TYPED.get(path)) is None:
            return await self.app(scope, receive, send)
        service = self.get_service()
        state = getattr(service, "state", None)
        if state is None or not state.open.is_set():
            return await not_ready()(scope, receive, send)
        settings, form = state.engine.settings, None
        try:  # read up to the cap (read_body), then hand BentoML the body as one message
            body = await read_body(Request(scope, receive), settings.max_bytes)
            form = await check_typed_form(scope, body, field, settings.max_batch_images, settings.max_bytes,
                                          len(state.engine.class_names))
            if forms.needs_rebuild(form):  # a file name BentoML cannot save a file under
                body, content_type = await forms.rebuild(form)
                scope = forms.with_headers(scope, content_type, len(body))
            else:  # "Multipart/Form-Data" is multipart/form-data; BentoML would parse it as JSON
                scope = forms.with_headers(scope)
        except InputError as err:
            REJECTED.labels(err.error).inc()
            return await JSONResponse(err.to_json(), status_code=err.status)(scope, receive, send)
        finally:
            if form is not None:
                await form.close()
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # past the body: a disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _check_key(self, scope, path: str) -> JSONResponse | None:
        """API keys (serving/auth.py): a 401 for a protected path without a right key; the
        OpenAPI document with the bearer scheme Swagger UI's Authorize button needs."""
        if self.keys.protects(path):
            if reason := self.keys.refusal(Headers(scope=scope).get("authorization")):
                status, body, headers = auth.unauthorized(reason)
                return JSONResponse(body, status_code=status, headers=headers)
        elif path == "/docs.json" and scope.get("method") == "GET":
            service = getattr(self.get_service(), "bento_service", None)
            if service is not None:
                return JSONResponse(auth.with_security(service.openapi_spec.asdict(), self.keys))
        return None

    async def _direct(self, scope, receive, send, route: str) -> None:
        service = self.get_service()
        try:
            response = not_ready() if service is None else await getattr(service, route)(Request(scope, receive))
        except Exception:  # what Starlette's ServerErrorMiddleware did for the FastAPI route, in JSON
            log.exception("POST %s failed", scope.get("path"))
            response = JSONResponse({"error": "internal_error", "detail": "the server failed on this request; "
                                     "it is logged"}, status_code=500)
        await response(scope, receive, send)


async def check_typed_form(scope, body: bytes, field: str, max_files: int, max_bytes: int, n_classes: int) -> FormData:
    """A typed endpoint's body parsed and checked before BentoML sees it: multipart, the file
    field present, no other field but top_k, top_k valid. The caller closes the form."""
    headers = Headers(scope=scope)
    if forms.media_type(headers) != forms.MULTIPART:
        raise InputError(415, "unsupported_media_type",
                         f"Content-Type {headers.get('content-type') or '(none)'}; this typed endpoint takes "
                         f"multipart/form-data with a file field {field!r} (raw bodies: POST {scope['path'][4:]})")
    form = await parse_multipart(headers, body, max_files, max_bytes)
    try:
        unknown = sorted(set(form.keys()) - {field, "top_k"})
        if unknown:
            raise InputError(422, "unknown_field", f"fields {unknown}; expected a file field {field!r} and optionally top_k")
        if not any(isinstance(v, UploadFile) for v in form.getlist(field)):
            raise InputError(422, "missing_field", f"expected a file field named {field!r}")
        if (top_k := form.get("top_k")) is not None:  # before BentoML's own int parser sees it (a 500 or its 400)
            parse_top_k(top_k, n_classes)
    except InputError:
        await form.close()  # a refused form's files; Edge closes an accepted one
        raise
    return form

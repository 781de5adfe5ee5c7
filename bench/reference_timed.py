"""bench/reference.py, unchanged, with two clocks around it for `python -m bench.breakdown`:
an ASGI middleware times each request through the app (FastAPI's routing and form parsing, the
thread-pool hop of its `def` handler, decoding, the model, the JSON answer) and a proxy of its
onnxruntime session times the run; both go back in a `Server-Timing` header.

    NIN_REF_MODEL=models/nin-fashion-mnist NIN_REF_VARIANT=int8 uvicorn bench.reference_timed:app --port 3001
"""

from __future__ import annotations

import contextvars
import time

from bench import reference

_clocks: contextvars.ContextVar[dict | None] = contextvars.ContextVar("clocks", default=None)


class TimedSession:
    """The reference's session with its run timed. The handler runs in a worker thread, which
    gets a copy of the request's context: the dict in it is the middleware's own."""

    def __init__(self, session) -> None:
        self.session = session

    def run(self, *args, **kwargs):
        clocks = _clocks.get()
        start = time.perf_counter()
        try:
            return self.session.run(*args, **kwargs)
        finally:
            if clocks is not None:
                clocks["run"] = (start, time.perf_counter())


class Clocks:
    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        clocks = {"start": time.perf_counter()}
        _clocks.set(clocks)

        async def timed_send(message):
            if message["type"] == "http.response.start" and "run" in clocks:
                run_start, run_end = clocks["run"]
                phases = {"before": run_start - clocks["start"], "inference": run_end - run_start,
                          "after": time.perf_counter() - run_end}
                header = ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in phases.items())
                message = {**message, "headers": [*message.get("headers", []), (b"server-timing", header.encode())]}
            await send(message)

        await self.inner(scope, receive, timed_send)


reference.session = TimedSession(reference.session)  # classify() looks the name up at each call
app = Clocks(reference.app)

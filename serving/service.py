"""The BentoML service: `bentoml serve` from the repository root (bentofile.yaml names it).

Settings come from NIN_* environment variables (serving/engine.py: Settings). Routes:
POST /classify, POST /classify_batch, GET /model and the upload page GET /ui (serving/http.py,
a FastAPI app whose OpenAPI BentoML merges into /docs.json); the typed endpoints for
bentoml.SyncHTTPClient / AsyncHTTPClient, POST /api/classify and /api/classify_batch (below);
BentoML's /livez, /readyz (ready once every batch size is warmed up, the overload bound armed
and the start-up heap frozen), /metrics, /docs.json and the Swagger UI at /.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path

import bentoml

from serving import http, imaging, model_files
from serving.drain import Drain, exit_with_parent
from serving.engine import Engine, Settings, check_gpu_requirement
from serving.model_files import ModelLoadError
from serving.schemas import BatchClassification, Classification
from starlette.responses import JSONResponse

log = logging.getLogger("serving")
# BentoML's server logging keeps the root at WARNING; the engine's one start-up line ("serving
# int8 variant (model.int8.onnx) on CPUExecutionProvider") and its fallback warnings are INFO+.
log.setLevel(logging.INFO)


def preflight() -> None:
    """Check the settings and the model before BentoML starts workers: a bad model is one
    line and exit 1, not a worker restarting forever."""
    try:
        settings = Settings.from_env()
        check_gpu_requirement(settings)
        folder = model_files.resolve(settings.model)
        card = model_files.load_card(folder)
        for variant in model_files.available_variants(card):
            model_files.verified_file(folder, card, variant)
    except ModelLoadError as e:
        print(f"error: cannot serve: {e}", file=sys.stderr)
        sys.exit(1)


preflight()


def in_bentoml_worker() -> bool:
    """Whether this process is a worker `bentoml serve` started (not a test building the class)."""
    from bentoml._internal.context import server_context

    return server_context.worker_index is not None


def per_request_extras() -> dict:
    """BentoML's access log and OpenTelemetry spans cost CPU on every request, and on 2 cores
    that CPU is the model's (docs/benchmark.md measures it). Off for the classify routes unless
    asked for: NIN_ACCESS_LOG=1 logs every request, NIN_TRACING=1 traces them (with BentoML's
    tracing settings); /metrics and the nin_* metrics count requests either way."""
    on = lambda name: os.environ.get(name, "0").lower() in ("1", "true", "yes")  # noqa: E731
    config: dict = {"logging": {"access": {"enabled": on("NIN_ACCESS_LOG")}}}
    if not on("NIN_TRACING"):
        config["tracing"] = {"excluded_urls": "classify"}  # matches /classify and /classify_batch
    return config


app = http.make_app()


@bentoml.service(name="nin-fashion-mnist", workers=1, traffic={"timeout": 30, "max_concurrency": 512},
                 **per_request_extras())
@bentoml.asgi_app(app, path="/")
class NiNClassifier:
    """Classifies 224x224 grayscale images of clothing (Fashion-MNIST's ten classes) with the
    Network-in-Network model on onnxruntime. Send any PNG/JPEG/WebP/BMP/TIFF/GIF: it is converted
    to 8-bit grayscale and resized as in training. Every answer reports its timing and peak
    memory; every refusal is a 4xx JSON object {"error", "detail"}. The upload page is at /ui."""

    def __init__(self) -> None:
        self.engine = Engine(Settings.from_env())
        self.state = http.ServiceState(self.engine)
        http.attach(app, self.state)
        settings = self.engine.settings
        self.drain = Drain(settings.drain_s, settings.shutdown_timeout_s)
        if self.drain.install() and in_bentoml_worker():  # drain on SIGTERM, in the worker ...
            exit_with_parent()  # ... including the one Linux sends when the arbiter dies
        # warm up off the start-up path: /livez answers at once, /readyz once this is done
        self.warmed = threading.Event()
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        imaging.warm_up(self.engine.contract, self.engine.settings.max_pixels)
        self.engine.warm_up()
        # Everything built so far (BentoML, FastAPI, onnxruntime's bindings: a large heap) lives
        # as long as the process: out of the collector's sight, a full collection scans only what
        # requests make. Measured at c=256 (int8): full collections stopped the event loop for
        # 100-165 ms every few seconds; frozen, 4-21 ms (docs/benchmark.md). Frozen before the
        # routes open, so no request's objects are frozen with it.
        gc.collect()
        gc.freeze()
        self.state.arm_admission()  # the classify routes answer from here on (503 not_ready before)
        self.warmed.set()

    @bentoml.on_shutdown
    def stop_lanes(self) -> None:
        """After uvicorn's graceful shutdown has answered what was in flight: stop the lanes and
        the decoding thread."""
        self.state.close()

    def __is_ready__(self) -> bool:
        return self.warmed.is_set() and not self.drain.draining.is_set()

    # The typed endpoints: what bentoml.SyncHTTPClient(url).classify(image=Path("shoe.png")) calls.
    # BentoML reads these bodies (multipart only; http.Edge caps and checks them first); the
    # JSON answer, and every refusal's 4xx {"error", "detail"}, are /classify's.
    @bentoml.api(route="/api/classify")
    async def classify(self, image: Path, top_k: int = 3) -> Classification:
        """Classify one image file: the same answer as POST /classify. Refusals are 4xx/503 with
        {"error", "detail"}."""
        status, body, headers = await http.classify_files(self.state, [image.read_bytes()], True, top_k,
                                                          time.perf_counter())
        return JSONResponse(body, status_code=status, headers=headers)

    @bentoml.api(route="/api/classify_batch")
    async def classify_batch(self, images: list[Path], top_k: int = 3) -> BatchClassification:
        """Classify several image files in one call: the same answer as POST /classify_batch."""
        status, body, headers = await http.classify_files(self.state, [p.read_bytes() for p in images], False,
                                                          top_k, time.perf_counter())
        return JSONResponse(body, status_code=status, headers=headers)


_settings = Settings.from_env()
NiNClassifier.add_asgi_middleware(http.Edge, max_bytes=_settings.max_bytes, max_files=_settings.max_batch_images,
                                  routes_app=app)

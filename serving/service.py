"""The BentoML service: `bentoml serve` from the repository root (bentofile.yaml names it).

Routes and settings: docs/serving.md. Importing this module defines things and starts nothing;
`check_before_serving` runs once in `bentoml serve`'s own process before any worker starts,
`__init__` once in each worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import bentoml
import psutil
from starlette.requests import Request
from starlette.responses import JSONResponse

from serving import auth, http, imaging, model_files
from serving.page import app  # the upload page; the classify routes are this class's methods below
from serving.drain import Drain, exit_with_parent
from serving.engine import Engine, Settings, check_gpu_requirement, worker_count
from serving.model_files import ModelLoadError
from serving.schemas import (SHOW_INPUT_PARAM, TOP_K_PARAM, BatchClassification, Classification, ModelInfo,
                             error_responses, image_request_body)

log = logging.getLogger("serving")
log.setLevel(logging.INFO)  # BentoML keeps the root logger at WARNING; the start-up line is INFO


def bentoml_config() -> dict:
    """BentoML's access log and tracing cost CPU on every request: off for /classify* unless
    NIN_ACCESS_LOG=1 / NIN_TRACING=1 (docs/decisions.md)."""
    on = lambda name: os.environ.get(name, "0").lower() in ("1", "true", "yes")  # noqa: E731
    config: dict = {"logging": {"access": {"enabled": on("NIN_ACCESS_LOG")}}}
    if not on("NIN_TRACING"):
        config["tracing"] = {"excluded_urls": "classify"}  # matches /classify and /classify_batch
    return config


def image() -> bentoml.images.Image:
    """The bento's container image: Python 3.11 and serving/requirements.txt, every package locked
    to an exact version when `bentoml build` runs. NIN_BASE_IMAGE names the base image (default:
    python:3.11-slim, as BentoML's; scripts/container.sh builds one with no registry);
    NIN_CONTAINER_FLAVOR=cpu leaves out onnxruntime-gpu's CUDA 13 and cuDNN 9 wheels (~2 GB)."""
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    # A distro BentoML does not list skips its default apt install (build-essential, git, gnupg2):
    # every package here is a wheel, so the image needs no compiler (docs/deploy.md: its size).
    img = bentoml.images.Image(base_image=os.environ.get("NIN_BASE_IMAGE", "python:3.11-slim"), distro="debian-wheels",
                               python_version="3.11")
    img = img.python_packages(*(line for line in lines if line.strip() and not line.startswith("#")))
    if os.environ.get("NIN_CONTAINER_FLAVOR", "gpu") == "gpu":
        img = img.python_packages("onnxruntime-gpu[cuda,cudnn]==1.31.1")
    return img


def workers() -> int:
    """BentoML workers: NIN_WORKERS (default: one per two available cores; docs/decisions.md). A
    bad value is reported in one line by check_before_serving."""
    try:
        return worker_count(os.environ.get("NIN_WORKERS", "auto"))
    except ValueError:
        return 1


def ready_dir(arbiter_pid: int) -> Path:
    """Where each worker of one `bentoml serve` marks itself warm: /readyz says ready only once
    every worker can answer, whichever worker the probe reaches."""
    return Path(tempfile.gettempdir()) / f"nin-ready-{arbiter_pid}"


def in_bentoml_worker() -> bool:
    """Whether this process is a worker `bentoml serve` started (not a test building the class)."""
    from bentoml._internal.context import server_context

    return server_context.worker_index is not None


DIRECT = dict(response_model=None, response_class=JSONResponse, tags=["Classify (curl, browsers)"])


@bentoml.service(name="nin-fashion-mnist", image=image(), workers=workers(), traffic={"timeout": 30, "max_concurrency": 512},
                 **bentoml_config())
@bentoml.asgi_app(app, path="/")
class NiNClassifier:
    """Classifies 224x224 grayscale images of clothing (Fashion-MNIST's ten classes) with the
    Network-in-Network model on onnxruntime. Send any PNG/JPEG/WebP/BMP/TIFF/GIF: it is converted
    to 8-bit grayscale and resized as in training. Every answer reports its timing and peak
    memory; every refusal is a 4xx JSON object {"error", "detail"}. The upload page is at /ui."""

    # The shipped model, packed into the bento by `bentoml build`; NIN_MODEL (a folder or another
    # tag) replaces it, e.g. for development and the tests.
    model = None if os.environ.get("NIN_MODEL") else bentoml.models.BentoModel(model_files.SHIPPED_TAG)

    @bentoml.on_deployment
    def check_before_serving() -> None:
        """A bad setting or model stops `bentoml serve` in one line with exit code 1, before any
        worker starts (BentoML restarts a worker whose __init__ raises, forever)."""
        try:
            settings = Settings.from_env()
            keys = auth.ApiKeys.from_env()
            check_gpu_requirement(settings)
            folder = model_files.resolve(settings.model)
            card = model_files.load_card(folder)
            for variant in {*model_files.available_variants(card), settings.variant} - {"auto"}:
                model_files.verified_file(folder, card, variant)
        except ModelLoadError as e:
            raise SystemExit(f"error: cannot serve: {e}") from None
        if settings.workers > 1:  # a fresh folder for their warm marks; this process is their parent
            marks = ready_dir(os.getpid())
            shutil.rmtree(marks, ignore_errors=True)
            marks.mkdir(parents=True)
        if keys:
            log.info("every route but the probes, docs and page needs one of %d API keys%s", keys.count,
                     " (/metrics too)" if keys.metrics else "")

    def __init__(self) -> None:
        settings = Settings.from_env()
        if settings.model is None:  # the packed model, wherever BentoML keeps it
            settings = dataclasses.replace(settings, model=self.model.path)
        self.engine = Engine(settings)
        self.state = http.ServiceState(self.engine)
        self.drain = Drain(settings.drain_s, settings.shutdown_timeout_s)
        if self.drain.install() and in_bentoml_worker():  # drain on SIGTERM, in the worker ...
            exit_with_parent()  # ... including the one Linux sends when the arbiter dies
        # several workers: ready once every one is warm (their marks in ready_dir)
        self.marks = ready_dir(os.getppid()) if settings.workers > 1 and in_bentoml_worker() else None
        if self.marks is not None:
            self.marks.mkdir(parents=True, exist_ok=True)
        self.all_warm = self.marks is None
        # warm up off the start-up path: /livez answers at once, /readyz once the routes open
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        imaging.warm_up(self.engine.contract, self.engine.settings.max_pixels)
        self.engine.warm_up()
        # the start-up heap frozen, before the routes open (docs/decisions.md)
        gc.collect()
        gc.freeze()
        self.state.arm_admission()  # the classify routes answer from here on (503 not_ready before)
        if self.marks is not None:
            (self.marks / str(os.getpid())).touch()

    @bentoml.on_shutdown
    def stop_lanes(self) -> None:
        """After uvicorn's graceful shutdown has answered what was in flight."""
        self.state.close()
        if self.marks is not None:
            (self.marks / str(os.getpid())).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the last worker out removes the folder
                self.marks.rmdir()

    def __is_ready__(self) -> bool:
        if not self.state.open.is_set() or self.drain.draining.is_set():
            return False
        if not self.all_warm:  # the marks of live workers (a crashed one's stays behind)
            self.all_warm = sum(psutil.pid_exists(int(m.name)) for m in self.marks.iterdir()) >= self.engine.settings.workers
        return self.all_warm

    # For curl and browsers: multipart or a raw body, the byte cap while reading, a 4xx JSON for
    # every bad upload. http.Edge calls these methods directly, past BentoML's inner layers
    # (docs/decisions.md); as FastAPI routes they are what /docs.json describes.
    @app.post("/classify", summary="Classify one image", **DIRECT,
              responses={200: {"model": Classification, "description": "the prediction, with timing and memory"},
                         **error_responses(400, 413, 415, 422, 503)},
              openapi_extra={"parameters": [TOP_K_PARAM, SHOW_INPUT_PARAM], "requestBody": image_request_body("image", False)})
    async def classify_route(self, request: Request) -> JSONResponse:
        return await http.classify(self.state, "image", request)

    @app.post("/classify_batch", summary="Classify several images in one request", **DIRECT,
              responses={200: {"model": BatchClassification, "description": "one prediction per image, in order"},
                         **error_responses(400, 413, 415, 422, 503)},
              openapi_extra={"parameters": [TOP_K_PARAM, SHOW_INPUT_PARAM], "requestBody": image_request_body("images", True)})
    async def classify_batch_route(self, request: Request) -> JSONResponse:
        return await http.classify(self.state, "images", request)

    @app.get("/model", summary="The served model, its input contract and limits", **DIRECT,
             responses={200: {"model": ModelInfo}, **error_responses(503)})
    async def model_info(self) -> JSONResponse:
        return JSONResponse(self.engine.describe())

    # The typed endpoints: what bentoml.SyncHTTPClient(url).classify(image=Path("shoe.png")) calls.
    # BentoML reads these bodies (multipart only; http.Edge caps and checks them first); the
    # JSON answer, and every refusal's 4xx {"error", "detail"}, are /classify's.
    @bentoml.api(route="/api/classify")
    async def classify(self, image: Path, top_k: int = 3) -> Classification:
        """Classify one image file: the same answer as POST /classify. Refusals are 4xx/503 with
        {"error", "detail"}."""
        return await http.classify(self.state, "image", blobs=[image.read_bytes()], top_k=top_k)

    @bentoml.api(route="/api/classify_batch")
    async def classify_batch(self, images: list[Path], top_k: int = 3) -> BatchClassification:
        """Classify several image files in one call: the same answer as POST /classify_batch."""
        return await http.classify(self.state, "images", blobs=[p.read_bytes() for p in images], top_k=top_k)


NiNClassifier.add_asgi_middleware(http.Edge)

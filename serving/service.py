"""The BentoML service: `bentoml serve` from the repository root (bentofile.yaml names it).

Settings come from NIN_* environment variables (serving/engine.py: Settings). Routes:
POST /classify, POST /classify_batch, GET /model (serving/http.py), plus BentoML's /livez,
/readyz (ready once every batch size is warmed up) and /metrics.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import bentoml

from serving import http, imaging, model_files
from serving.engine import Engine, Settings, check_gpu_requirement
from serving.model_files import ModelLoadError

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


def per_request_extras() -> dict:
    """BentoML's access log and OpenTelemetry spans cost CPU on every request, and on 2 cores
    that CPU is the model's (README "Benchmark" measures it). Off for the classify routes unless
    asked for: NIN_ACCESS_LOG=1 logs every request, NIN_TRACING=1 traces them (with BentoML's
    tracing settings); /metrics and the nin_* metrics count requests either way."""
    on = lambda name: os.environ.get(name, "0").lower() in ("1", "true", "yes")  # noqa: E731
    config: dict = {"logging": {"access": {"enabled": on("NIN_ACCESS_LOG")}}}
    if not on("NIN_TRACING"):
        config["tracing"] = {"excluded_urls": "classify"}  # matches /classify and /classify_batch
    return config


@bentoml.service(name="nin-fashion-mnist", workers=1, traffic={"timeout": 30, "max_concurrency": 512},
                 **per_request_extras())
@bentoml.asgi_app(http.app, path="/")
class NiNClassifier:
    def __init__(self) -> None:
        self.engine = Engine(Settings.from_env())
        http.attach(self.engine)
        # warm up off the start-up path: /livez answers at once, /readyz once this is done
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        imaging.warm_up(self.engine.contract, self.engine.settings.max_pixels)
        self.engine.warm_up()
        http.arm_admission(self.engine)

    def __is_ready__(self) -> bool:
        return self.engine.ready.is_set()

"""The service's own layers beside BentoML's equivalents, one arm per `bentoml serve` (bench/ab.py):

    NIN_AB_ARM=fastapi-routes bentoml serve bench.arms:svc

- `service`: serving.service as shipped.
- `fastapi-routes`: POST /classify answered by the FastAPI route behind BentoML's inner layers
  (http.Edge keeps only its typed-endpoint checks).
- `max-concurrency`: no admission bound of ours (NIN_MAX_QUEUE very large); BentoML's
  `traffic.max_concurrency` at NIN_AB_MAX_CONCURRENCY requests instead (it answers 429).
- `bentoml-parsing`: no http.Edge at all: the typed endpoints' bodies go to BentoML's parser as sent
  (bench/typed_ab.py).
- `no-drain`: SIGTERM left to uvicorn (start with `--timeout-graceful-shutdown`; bench/drain_ab.py).
- `no-bentoml-layers`: BentoML's outer middlewares (request metrics, OpenTelemetry, timeout,
  max-concurrency) turned into pass-throughs: what they cost a request, not a way to serve.
- `adaptive`: BentoML's adaptive batching, `@bentoml.api(batchable=True, max_batch_size=16,
  max_latency_ms=NIN_AB_MAX_LATENCY_MS)` at POST /classify_adaptive (field `images`), on the
  same engine, decoding and answer as the service, without the micro-batcher and its lanes.
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml

from serving import http, imaging
from serving.drain import Drain
from serving.engine import Engine, Settings
from serving.service import NiNClassifier, bentoml_config

ARM = os.environ.get("NIN_AB_ARM", "service")


class TypedOnlyEdge(http.Edge):
    DIRECT: dict = {}


@bentoml.service(name="nin-adaptive", workers=1, traffic={"timeout": 30, "max_concurrency": 512}, **bentoml_config())
class Adaptive:
    def __init__(self) -> None:
        self.engine = Engine(Settings.from_env())
        imaging.warm_up(self.engine.contract, self.engine.settings.max_pixels)
        self.engine.warm_up()

    @bentoml.api(route="/classify_adaptive", batchable=True, max_batch_size=16,
                 max_latency_ms=int(os.environ.get("NIN_AB_MAX_LATENCY_MS", "100")))
    def classify(self, images: list[Path]) -> list[dict]:
        e = self.engine
        decoded = [imaging.to_contract(p.read_bytes(), e.contract, e.settings.max_pixels) for p in images]
        logits, _ = e.run(imaging.normalize([d.image for d in decoded], e.contract))
        return imaging.softmax_top_k(logits, e.class_names, 3)


if ARM == "adaptive":
    svc = Adaptive
else:
    svc = NiNClassifier
    if ARM == "fastapi-routes":
        svc.middlewares[:] = [(TypedOnlyEdge, {})]
    elif ARM == "max-concurrency":
        svc.config.setdefault("traffic", {})["max_concurrency"] = int(os.environ.get("NIN_AB_MAX_CONCURRENCY", "32"))
    elif ARM == "bentoml-parsing":
        svc.middlewares.clear()
    elif ARM == "no-drain":
        Drain.install = lambda self: False  # uvicorn keeps its own SIGTERM handler
    elif ARM == "no-bentoml-layers":
        from bench.layers import bentoml_layers, pass_through

        for layer in bentoml_layers().values():
            layer.__call__ = pass_through
    elif ARM != "service":
        raise SystemExit(f"NIN_AB_ARM must be service, fastapi-routes, max-concurrency, bentoml-parsing, no-drain, "
                         f"no-bentoml-layers or adaptive, got {ARM!r}")

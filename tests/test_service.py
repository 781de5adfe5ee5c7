"""The service in-process and through an ASGI client (no network)."""

import gc
import io
import mmap
import re
import time
from contextlib import contextmanager
from types import MethodType, SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from serving import http, imaging
from serving.engine import Engine, Settings
from serving.model_files import ModelLoadError
from tests.conftest import png_bytes
from tests.test_imaging import BAD, GOOD


def image_png(seed=0) -> bytes:
    return png_bytes(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (224, 224), dtype=np.uint8)))


def test_engine_in_process_picks_int8_on_cpu_and_matches_the_file(served_model):
    engine = Engine(Settings(model=str(served_model), max_batch_size=4))
    assert engine.provider == "CPUExecutionProvider" and engine.variant == "int8"
    assert not engine.ready.is_set()
    engine.warm_up()
    assert engine.ready.is_set() and sorted(engine.warmup_ms) == [1, 2, 3, 4]
    x = imaging.normalize([imaging.to_contract(image_png(), engine.contract, 10**8).image], engine.contract)
    logits, info = engine.run(x)
    assert logits.shape == (1, 10) and info["peak_rss_mb"] > 0


def test_service_class_in_process(service_cls, served_model, monkeypatch):
    monkeypatch.setenv("NIN_MODEL", str(served_model))
    svc = service_cls()
    assert not svc.__is_ready__()  # warm-up takes seconds, off the constructor's path
    deadline = time.time() + 60
    while not svc.__is_ready__() and time.time() < deadline:
        time.sleep(0.05)
    assert svc.__is_ready__()
    # ready means warmed up, the overload bound armed and the start-up heap frozen (out of the
    # collector's full passes)
    assert svc.state.admission.limit is not None and gc.get_freeze_count() > 0
    assert svc.engine.describe()["input_contract"]["image_size"] == 224


def test_a_variant_not_in_the_folder_fails_with_one_line(served_model):
    with pytest.raises(ModelLoadError, match="variant fp16 is not in"):
        Engine(Settings(model=str(served_model), variant="fp16"))


@pytest.mark.parametrize("env, error", [
    ({"NIN_VARIANT": "bogus"}, "NIN_VARIANT must be auto, fp32, int8 or fp16, got 'bogus'"),
    ({"NIN_MAX_BATCH_SIZE": "0"}, "NIN_MAX_BATCH_SIZE must be >= 1, got 0"),
    ({"NIN_MAX_WAIT_MS": "-1"}, "NIN_MAX_WAIT_MS must be >= 0"),
    ({"NIN_THREADS": "-2"}, "NIN_THREADS must be >= 0"),
    ({"NIN_LANES": "-2"}, "NIN_LANES must be -1"),
    ({"NIN_MAX_BATCH_IMAGES": "0"}, "NIN_MAX_BATCH_IMAGES must be >= 1"),
    ({"NIN_MAX_BYTES": "0"}, "NIN_MAX_BYTES must be >= 1"),
    ({"NIN_MAX_PIXELS": "-1"}, "NIN_MAX_PIXELS must be >= 1"),
    ({"NIN_LATENCY_BUDGET_MS": "0"}, "NIN_LATENCY_BUDGET_MS must be > 0"),
    ({"NIN_MAX_QUEUE": "-1"}, "NIN_MAX_QUEUE must be >= 0"),
])
def test_every_setting_out_of_range_fails_with_one_line(monkeypatch, env, error):
    """Checked in Settings.from_env, which the on_deployment hook runs before any worker starts
    (a worker whose __init__ raises is restarted by BentoML forever)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ModelLoadError, match=re.escape(error)):
        Settings.from_env()


def test_settings_built_in_code_are_checked_too():
    """The same checks, in Settings itself: Engine(Settings(variant="bogus")) fails in one line."""
    with pytest.raises(ModelLoadError, match="NIN_VARIANT must be auto, fp32, int8 or fp16, got 'bogus'"):
        Settings(variant="bogus")
    with pytest.raises(ModelLoadError, match="NIN_MAX_BATCH_SIZE must be >= 1, got 0"):
        Settings(max_batch_size=0)


def test_altered_model_file_is_refused(served_model, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(served_model, copy)
    data = bytearray((copy / "model.int8.onnx").read_bytes())
    data[-100] ^= 0xFF
    (copy / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="does not match its card"):
        Engine(Settings(model=str(copy)))
    with pytest.raises(ModelLoadError, match="model folder not found"):
        Engine(Settings(model=str(tmp_path / "nothing")))


def test_a_card_asking_for_another_resize_is_refused_at_load(served_model, tmp_path):
    """The server resizes bilinearly only: another interpolation in the card stops the start."""
    import json
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(served_model, copy)
    card = json.loads((copy / "card.json").read_text())
    card["input_contract"]["interpolation"] = "bicubic"
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="unsupported interpolation 'bicubic'"):
        Engine(Settings(model=str(copy)))


def test_classify_multipart_and_raw_body(client):
    png = image_png(1)
    a = client.post("/classify", files={"image": ("x.png", png, "image/png")})
    b = client.post("/classify", content=png, headers={"Content-Type": "image/png"})
    assert a.status_code == b.status_code == 200
    ja, jb = a.json(), b.json()
    assert ja["label"] == jb["label"] and ja["top_k"] == jb["top_k"] and len(ja["top_k"]) == 3
    assert set(ja["timing_ms"]) == {"read", "decode", "preprocess", "queue", "inference", "total"}
    assert ja["memory"]["peak_rss_mb"] > 0 and ja["model"]["variant"] == "int8"
    assert "inference;dur=" in a.headers["server-timing"]
    assert abs(sum(t["probability"] for t in client.post("/classify?top_k=10", content=png,
               headers={"Content-Type": "image/png"}).json()["top_k"]) - 1) < 1e-4


def test_conversions_are_reported(client):
    data = GOOD["small_28"][0]
    r = client.post("/classify", content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["input"]["resized"] is True
    from PIL import ImageCms  # a CIELAB TIFF: a 500 until Pillow's missing LAB -> L was handled

    lab = ImageCms.applyTransform(Image.new("RGB", (28, 28), (90, 90, 90)), ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"))
    buf = io.BytesIO()
    lab.save(buf, format="TIFF")
    r = client.post("/classify", files={"image": ("lab.tif", buf.getvalue(), "image/tiff")})
    assert r.status_code == 200, r.text
    assert r.json()["input"]["mode"] == "LAB" and r.json()["input"]["converted"] is True


def test_classify_batch_matches_single_requests(client):
    pngs = [image_png(s) for s in range(5)]
    r = client.post("/classify_batch", files=[("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)])
    assert r.status_code == 200, r.text
    labels = [x["label"] for x in r.json()["results"]]
    singles = [client.post("/classify", content=p, headers={"Content-Type": "image/png"}).json()["label"] for p in pngs]
    assert labels == singles


@pytest.mark.parametrize("name", list(BAD))
def test_bad_uploads_get_4xx_json(client, name):
    data, status, error = BAD[name]
    r = client.post("/classify", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == status and set(r.json()) == {"error", "detail"}


@pytest.mark.parametrize("kwargs, status, error", [
    (dict(files={"file": ("x.png", b"x", "image/png")}), 422, "missing_field"),
    (dict(content=b"{}", headers={"Content-Type": "application/json"}), 415, "unsupported_media_type"),
    (dict(content=b"x"), 415, "unsupported_media_type"),
    (dict(content=b"x", headers={"Content-Type": "multipart/form-data"}), 400, "bad_multipart"),  # no boundary
])
def test_request_shape_errors(client, kwargs, status, error):
    r = client.post("/classify", **kwargs)
    assert r.status_code == status and r.json()["error"] == error
    assert client.post("/classify", content=image_png(), headers={"Content-Type": "image/png"}).status_code == 200


@pytest.mark.parametrize("raw, n, expected", [
    ("3", 10, 3), (" 7 ", 10, 7), ("010", 10, 10), ("1", 1, 1),
    ("0", 10, None), ("11", 10, None), ("-1", 10, None), ("", 10, None), ("three", 10, None),
    ("\u0663", 10, None),  # Arabic-Indic 3: str.isdigit() is true, int() takes it, BentoML's parser does not
    ("\u00b2", 10, None),  # superscript 2: str.isdigit() is true, int() refuses it
    ("1" * 5000, 10, None),  # int() refuses over 4,300 digits: that was a 500 on every route
    ("1000", 10, None), (b"3", 10, None),
])
def test_parse_top_k(raw, n, expected):
    if expected is not None:
        assert http.parse_top_k(raw, n) == expected
        return
    with pytest.raises(http.InputError) as err:
        http.parse_top_k(raw, n)
    assert err.value.status == 422 and err.value.error == "bad_top_k" and len(err.value.detail) < 100


@pytest.mark.parametrize("query", ["top_k=0", "top_k=%D9%A3", "top_k=%C2%B2", "top_k=" + "1" * 5000])
def test_bad_top_k_is_a_422(client, query):
    r = client.post(f"/classify?{query}", content=image_png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 422 and r.json()["error"] == "bad_top_k", r.text


def test_content_length_in_odd_digits_is_not_a_500(client):
    """llhttp refuses these before the app over a real socket; the app must not fail on them either."""
    for declared in ("\u00b2", "9" * 5000):
        r = client.post("/classify", content=image_png(),
                        headers={"Content-Type": "image/png", "Content-Length": declared.encode("latin-1")})
        assert r.status_code < 500, (declared[:10], r.text)


def test_bad_image_in_a_batch(client):
    files = [("images", ("a.png", image_png(), "image/png")), ("images", ("b.png", b"junk", "image/png"))]
    r = client.post("/classify_batch", files=files)
    assert r.status_code == 400 and r.json()["error"] == "not_an_image" and r.json()["detail"].startswith("image 1:")


def test_model_endpoint(client):
    info = client.get("/model").json()
    assert info["provider"] == "CPUExecutionProvider" and info["variant"] == "int8"
    assert info["input_contract"]["interpolation"] == "bilinear" and info["ready"] is True
    assert info["card"]["class_names"][6] == "Shirt"


@contextmanager
def routes_over(state, passed: list | None = None):
    """The service's routes over `state`, in one event loop (the batcher lives on one): POST
    /classify* through http.Edge as served, and the FastAPI routes themselves under /plain/*
    (what /docs.json describes), their `self` overridden the FastAPI way. `passed` collects what
    reached the FastAPI app through the edge."""
    import bentoml

    from serving.service import app

    from serving.service import NiNClassifier

    service = SimpleNamespace(state=state, engine=state.engine)
    for route in http.Edge.DIRECT.values():  # the service's own route methods, bound to this stand-in
        setattr(service, route, MethodType(getattr(NiNClassifier.inner, route), service))
    app.dependency_overrides[bentoml.get_current_service] = lambda: service

    async def inner(scope, receive, send):
        if scope["type"] == "http" and passed is not None:
            passed.append((scope["method"], scope["path"]))
        await app(scope, receive, send)

    edge = http.Edge(inner, get_service=lambda: service)

    async def both(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/plain/"):
            return await app({**scope, "path": scope["path"][len("/plain"):]}, receive, send)
        await edge(scope, receive, send)

    try:
        with TestClient(both) as c:
            yield c
    finally:
        app.dependency_overrides.pop(bentoml.get_current_service, None)
        state.close()


def test_classify_waits_for_warm_up_and_the_armed_bound(served_model):
    """A cold engine answers 503 not_ready on every classify route, still once warm while the
    bound is unarmed (what /readyz waits for), and 200 once armed."""
    engine = Engine(Settings(model=str(served_model), max_batch_size=2, lanes=0))
    state = http.ServiceState(engine)
    png = dict(content=image_png(), headers={"Content-Type": "image/png"})
    typed = dict(files={"image": ("a.png", image_png(), "image/png")})
    with routes_over(state) as c:
        for url, kwargs in (("/classify", png), ("/plain/classify", png), ("/api/classify", typed)):
            r = c.post(url, **kwargs)
            assert r.status_code == 503 and r.json() == {"error": "not_ready", "detail": "the model is still warming up"}
        engine.warm_up()
        assert c.post("/classify", **png).json()["error"] == "not_ready"
        state.arm_admission()
        r = c.post("/classify", **png)
        assert r.status_code == 200 and r.json()["batch_size"] == 1


def test_edge_answers_classify_directly_as_the_fastapi_routes_would(served_model, monkeypatch):
    """http.Edge serves POST /classify* itself (skipping the inner ASGI stack): same status and
    JSON as the FastAPI routes for good and bad requests, other methods and paths pass through,
    and a failure inside is a JSON 500, not a dropped connection."""
    engine = Engine(Settings(model=str(served_model), max_batch_size=4, lanes=0))
    state = http.ServiceState(engine)
    engine.warm_up()
    state.arm_admission()
    passed = []
    png = image_png()
    requests = [
        ("/classify?top_k=2", dict(files={"image": ("a.png", png, "image/png")})),
        ("/classify", dict(content=png, headers={"Content-Type": "image/png"})),
        ("/classify_batch", dict(files=[("images", ("a.png", png, "image/png")), ("images", ("b.png", image_png(1), "image/png"))])),
        ("/classify?top_k=11", dict(content=png, headers={"Content-Type": "image/png"})),
        ("/classify", dict(content=b"not an image", headers={"Content-Type": "image/png"})),
        ("/classify", dict(files={"file": ("a.png", png, "image/png")})),
        ("/classify", dict(content=png, headers={"Content-Type": "text/plain"})),
    ]
    with routes_over(state, passed) as direct:
        for url, kwargs in requests:
            a, b = direct.post("/plain" + url, **kwargs), direct.post(url, **kwargs)
            assert a.status_code == b.status_code, url
            ja, jb = a.json(), b.json()
            for j in (ja, jb):
                j.pop("timing_ms", None), j.pop("memory", None)
            assert ja == jb, url
        assert passed == []  # every POST above was answered at the edge
        assert direct.get("/classify").status_code == 405 and direct.get("/model").json()["variant"] == "int8"
        assert passed == [("GET", "/classify"), ("GET", "/model")]

        async def broken(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(http, "infer", broken)
        r = direct.post("/classify", content=png, headers={"Content-Type": "image/png"})
        assert r.status_code == 500 and r.json()["error"] == "internal_error"
        assert state.admission.in_system == 0  # the failed request left the admission count


def test_throughput_lanes_give_the_latency_lane_s_logits(served_model):
    """Single-threaded lane sessions serve the same file: same logits as the latency lane; on
    one core or with NIN_LANES=0 there are none."""
    engine = Engine(Settings(model=str(served_model), max_batch_size=2, lanes=2))
    assert len(engine.lane_sessions) == 2 and engine.describe()["batching"]["throughput_lanes"] == 2
    x = imaging.normalize([imaging.to_contract(image_png(s), engine.contract, 10**8).image for s in range(2)], engine.contract)
    fast, info = engine.run(x)
    for lane in (0, 1):
        logits, lane_info = engine.run(x, lane)
        np.testing.assert_allclose(logits, fast, rtol=1e-5, atol=1e-5)
        assert lane_info["lane"] == lane and info["lane"] == "latency"
    assert Engine(Settings(model=str(served_model), lanes=0)).lane_sessions == []


def test_peak_rss_handles_reset_and_read_like_proc():
    """serving.procfs.PeakRss (kept-open /proc handles, per batch) reads what /proc/self/status
    says and its reset brings the peak back down to the current RSS."""
    from serving.procfs import PeakRss, read_status_kb

    peak = PeakRss()
    try:
        # 150 MB touched, then unmapped: an explicit mapping, because memory that malloc frees
        # may stay resident (it did in a long pytest process, RSS and peak then both stayed high)
        big = mmap.mmap(-1, 150 * 2**20)
        view = np.frombuffer(big, dtype=np.uint8)
        view[:] = 1
        del view
        big.close()
        assert peak.read_kb() == read_status_kb("VmHWM")
        high = peak.read_kb()
        peak.reset()
        assert peak.read_kb() < high - 100 * 1024 and peak.read_kb() == read_status_kb("VmHWM")
    finally:
        peak.close()


def test_large_uploads_decode_off_the_event_loop(served_model, monkeypatch):
    """A 224x224 upload decodes on the event loop's thread (cheaper than a hand-off); one over
    http.INLINE_MAX_PIXELS on the decoding thread, so a 12 MP photo does not stop every other
    request while it decodes. Same answer either way."""
    import threading

    from serving import http

    engine = Engine(Settings(model=str(served_model), max_batch_size=2, lanes=0))
    state = http.ServiceState(engine)
    engine.warm_up()
    state.arm_admission()
    where, finish = [], imaging.finish
    monkeypatch.setattr(imaging, "finish", lambda img, contract: (where.append(threading.current_thread().name),
                                                                  finish(img, contract))[1])
    small = np.random.default_rng(0).integers(0, 256, (224, 224), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((1024, 1024), Image.NEAREST))  # same image, 16x the pixels
    with routes_over(state) as c:
        answers = [c.post("/classify", content=png_bytes(Image.fromarray(a)), headers={"Content-Type": "image/png"})
                   for a in (small, big)]
    assert [r.status_code for r in answers] == [200, 200]
    assert not where[0].startswith("decode") and where[1].startswith("decode"), where
    assert answers[1].json()["input"]["size"] == [1024, 1024] and answers[1].json()["input"]["resized"]


def test_the_parent_death_signal_is_armed_only_in_a_bentoml_worker():
    """exit_with_parent belongs to `bentoml serve`'s worker; a process that builds the service
    class itself (these tests) is not one."""
    from serving.service import in_bentoml_worker

    assert not in_bentoml_worker()


def test_importing_the_service_starts_nothing_even_with_a_bad_model_or_setting():
    """Importing serving.service defines things only: no check, no exit, no thread. The checks
    run when `bentoml serve` starts (tests/test_http_server.py: one line, exit code 1)."""
    import os
    import subprocess
    import sys

    code = "import threading, serving.service; print(threading.active_count())"
    env = {**os.environ, "NIN_MODEL": "/nonexistent/model", "NIN_MAX_BYTES": "lots"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr[-2000:]


def test_batch_limit_is_the_setting_exactly(served_model, monkeypatch):
    """NIN_MAX_BATCH_IMAGES images are served, one more is a 413 too_many_images, none is a 422."""
    monkeypatch.setenv("NIN_MODEL", str(served_model))
    monkeypatch.setenv("NIN_MAX_BATCH_IMAGES", "5")
    monkeypatch.setenv("NIN_LANES", "0")
    engine = Engine(Settings.from_env())
    assert engine.settings.max_batch_images == 5
    state = http.ServiceState(engine)
    engine.warm_up()
    state.arm_admission()
    files = [("images", (f"{i}.png", image_png(i), "image/png")) for i in range(6)]
    with routes_over(state) as c:
        r = c.post("/classify_batch", files=files[:5])
        assert r.status_code == 200 and len(r.json()["results"]) == 5
        r = c.post("/classify_batch", files=files)
        assert (r.status_code, r.json()["error"]) == (413, "too_many_images")
        r = c.post("/classify_batch", data={"top_k": "2"}, files={"note": ("a.txt", b"hi", "text/plain")})
        assert (r.status_code, r.json()["error"]) == (422, "missing_field")


def test_typed_batch_takes_the_maximum_and_refuses_one_more_or_none(client):
    limit = client.get("/model").json()["limits"]["max_batch_images"]
    png = image_png()
    r = client.post("/api/classify_batch", files=[("images", (f"{i}.png", png, "image/png")) for i in range(limit)])
    assert r.status_code == 200 and len(r.json()["results"]) == limit
    r = client.post("/api/classify_batch", files=[("images", (f"{i}.png", png, "image/png")) for i in range(limit + 1)])
    assert (r.status_code, r.json()["error"]) == (413, "too_many_images")
    r = client.post("/api/classify_batch", data={"top_k": "2"}, files={"note": ("a.txt", b"hi", "text/plain")})
    assert (r.status_code, r.json()["error"]) == (422, "unknown_field")


def test_queue_time_is_a_metric(client):
    """nin_queue_seconds counts every classify request (/metrics itself: tests/test_http_server.py)."""
    from prometheus_client import REGISTRY

    def count() -> float:
        return REGISTRY.get_sample_value("nin_queue_seconds_count") or 0.0

    before = count()
    for _ in range(3):
        assert client.post("/classify", content=image_png(), headers={"Content-Type": "image/png"}).status_code == 200
    assert count() == before + 3


def test_several_workers_are_ready_only_once_every_live_one_is_warm(service_cls, tmp_path):
    """/readyz reaches one worker of several; each says ready only when every worker's mark is
    there (service.ready_dir), counting live processes only (a crashed worker's mark stays)."""
    import os
    import threading

    warmed = threading.Event()
    warmed.set()
    fake = SimpleNamespace(state=SimpleNamespace(open=warmed), drain=SimpleNamespace(draining=threading.Event()), all_warm=False,
                           marks=tmp_path, engine=SimpleNamespace(settings=SimpleNamespace(workers=2)))
    is_ready = MethodType(service_cls.inner.__is_ready__, fake)
    (tmp_path / str(os.getpid())).touch()
    assert not is_ready()
    (tmp_path / "4194303").touch()  # above the kernel's pid_max: never a live process
    assert not is_ready()
    (tmp_path / str(os.getppid())).touch()
    assert is_ready() and fake.all_warm
    fake.drain.draining.set()
    assert not is_ready()


def test_workers_setting(monkeypatch):
    from serving.engine import worker_count
    from serving.procfs import available_cores

    assert worker_count("auto") == worker_count("") == max(1, available_cores() // 2) >= 1
    assert worker_count("3") == 3
    with pytest.raises(ValueError):
        worker_count("0")
    monkeypatch.setenv("NIN_WORKERS", "two")
    with pytest.raises(ModelLoadError, match=r"bad NIN_\* setting"):
        Settings.from_env()
    monkeypatch.setenv("NIN_WORKERS", "2")
    s = Settings.from_env()
    assert s.workers == 2 and s.spinning is False  # several workers: no spinning by default
    monkeypatch.setenv("NIN_WORKERS", "1")
    assert Settings.from_env().spinning is True


def test_available_cores_follows_a_cgroup_quota(tmp_path):
    from serving.procfs import available_cores

    cpu_max = tmp_path / "cpu.max"
    affinity = available_cores(str(tmp_path / "none"))
    cpu_max.write_text("150000 100000\n")  # --cpus 1.5
    assert available_cores(str(cpu_max)) == min(affinity, 2)
    cpu_max.write_text("max 100000\n")
    assert available_cores(str(cpu_max)) == affinity

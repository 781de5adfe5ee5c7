"""A real `bentoml serve` in a subprocess on a free port, hit over HTTP."""

import concurrent.futures
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serving import imaging
from bench.images import real_test_pngs
from bench.servers import free_port, server_output, start_server, stop_server, wait_ready
from serving.engine import Engine, Settings
from serving.model_files import VARIANT_FILES
from serving.procfs import available_cores
from tests.conftest import MAX_BYTES, REAL_DATA, png_bytes
from tests.test_imaging import BAD

pytestmark = pytest.mark.integration


def start(model: Path, port: int, extra_env: dict | None = None):
    return start_server(model, port, {"NIN_MAX_BYTES": str(MAX_BYTES), **(extra_env or {})})


def test_start_up_says_in_one_plain_line_what_serves_where(server_proc):
    out = server_output(server_proc, 20000)
    info = httpx.get(f"{server_proc.url}/model", timeout=10).json()
    line = f"serving {info['variant']} variant ({VARIANT_FILES[info['variant']]}) on {info['provider']}"
    # one line per worker; CPU here: "serving int8 variant (model.int8.onnx) on CPUExecutionProvider"
    assert line in out and out.count("serving ") == info["workers"] == out.count(line), out
    assert "libcuda" not in out and "Failed to load" not in out, out


@REAL_DATA
def test_http_predictions_equal_in_process_onnxruntime(server, served_model):
    pngs, _ = real_test_pngs(240)
    engine = Engine(Settings(model=str(served_model)))
    x = imaging.normalize([imaging.to_contract(p, engine.contract, 10**8).image for p in pngs], engine.contract)
    expected = np.concatenate([engine.run(x[i : i + 16])[0] for i in range(0, len(x), 16)])
    got = []
    with httpx.Client(timeout=60) as c:
        for i in range(0, len(pngs), 40):
            r = c.post(f"{server}/classify_batch", files=[("images", (f"{j}.png", p, "image/png")) for j, p in enumerate(pngs[i : i + 40])])
            assert r.status_code == 200, r.text
            got += r.json()["results"]
        single = c.post(f"{server}/classify", files={"image": ("0.png", pngs[0], "image/png")}).json()
    assert [g["label"] for g in got] == expected.argmax(1).tolist()
    p = np.exp(expected - expected.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    served = np.array([g["top_k"][0]["probability"] for g in got])
    np.testing.assert_allclose(served, p.max(1), atol=1e-5)
    assert single["label"] == got[0]["label"]


def test_concurrent_requests_up_to_the_bound_all_succeed_batched(server):
    """As many single-image requests at once as the overload bound admits (32 for int8 here:
    more may be refused with 503 by design, and were, when 64 were sent on a quiet machine): every
    one answered 200, and batched."""
    bound = httpx.get(f"{server}/model", timeout=10).json()["limits"]["max_queue"]
    assert bound >= 16
    n = min(64, bound)
    pngs = [png_bytes(Image.fromarray(np.random.default_rng(i).integers(0, 256, (224, 224), dtype=np.uint8))) for i in range(n)]
    # the connections opened first and released together: the requests really overlap. (Fresh
    # httpx.post calls each build a client and an SSL context first, so on 2 busy cores they can
    # trickle in slower than the server answers them one by one, and nothing is left to batch.)
    clients = [httpx.Client(timeout=120) for _ in pngs]
    start = threading.Barrier(len(pngs))

    def one(i):
        c = clients[i]
        assert c.get(f"{server}/livez").status_code == 200  # the connection is open before the start
        start.wait(timeout=120)
        return c.post(f"{server}/classify", content=pngs[i], headers={"Content-Type": "image/png"})

    try:
        with concurrent.futures.ThreadPoolExecutor(len(pngs)) as pool:
            responses = list(pool.map(one, range(len(pngs))))
    finally:
        for c in clients:
            c.close()
    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses if r.status_code != 200][:2]
    assert max(r.json()["batch_size"] for r in responses) > 1  # concurrent requests were batched


def test_bad_inputs_over_http_then_a_good_one(server):
    with httpx.Client(timeout=30) as c:
        for name, (data, status, error) in BAD.items():
            r = c.post(f"{server}/classify", content=data, headers={"Content-Type": "image/png"})
            assert r.status_code == status, (name, r.text)
            assert set(r.json()) == {"error", "detail"} and r.json()["error"] == error, (name, r.text)
        big = b"\x89PNG" + bytes(MAX_BYTES + 10)
        r = c.post(f"{server}/classify", content=big, headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        r = c.post(f"{server}/classify", files={"picture": ("x.png", b"x", "image/png")})
        assert r.status_code == 422 and r.json()["error"] == "missing_field"
        r = c.post(f"{server}/classify", content=b"hi", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
        good = png_bytes(Image.new("L", (224, 224), 128))
        r = c.post(f"{server}/classify", files={"image": ("x.png", good, "image/png")})
        assert r.status_code == 200 and "label" in r.json()
        metrics = c.get(f"{server}/metrics").text
    for name in ("nin_inference_seconds", "nin_batch_size", "nin_queue_seconds_count", "nin_peak_rss_bytes", "nin_rejected_requests_total"):
        assert name in metrics
    assert 'reason="body_too_large"' in metrics


def test_model_endpoint_over_http(server):
    info = httpx.get(f"{server}/model", timeout=10).json()
    assert info["provider"] == "CPUExecutionProvider" and info["ready"] is True


@pytest.mark.parametrize("where, env, error", [
    ("missing", {}, "model folder not found"),
    ("model", {"NIN_VARIANT": "fp16"}, "variant fp16 is not in"),  # not exported: served_model has no fp16
    ("model", {"NIN_MAX_BATCH_SIZE": "0"}, "NIN_MAX_BATCH_SIZE must be >= 1"),
])
def test_bad_model_or_setting_fails_start_up_with_one_line(tmp_path, served_model, where, env, error):
    """Before any worker starts: not a worker restarted forever."""
    proc = start(served_model if where == "model" else tmp_path / where, free_port(), env)
    proc.wait(timeout=120)
    out = server_output(proc)
    stop_server(proc)
    assert proc.returncode == 1
    assert out.strip().splitlines()[-1].startswith(f"error: cannot serve: {error}"), out[-2000:]


@REAL_DATA
def test_bench_measures_the_running_service(server, served_model, tmp_path):
    """`python -m bench --url`, briefly: load levels, baselines, soak and all three outputs."""
    import json

    from bench.cli import main as bench_main

    rc = bench_main(["--url", server, "--model", str(served_model), "--python-concurrency", "1,4",
                     "--native-concurrency", "1,4", "--duration", "1", "--images", "16", "--soak", "300",
                     "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    variant = httpx.get(f"{server}/model").json()["variant"]
    run = result["runs"][f"service-{variant}"]
    assert set(run["python"]) == set(run["native"]) == {"1", "4"}
    for r in run["python"].values():
        assert r["requests"] > 0 and r["errors"] == 0 and r["p50"] <= r["p99"] <= r["max"]
        assert r["server_inference_ms"] > 0 and r["peak_rss_mb"] > 0
    for r in run["native"].values():  # wrk: one prebuilt multipart body, every answer a 200
        assert r["client"] == "wrk" and r["requests"] > 0 and r["errors"] == 0 and r["p50"] <= r["p99"] <= r["max"]
    assert run["python"]["1"]["mean_batch_size"] == 1.0
    assert result["baselines"][variant]["batch1_ms"] > 0 and result["baselines"]["torch"]["by_batch"]
    assert result["soak"]["requests"] == 300 and result["soak"]["errors"] == 0
    assert any(t["what"].startswith(f"{variant} (aim): service overhead at c=1") for t in result["targets"])
    page = (tmp_path / "bench.md").read_text()
    assert "| 4 | wrk |" in page and "| 4 | python |" in page and "in-process baselines" in page
    assert "soak: 300 requests, 0 errors" in page
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_past_the_bound_503_with_retry_after_below_it_all_200(served_model):
    """NIN_MAX_QUEUE=4 in each of two workers: 48 requests at once get 200 or an immediate 503
    with Retry-After and a JSON body, counted in a metric summed over the workers; 4 at once all
    get 200."""
    import asyncio

    port = free_port()
    proc = start(served_model, port, {"NIN_MAX_QUEUE": "4", "NIN_WORKERS": "2"})  # the bound is per worker
    url = f"http://127.0.0.1:{port}"
    png = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224), dtype=np.uint8)))

    async def burst(n):
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=n)) as c:
            return await asyncio.gather(*(c.post("/classify", files={"image": ("x.png", png, "image/png")}) for _ in range(n)))

    try:
        wait_ready(url, proc)
        assert httpx.get(f"{url}/model", timeout=10).json()["limits"]["max_queue"] == 4
        # twice the bound of uploads whose bodies stall half-way hold no place: they used to be
        # admitted before their bodies arrived, and then everyone else got 503s
        body = b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n" + png + b"\r\n--b--\r\n"
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        try:
            for sock in stalled:
                sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body[: len(body) // 2])
            deadline = time.time() + 30  # until the server holds all eight (BentoML's in-progress gauge)
            while in_progress(url, "/classify") < len(stalled):
                assert time.time() < deadline, "the stalled uploads never reached the server"
                time.sleep(0.05)
            assert [r.status_code for r in asyncio.run(burst(4))] == [200] * 4
            queue = next(m for m in httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
                         if m.startswith("nin_images_in_service"))
            assert float(queue.split()[-1]) == 0
        finally:
            for sock in stalled:
                sock.close()
        for _ in range(3):
            assert all(r.status_code == 200 for r in asyncio.run(burst(4)))
        # a burst overflows the bound only if its requests overlap in the server, which a busy
        # 2-core machine can spread out (a full CI run once saw 24 at once all answered 200):
        # up to five bursts of 48, and at least one must be refused in part
        answers, refused = [], []
        for _ in range(5):
            answers += asyncio.run(burst(48))
            refused = [r for r in answers if r.status_code == 503]
            if refused:
                break
        codes = sorted({r.status_code for r in answers})
        assert set(codes) <= {200, 503} and refused and 200 in codes, codes
        for r in refused:
            assert r.json()["error"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        line = next(m for m in metrics.splitlines() if m.startswith("nin_overload_rejections_total"))
        assert float(line.split()[-1]) == len(refused)
        queue = next(m for m in metrics.splitlines() if m.startswith("nin_images_in_service"))
        assert float(queue.split()[-1]) == 0  # every admitted image left the count
        alone = httpx.post(f"{url}/classify_batch", files=[("images", (f"{i}.png", png, "image/png")) for i in range(10)],
                           timeout=60)
        assert alone.status_code == 200 and len(alone.json()["results"]) == 10  # over the bound, but alone
    finally:
        stop_server(proc)



def in_progress(url: str, endpoint: str) -> float:
    """Requests BentoML is handling on `endpoint` now (its bentoml_service_request_in_progress gauge)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("bentoml_service_request_in_progress{") and f'endpoint="{endpoint}"' in line:
            return float(line.split()[-1])
    return 0.0

@REAL_DATA
def test_bench_alternates_servers_at_c1(server):
    """interleaved_c1 measures each server in alternating rounds and merges each one's rounds
    (here the same service under two names, so the plumbing is what is tested)."""
    from bench.cli import interleaved_c1
    from bench.images import real_test_pngs

    pngs, _ = real_test_pngs(4)
    out = interleaved_c1({"service": server, "reference": server}, pngs, ["python", "native"], 2)
    for kind in ("service", "reference"):
        for client in ("python", "native"):
            level = out[kind][client]["1"]
            assert level["rounds"] == 2 and level["requests"] > 0 and level["errors"] == 0
            assert level["seconds"] > 1.5 and level["p50"] <= level["max"]  # both rounds ran their second


def test_the_benchmark_reference_server_gives_the_service_s_answer(server, served_model):
    """bench/reference.py (the hand-written FastAPI server the benchmark compares against)
    serves the same model with the same preprocessing: same class, same probabilities."""
    from bench.servers import start_reference

    port = free_port()
    proc = start_reference(served_model, "int8", port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        for seed in range(3):
            png = png_bytes(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (224, 224), dtype=np.uint8)))
            ref = httpx.post(f"{url}/classify", files={"image": ("x.png", png, "image/png")}, timeout=30).json()
            svc = httpx.post(f"{server}/classify", files={"image": ("x.png", png, "image/png")}, timeout=30).json()
            assert ref["label"] == svc["label"]
            np.testing.assert_allclose([t["probability"] for t in ref["top_k"]],
                                       [t["probability"] for t in svc["top_k"]], atol=1e-5)
    finally:
        stop_server(proc)


def _validate(spec: dict, schema: dict, instance) -> None:
    """Validate a real answer against a schema from /docs.json, its $refs resolved in the document."""
    import jsonschema

    jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(instance)


def _declared(spec: dict, path: str, method: str, status: int) -> dict:
    return spec["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]


def test_docs_json_matches_what_every_route_really_answers(server):
    """One real request per route, its answer validated against the schema /docs.json declares."""
    from serving.page import SAMPLES

    png = (SAMPLES / "test0000-ankle-boot.png").read_bytes()
    with httpx.Client(base_url=server, timeout=30) as c:
        spec = c.get("/docs.json").json()
        routes = {p: sorted(ops) for p, ops in spec["paths"].items()}
        assert {"/classify", "/classify_batch", "/model", "/ui", "/ui/samples", "/ui/samples/{name}",
                "/api/classify", "/api/classify_batch", "/livez", "/readyz", "/metrics"} <= set(routes)
        answers = {
            ("/classify", 200): c.post("/classify?top_k=5", files={"image": ("a.png", png, "image/png")}),
            ("/classify", 400): c.post("/classify", content=b"not an image", headers={"Content-Type": "image/png"}),
            ("/classify", 415): c.post("/classify", content=b"hi", headers={"Content-Type": "text/plain"}),
            ("/classify", 422): c.post("/classify?top_k=99", content=png, headers={"Content-Type": "image/png"}),
            ("/classify_batch", 200): c.post("/classify_batch", files=[("images", ("a.png", png, "image/png"))] * 3),
            ("/classify_batch", 413): c.post("/classify_batch", files=[("images", ("a.png", png, "image/png"))] * 65),
            ("/api/classify", 200): c.post("/api/classify", files={"image": ("a.png", png, "image/png")}),
            ("/api/classify_batch", 200): c.post("/api/classify_batch", files=[("images", ("a.png", png, "image/png"))] * 2),
        }
        errors = {("/classify", 400): "not_an_image", ("/classify", 415): "unsupported_media_type",
                  ("/classify", 422): "bad_top_k", ("/classify_batch", 413): "too_many_images"}
        for (path, status), r in answers.items():
            assert r.status_code == status, (path, r.text)
            assert status == 200 or r.json()["error"] == errors[path, status], (path, r.text)
            method = "post"
            _validate(spec, _declared(spec, path, method, status), r.json())
        model = c.get("/model")
        _validate(spec, _declared(spec, "/model", "get", 200), model.json())
        samples = c.get("/ui/samples")
        _validate(spec, _declared(spec, "/ui/samples", "get", 200), samples.json())
        page = c.get("/ui")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "text/html" in spec["paths"]["/ui"]["get"]["responses"]["200"]["content"]


def test_bentoml_clients_classify_a_file_with_one_call_like_curl(server, tmp_path):
    import asyncio
    import json
    import subprocess

    import bentoml

    from serving.page import SAMPLES

    image = tmp_path / "boot.png"
    image.write_bytes((SAMPLES / "test0000-ankle-boot.png").read_bytes())
    curl = subprocess.run(["curl", "-sS", "-F", f"image=@{image}", f"{server}/classify?top_k=3"],
                          capture_output=True, text=True, timeout=30, check=True)
    expected = json.loads(curl.stdout)
    with bentoml.SyncHTTPClient(server) as client:
        assert {"classify", "classify_batch"} <= set(client.endpoints)
        got = client.classify(image=image)
        batch = client.classify_batch(images=[image, image])

    async def call_async():
        async with bentoml.AsyncHTTPClient(server) as client:
            return await client.classify(image=image, top_k=3)

    got_async = asyncio.run(call_async())
    for answer in (got, got_async, batch["results"][0]):
        assert {k: answer[k] for k in ("label", "class_name", "top_k")} == {
            k: expected[k] for k in ("label", "class_name", "top_k")}
    assert got["model"] == expected["model"] and "timing_ms" in got and "memory" in got

    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image at all")
    with bentoml.SyncHTTPClient(server) as client, pytest.raises(bentoml.exceptions.BentoMLException) as err:
        client.classify(image=bad)
    assert "not_an_image" in str(err.value) or "no image decoder" in str(err.value)


@REAL_DATA
def test_big_upload_bench_measures_small_requests_beside_large_ones(server, tmp_path):
    """`python -m bench.big_upload --url`, briefly: small requests and large uploads all answered,
    the figures written."""
    import json

    from bench.big_upload import main as big_main

    out = tmp_path / "big.json"
    assert big_main(["--url", server, "--size", "1200x1000", "--duration", "3", "--every", "1",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["small_requests"] > 0 and set(result["small_statuses"]) == {"200"}
    assert result["large_uploads"] and all(b["status"] == 200 for b in result["large_uploads"])
    assert result["p50"] <= result["p99"] <= result["max"]
    assert big_main(["--url", server, "--size", "12x"]) == 2


def test_nin_model_may_name_a_bentoml_model_tag(served_model, tmp_path):
    """NIN_MODEL=name:version serves that model from BentoML's store (here a store of the test's own)."""
    import subprocess
    import sys

    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    tag = subprocess.run([sys.executable, "-m", "serving.model_files", str(served_model)], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout.strip()
    port = free_port()
    proc = start_server(tag, port, {"BENTOML_HOME": env["BENTOML_HOME"]})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        info = httpx.get(f"{url}/model", timeout=10).json()
        assert info["model_folder"] == str(tmp_path / "bentoml" / "models" / tag.replace(":", "/"))
        png = png_bytes(Image.new("L", (224, 224), 100))
        assert httpx.post(f"{url}/classify", content=png, headers={"Content-Type": "image/png"}, timeout=30).status_code == 200
    finally:
        stop_server(proc)


def metric(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_two_workers_both_answer_and_metrics_add_them_up(server):
    """The shared server runs NIN_WORKERS=2: fresh connections reach both processes; /metrics
    (BentoML's multiprocess directory) counts every request, whichever worker took it, and shows
    each worker's peak RSS; /model and every answer name the process."""
    info = httpx.get(f"{server}/model", timeout=10).json()
    assert info["workers"] == 2 and info["batching"]["throughput_lanes"] == 0
    assert info["batching"]["latency_lane_spinning"] is False  # one worker's spinning threads would take the other's core
    assert info["batching"]["latency_lane_threads"] == max(1, available_cores() // 2)  # each worker its share
    png = png_bytes(Image.fromarray(np.zeros((224, 224), np.uint8)))
    ok = 'bentoml_service_request_total{endpoint="/classify",http_response_code="200"'
    before = httpx.get(f"{server}/metrics", timeout=10).text
    n, pids = 48, []

    def one(_):
        r = httpx.post(f"{server}/classify", content=png, headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["memory"]["pid"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # a new connection per request
        pids = list(pool.map(one, range(n)))
    assert len(set(pids)) == 2, pids
    after = httpx.get(f"{server}/metrics", timeout=10).text
    assert metric(after, ok) - metric(before, ok) == n
    assert metric(after, "nin_batch_size_sum") - metric(before, "nin_batch_size_sum") == n  # every image, in some batch
    rss = {line.split('pid="')[1].split('"')[0] for line in after.splitlines() if line.startswith("nin_peak_rss_bytes{")}
    assert {str(p) for p in pids} <= rss, rss

"""A real `bentoml serve` in a subprocess on a free port, hit over HTTP."""

import concurrent.futures
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serving import imaging
from serving.engine import Engine, Settings
from tests.conftest import REAL_DATA, png_bytes
from tests.test_imaging import BAD

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
MAX_BYTES = 2 * 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, extra_env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "NIN_MODEL": str(model), "NIN_MAX_BYTES": str(MAX_BYTES), **(extra_env or {})}
    bentoml = Path(sys.executable).with_name("bentoml")
    return subprocess.Popen([str(bentoml), "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("server not ready in time")


def stop(proc: subprocess.Popen) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(served_model):
    port = free_port()
    proc = start_server(served_model, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        stop(proc)


def real_test_pngs(n: int) -> tuple[list[bytes], np.ndarray]:
    """The first n Debian test images as a user would upload them: 224x224 PNG, PIL bilinear."""
    from training.data import find_data_root, load_split

    x, y = load_split(find_data_root(allow_download=False), train=False)
    return [png_bytes(Image.fromarray(img.numpy()).resize((224, 224), Image.BILINEAR)) for img in x[:n]], y[:n].numpy()


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


def test_64_concurrent_requests_all_succeed(server):
    pngs = [png_bytes(Image.fromarray(np.random.default_rng(i).integers(0, 256, (224, 224), dtype=np.uint8))) for i in range(64)]

    def one(p):
        return httpx.post(f"{server}/classify", content=p, headers={"Content-Type": "image/png"}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(one, pngs))
    assert [r.status_code for r in responses] == [200] * 64
    assert max(r.json()["batch_size"] for r in responses) > 1  # concurrent requests were batched


def test_bad_inputs_over_http_then_a_good_one(server):
    with httpx.Client(timeout=30) as c:
        for name, (data, status, _) in BAD.items():
            r = c.post(f"{server}/classify", content=data, headers={"Content-Type": "image/png"})
            assert r.status_code == status, (name, r.text)
            assert set(r.json()) == {"error", "detail"}
        big = b"\x89PNG" + bytes(MAX_BYTES + 10)
        r = c.post(f"{server}/classify", content=big, headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        r = c.post(f"{server}/classify", files={"picture": ("x.png", b"x", "image/png")})
        assert r.status_code == 422
        r = c.post(f"{server}/classify", content=b"hi", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        good = png_bytes(Image.new("L", (224, 224), 128))
        r = c.post(f"{server}/classify", files={"image": ("x.png", good, "image/png")})
        assert r.status_code == 200 and "label" in r.json()
        metrics = c.get(f"{server}/metrics").text
    for name in ("nin_inference_seconds", "nin_batch_size", "nin_peak_rss_bytes", "nin_rejected_requests_total"):
        assert name in metrics
    assert 'reason="body_too_large"' in metrics


def test_model_endpoint_over_http(server):
    info = httpx.get(f"{server}/model", timeout=10).json()
    assert info["provider"] == "CPUExecutionProvider" and info["ready"] is True


def test_bad_model_fails_start_up_with_one_line(tmp_path):
    proc = start_server(tmp_path / "missing", free_port())
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert out.strip().splitlines()[-1].startswith("error: cannot serve: model folder not found")

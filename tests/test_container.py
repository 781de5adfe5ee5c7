"""Build the service's container offline, run it on 127.0.0.1, classify real images, remove it."""

import json
import subprocess
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import png_bytes, require_real_data
from bench.servers import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "container.sh"
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def image():
    if not (ROOT / "models" / "nin-fashion-mnist" / "card.json").is_file():
        pytest.skip("no shipped model in models/nin-fashion-mnist to put in the container")
    check = subprocess.run(["bash", str(SCRIPT), "check"], capture_output=True, text=True, timeout=600)
    if check.returncode != 0:
        reason = f"no Docker daemon can be started here: {check.stderr.strip()}"
        print(reason)
        pytest.skip(reason)
    build = subprocess.run(["bash", str(SCRIPT), "build"], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert build.returncode == 0, build.stderr
    return build.stdout.strip().splitlines()[-1]


def test_container_serves_real_predictions(image):
    port = free_port()
    cid = subprocess.run(["docker", "run", "-d", "-p", f"127.0.0.1:{port}:3000", image],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, timeout=180)
        except TimeoutError:
            logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True).stdout
            pytest.fail(f"container not ready:\n{logs[-3000:]}")
        card = json.loads((ROOT / "models" / "nin-fashion-mnist" / "card.json").read_text())
        assert httpx.get(f"{url}/model", timeout=10).json()["card"]["test_accuracy"] == card["test_accuracy"]
        from training.data import find_data_root, load_split

        require_real_data()
        x, y = load_split(find_data_root(allow_download=False), train=False)
        files = [("images", (f"{i}.png", png_bytes(Image.fromarray(x[i].numpy()).resize((224, 224), Image.BILINEAR)), "image/png"))
                 for i in range(50)]
        r = httpx.post(f"{url}/classify_batch", files=files, timeout=60)
        assert r.status_code == 200, r.text
        correct = sum(res["label"] == int(y[i]) for i, res in enumerate(r.json()["results"]))
        assert correct >= 0.8 * 50 * card["test_accuracy"]  # a trained model, not noise
        assert httpx.post(f"{url}/classify", content=b"junk", headers={"Content-Type": "image/png"}, timeout=10).status_code == 400
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)

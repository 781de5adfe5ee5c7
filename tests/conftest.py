"""Shared fixtures: a tiny Fashion-MNIST in the real IDX format, written by the tests."""

from __future__ import annotations

import gzip
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["tests.ci_skips"]  # under CI=true, a skip outside the GPU tests fails the run

# Tests that read the real Fashion-MNIST carry this marker: they skip where it is not installed,
# and fail under CI=true (CI installs it: a skip there would hide a broken install step).
REAL_DATA = pytest.mark.real_data


def has_real_data() -> bool:
    """The real Fashion-MNIST where training.data looks: $FASHION_MNIST_DIR (the GPU machine's
    carried copy), then Debian's package."""
    from training.data import DataNotFoundError, find_data_root

    try:
        find_data_root(allow_download=False)
    except DataNotFoundError:
        return False
    return True


def require_real_data() -> None:
    if has_real_data():
        return
    reason = ("the real Fashion-MNIST is neither in $FASHION_MNIST_DIR nor installed "
              "(apt-get install dataset-fashion-mnist)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def expecting_gpu() -> bool:
    """NIN_EXPECT_GPU=1 (set by scripts/gpu_proof.py on the GPU machine): a missing or broken
    CUDA path is a failure, not a skip."""
    from tests.ci_skips import flag

    return flag("NIN_EXPECT_GPU")


def skip_or_fail_without_gpu(reason: str) -> None:
    if expecting_gpu():
        pytest.fail(f"NIN_EXPECT_GPU=1 but {reason}")
    pytest.skip(reason)


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("real_data"):
        require_real_data()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """IDX as in the original files: magic (0, 0, type 0x08 = ubyte, ndim), big-endian dims."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def make_fashion_mnist(folder: Path, n_train: int = 64, n_test: int = 32, compress: bool = True, seed: int = 0) -> Path:
    """Images whose class is visible (a bright horizontal bar at a class-dependent row), so a
    few training steps can learn something."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, y in enumerate(labels):
            images[i, 2 + 2 * y : 4 + 2 * y, 4:24] = 250
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return folder


@pytest.fixture
def tiny_data(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NIN_CACHE_DIR", str(tmp_path / "cache"))
    return make_fashion_mnist(tmp_path / "fmnist")


def export_random_model(root: Path, n_test: int = 20, ckpt_extra: dict | None = None, **opts) -> dict:
    """Save a small random-weight NiN (BatchNorm, width 0.25) as a checkpoint and export it
    (with its card and int8 variant) from a tiny IDX dataset: what the export and serving tests
    both start from. `opts` go to ExportOptions."""
    import torch

    from export.exporter import ExportOptions, export_checkpoint
    from training.checkpoint import save_checkpoint
    from training.config import NiNConfig
    from training.model import NiN

    mp = pytest.MonkeyPatch()
    mp.setenv("NIN_CACHE_DIR", str(root / "cache"))
    try:
        data = make_fashion_mnist(root / "data", n_train=64, n_test=n_test)
        torch.manual_seed(0)
        cfg = NiNConfig(batch_norm=True, width=0.25)
        ckpt = root / "ckpt.pt"
        save_checkpoint({"model": NiN(cfg).state_dict(), "model_config": cfg.to_dict(), **(ckpt_extra or {})}, ckpt)
        options = dict(register=False, calibration_images=32, timing=False) | opts
        card = export_checkpoint(ckpt, root / "model", ExportOptions(data_dir=str(data), **options))
    finally:
        mp.undo()
    return dict(root=root, data=data, ckpt=ckpt, out=root / "model", card=card)


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> Path:
    """A small random-weight NiN exported with its card and int8 variant, as the server wants."""
    return export_random_model(tmp_path_factory.mktemp("served"), fp16=False)["out"]


def png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def service_cls():
    from serving.service import NiNClassifier

    return NiNClassifier


@pytest.fixture(scope="session")
def client(service_cls, served_model):
    """The whole service in-process through an ASGI client. One per test session: BentoML
    registers its Prometheus metrics once per process, so a second app cannot be built.
    NIN_MODEL is set only while the service instance is made (no environment leaks)."""
    from starlette.testclient import TestClient

    c = TestClient(service_cls.to_asgi())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIN_MODEL", str(served_model))
        c.__enter__()  # the lifespan makes the instance, which reads its settings
    try:
        deadline = time.monotonic() + 120
        while c.get("/readyz").status_code != 200:
            if time.monotonic() > deadline:
                pytest.fail("the in-process service was not ready after 120 s")
            time.sleep(0.05)
        yield c
    finally:
        c.__exit__(None, None, None)


MAX_BYTES = 2 * 2**20  # the byte cap of the shared real server


@pytest.fixture(scope="session")
def server_proc(served_model):
    """One real `bentoml serve` (two workers) in a subprocess on a free port, shared by the
    modules that need a server (tests/test_http_server.py, tests/test_browser.py) on the same
    pytest-xdist worker."""
    from bench.servers import running_server

    with running_server(served_model, {"NIN_MAX_BYTES": str(MAX_BYTES), "NIN_WORKERS": "2"}) as proc:
        yield proc


@pytest.fixture(scope="session")
def server(server_proc) -> str:
    return server_proc.url

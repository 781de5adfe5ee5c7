"""Where the engine runs, on a machine without a GPU (this project's CPU machines, CI): it asks
onnxruntime for the CUDA provider only where a GPU is present, fails in one line where one is
required, and falls back to the CPU (saying so) where the CUDA provider cannot start."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from serving import engine as engine_mod
from serving.engine import Engine, Settings, check_gpu_requirement, cuda_device_count, fp16_checked_on_cuda
from serving.model_files import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has a GPU (tests/test_gpu.py covers it)")


@no_gpu
@pytest.mark.parametrize("settings", [Settings(require_gpu=True), Settings(device="cuda"),
                                      Settings(require_gpu=True, device="cpu")])
def test_a_required_gpu_fails_in_one_line_on_a_cpu_host(served_model, settings):
    settings = Settings(**{**settings.__dict__, "model": str(served_model)})
    with pytest.raises(ModelLoadError) as e:
        Engine(settings)
    assert "\n" not in str(e.value) and ("GPU is required" in str(e.value) or "contradicts" in str(e.value))


@no_gpu
@pytest.mark.integration
def test_bentoml_serve_with_nin_require_gpu_exits_1_with_one_line(served_model):
    r = subprocess.run([sys.executable, "-m", "bentoml", "serve", "--port", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "NIN_MODEL": str(served_model), "NIN_REQUIRE_GPU": "1"})
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "GPU is required" in errors[0], r.stderr[-2000:]


@no_gpu
def test_no_gpu_means_no_cuda_attempt_and_one_plain_line(served_model):
    """onnxruntime-gpu prints a red 'Failed to load libcuda.so.1' when asked for CUDA without a
    GPU; the engine does not ask, and says in one line what serves where."""
    code = ("import logging; logging.basicConfig(level=logging.INFO);"
            "from serving.engine import Engine, Settings;"
            f"e = Engine(Settings(model={str(served_model)!r})); print(e.provider, e.variant)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["CPUExecutionProvider", "int8"]
    assert "libcuda" not in r.stderr and "Failed to load" not in r.stderr, r.stderr
    assert "serving int8 variant (model.int8.onnx) on CPUExecutionProvider" in r.stderr


@no_gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu")
def test_cuda_provider_that_cannot_start_falls_back_to_the_cpu(served_model, monkeypatch, caplog):
    """A GPU that the driver reports but onnxruntime cannot use (here: pretend the driver sees
    one): the session falls back to the CPU with a warning and serves the CPU variant."""
    monkeypatch.setattr(engine_mod, "cuda_device_count", lambda: 1)
    with caplog.at_level(logging.INFO, logger="serving"):
        engine = Engine(Settings(model=str(served_model)))
    assert engine.provider == "CPUExecutionProvider" and engine.variant == "int8" and engine.gpu is None
    assert any("could not start" in r.message for r in caplog.records)
    with pytest.raises(ModelLoadError, match="runs on CPUExecutionProvider"):
        Engine(Settings(model=str(served_model), require_gpu=True))


def test_settings_reject_an_unknown_device(monkeypatch):
    monkeypatch.setenv("NIN_DEVICE", "gpu")
    with pytest.raises(ModelLoadError, match="NIN_DEVICE must be auto, cuda or cpu"):
        Settings.from_env()
    check_gpu_requirement(Settings())  # nothing required, nothing raised


def test_fp16_is_served_on_cuda_only_where_its_gate_ran_there():
    cpu_only = {"variants": {"fp16": {"passed": True, "checked_on": ["CPUExecutionProvider"]}}}
    both = {"variants": {"fp16": {"passed": True, "checked_on": ["CPUExecutionProvider", "CUDAExecutionProvider"]}}}
    failed = {"variants": {"fp16": {"passed": False, "checked_on": ["CPUExecutionProvider", "CUDAExecutionProvider"]}}}
    assert not fp16_checked_on_cuda(cpu_only) and fp16_checked_on_cuda(both) and not fp16_checked_on_cuda(failed)
    assert not fp16_checked_on_cuda({"variants": {"fp16": {"passed": True}}})  # cards from before the gate said where

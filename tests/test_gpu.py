"""Checks that need a CUDA device; they skip cleanly without one."""

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def cuda_session_or_skip(path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider")
    try:
        ort.preload_dlls()
    except Exception:
        pass
    s = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if s.get_providers()[0] != "CUDAExecutionProvider":
        pytest.skip("the CUDA execution provider cannot start here (no GPU or no CUDA 13 / cuDNN 9)")
    return s


def test_cuda_provider_matches_cpu(served_model):
    import onnxruntime as ort

    gpu = cuda_session_or_skip(served_model / "model.onnx")
    cpu = ort.InferenceSession(str(served_model / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((32, 1, 224, 224), dtype=np.float32)
    a, b = cpu.run(None, {"image": x})[0], gpu.run(None, {"image": x})[0]
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)


def test_service_engine_uses_cuda_when_required(served_model):
    from serving.engine import Engine, Settings

    cuda_session_or_skip(served_model / "model.onnx")
    engine = Engine(Settings(model=str(served_model), require_gpu=True, variant="fp32"))
    assert engine.provider == "CUDAExecutionProvider"
    engine.warm_up()
    logits, info = engine.run(np.zeros((4, 1, 224, 224), np.float32))
    assert logits.shape == (4, 10)


def test_training_step_on_cuda_reports_memory():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    from training.config import NiNConfig
    from training.resources import report
    from training.stats import measure

    cfg = NiNConfig(batch_norm=True)
    m = measure(cfg, 8, "sgd-momentum", torch.device("cuda"), 224)
    predicted = report(cfg, 8)["memory"]["training"]
    assert m["training_step_bytes"] >= 0.8 * (predicted["total"] - predicted["weights"])

"""Checks that need a CUDA device. Without one they skip; with NIN_EXPECT_GPU=1 (set by
scripts/gpu_proof.py on the GPU machine) a missing or broken CUDA path fails instead.

`gpu` alone: torch on CUDA (training, profile, memory), runnable where only torch is installed.
`gpu` + `cuda_ort`: onnxruntime-gpu's CUDA execution provider and bentoml on a GPU
(scripts/gpu_serve_proof.py carries them there as wheels).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REAL_DATA, make_fashion_mnist, skip_or_fail_without_gpu

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "nin-fashion-mnist"


def torch_cuda():
    import torch

    if not torch.cuda.is_available():
        skip_or_fail_without_gpu("torch sees no CUDA device")
    return torch


def cuda_session(path):
    import onnxruntime as ort

    from export.variants import cuda_session as make

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        skip_or_fail_without_gpu("onnxruntime has no CUDA execution provider (onnxruntime-gpu not installed)")
    session = make(path)  # a failing preload_dlls raises here: a broken install is an error, not a skip
    if session is None:
        skip_or_fail_without_gpu("the CUDA execution provider cannot start here (no GPU, or no CUDA 13 / cuDNN 9)")
    return session


# ---- torch on CUDA ----------------------------------------------------------------------------

def test_train_step_never_waits_on_the_host():
    """The training step, fed as a run feeds it (data and batch indices on the GPU), makes no
    synchronising call: torch raises on the first one under sync debug mode "error"."""
    torch = torch_cuda()
    import argparse

    from training.config import NiNConfig
    from training.engine import train_step
    from training.model import NiN
    from training.presets import PRESETS
    from training.runtime import make_runtime
    from training.train import build_optimizer, build_scheduler, epoch_batches

    rt = make_runtime("cuda", "auto", "auto")
    assert rt.amp_dtype == torch.bfloat16 and rt.channels_last
    args = argparse.Namespace(**PRESETS["strong"], seed=0)
    cfg = NiNConfig(batch_norm=True, width=0.25)
    model = NiN(cfg).to(rt.device, memory_format=torch.channels_last)
    opt, images = build_optimizer(model, args), torch.randint(0, 256, (512, 28, 28), dtype=torch.uint8, device=rt.device)
    labels = torch.randint(0, 10, (512,), device=rt.device)
    sched = build_scheduler(opt, args, steps_per_epoch=8)
    batches = epoch_batches(512, argparse.Namespace(batch_size=64, seed=0), rt, 0, images.device)
    assert all(b.device == images.device for b in batches)
    kw = dict(augment=True, label_smoothing=0.1)
    train_step(model, opt, sched, images[batches[0]], labels[batches[0]], cfg, rt, **kw)  # cuDNN picks kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for idx in batches[1:]:
            loss, correct = train_step(model, opt, sched, images[idx], labels[idx], cfg, rt, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and 0 <= correct.item() <= 64


def test_profile_finds_no_per_step_host_sync():
    torch_cuda()
    from training.profile import run_profile
    from training.runtime import make_runtime

    summary, table = run_profile(make_runtime("cuda", "auto", "auto"), batch_size=64, steps=40, width=0.5)
    # the progress bar's reads at steps 20 and 40 and the end-of-epoch totals: nothing per step
    assert summary["host_syncs_per_step"] <= 0.15, summary
    assert not any("HtoD" in k and "Pageable" in k for k in summary["device_copies"]), summary
    assert summary["device_busy_share"] and summary["img_per_s"] > 0, summary


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "training", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_training_cli_on_cuda_bf16_channels_last_and_resume(tmp_path):
    """bf16 autocast and channels_last on by default; an interrupted run resumes to the same
    state as an uninterrupted one, CUDA RNG state included (the augmentation draws on the GPU)."""
    torch = torch_cuda()
    from training.checkpoint import load_checkpoint, save_checkpoint

    data = make_fashion_mnist(tmp_path / "data", n_train=96, n_test=32)
    fast = ["--data-dir", str(data), "--device", "cuda", "--width", "0.25", "--batch-size", "16",
            "--checkpoint-every", "0", "--eval-limit", "32"]
    env_ok = run_cli("--out", str(tmp_path / "once"), "--max-steps", "4", *fast)
    assert env_ok.returncode == 0, env_ok.stderr[-2000:]
    args = json.loads((tmp_path / "once" / "args.json").read_text())
    assert args["device"].startswith("cuda") and args["amp"] == "torch.bfloat16" and args["channels_last"] is True
    r = run_cli("--out", str(tmp_path / "twice"), "--max-steps", "2", *fast)
    assert r.returncode == 0, r.stderr[-2000:]
    # the same half-way checkpoint with its optimizer state dropped: what a broken resume would do
    (tmp_path / "dropped").mkdir()
    half = load_checkpoint(tmp_path / "twice/last.pt")
    half["optimizer"]["state"] = {}
    save_checkpoint(half, tmp_path / "dropped/last.pt")
    for run in ("twice", "dropped"):
        r = run_cli("--out", str(tmp_path / run), "--max-steps", "2", "--resume", *fast)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b, c = (load_checkpoint(tmp_path / f"{run}/last.pt") for run in ("once", "twice", "dropped"))
    assert "cuda" in a["rng"] and torch.equal(a["rng"]["cuda"], b["rng"]["cuda"])
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])
    assert a["batch_in_epoch"] == b["batch_in_epoch"] == 4
    # cuDNN's kernels may differ in the last bits between processes, so not bit for bit: the
    # resumed run must sit far closer to the uninterrupted one than a resume without its momentum
    def gap(x, y):
        return sum((x[k].float() - y[k].float()).abs().sum().item() for k in x)
    momenta = [{k: s["momentum_buffer"] for k, s in ck["optimizer"]["state"].items()} for ck in (a, b, c)]
    assert gap(momenta[0], momenta[1]) < 0.05 * gap(momenta[0], momenta[2])  # on the CPU: 0 against 1,415
    assert gap(a["model"], b["model"]) < 0.05 * gap(a["model"], c["model"])
    assert "NVIDIA" in a["runtime"]["hardware"]


def test_training_step_on_cuda_reports_memory():
    torch = torch_cuda()
    from training.config import NiNConfig
    from training.resources import report
    from training.stats import measure

    cfg = NiNConfig(batch_norm=True)
    m = measure(cfg, 8, "sgd-momentum", torch.device("cuda"), 224)
    predicted = report(cfg, 8)["memory"]["training"]
    assert m["method"] == "torch.cuda.max_memory_allocated"
    assert 0.8 * (predicted["total"] - predicted["weights"]) <= m["training_step_bytes"] <= 3 * predicted["total"]


# ---- onnxruntime-gpu and bentoml on CUDA -------------------------------------------------------

def real_inputs(n: int) -> tuple[np.ndarray, np.ndarray]:
    from serving import imaging
    from bench.images import real_test_pngs

    pngs, labels = real_test_pngs(n)
    contract = json.loads((SHIPPED / "card.json").read_text())["input_contract"]
    return imaging.normalize([imaging.to_contract(p, contract, 10**8).image for p in pngs], contract), labels


@pytest.mark.cuda_ort
@REAL_DATA
def test_cuda_fp32_and_fp16_agree_with_the_cpu_on_real_images():
    from export.variants import cpu_session, run_batched

    x, labels = real_inputs(512)
    cpu = run_batched(cpu_session(SHIPPED / "model.onnx"), x)
    gpu32 = run_batched(cuda_session(SHIPPED / "model.onnx"), x)
    np.testing.assert_allclose(gpu32, cpu, rtol=1e-3, atol=2e-3)  # TF32 is off in onnxruntime by default
    assert (gpu32.argmax(1) == cpu.argmax(1)).mean() >= 0.998
    if (SHIPPED / "model.fp16.onnx").is_file():
        gpu16 = run_batched(cuda_session(SHIPPED / "model.fp16.onnx"), x)
        assert np.isfinite(gpu16).all() and (gpu16.argmax(1) == cpu.argmax(1)).mean() >= 0.995


@pytest.mark.cuda_ort
@REAL_DATA
def test_engine_serves_on_cuda_when_a_gpu_is_required():
    from serving.engine import Engine, Settings

    cuda_session(SHIPPED / "model.onnx")
    engine = Engine(Settings(model=str(SHIPPED), require_gpu=True, max_batch_size=4))
    assert engine.provider == "CUDAExecutionProvider" and engine.gpu is not None
    engine.warm_up()
    x, labels = real_inputs(4)
    logits, info = engine.run(x)
    assert logits.shape == (4, 10) and info["gpu_mb"] and info["gpu_mb"] > 0
    assert engine.describe()["gpu_memory_mb"]["peak"] >= info["gpu_mb"]


@pytest.mark.cuda_ort
@pytest.mark.integration
@REAL_DATA
def test_bentoml_serve_on_cuda():
    import httpx

    from bench.images import real_test_pngs
    from bench.servers import free_port, server_output, start_server, stop_server, wait_ready

    cuda_session(SHIPPED / "model.onnx")
    port = free_port()
    proc = start_server(SHIPPED, port, {"NIN_REQUIRE_GPU": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        assert httpx.get(f"{url}/model", timeout=10).json()["provider"] == "CUDAExecutionProvider"
        pngs, labels = real_test_pngs(8)
        for png, y in zip(pngs, labels):
            r = httpx.post(f"{url}/classify", files={"image": ("x.png", png, "image/png")}, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"]["provider"] == "CUDAExecutionProvider" and body["memory"]["gpu_mb"] > 0
        assert "serving" in server_output(proc, 20000) and "CUDAExecutionProvider" in server_output(proc, 20000)
    finally:
        stop_server(proc)

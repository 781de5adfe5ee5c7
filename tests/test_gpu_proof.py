"""`make gpu-proof DRY=1`: the GPU proof's every stage that can run without CUDA, on the CPU with
a tiny step budget, so the prepared command cannot rot while no GPU is available."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import make_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_gpu_proof_dry_run_writes_what_comes_back(tmp_path, monkeypatch):
    monkeypatch.setenv("NIN_CACHE_DIR", str(tmp_path / "cache"))
    data = make_fashion_mnist(tmp_path / "data", n_train=64, n_test=32)
    out = tmp_path / "out"
    r = subprocess.run(["make", "--no-print-directory", "gpu-proof", "DRY=1", f"OUT={out}", f"DATA={data}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir()), files
    assert {"summary.json", "proof.log", "profile.txt", "strong-best.pt", "strong-metrics.csv", "d2l-metrics.csv"} <= set(files)
    s = json.loads((out / "summary.json").read_text())
    assert s["dry_run"] and s["rc"] == 0 and s["env"]["torch"] == torch.__version__ and s["failed_steps"] == []
    assert all(st["rc"] == 0 for st in s["stages"].values()), s["stages"]
    assert s["strong"]["epochs"] == 1 and s["strong"]["device"] == "cpu" and s["strong"]["batch_size"] == 8
    assert s["strong"]["predicted_training_mb_fp32"]["total"] > 0 and s["stats_batch"]["measured_training_step_mb"] > 0
    assert s["profile"]["steps"] == 2 and s["profile"]["img_per_s"] > 0
    assert s["d2l"]["rc"] == 0
    ckpt = torch.load(out / "strong-best.pt", weights_only=True)
    assert "optimizer" not in ckpt and ckpt["model_config"]["batch_norm"] is True and ckpt["metrics"]
    assert "environment:" in (out / "proof.log").read_text()


def test_gpu_proof_refuses_a_missing_data_folder(tmp_path):
    r = subprocess.run(["make", "--no-print-directory", "gpu-proof", "DRY=1", f"OUT={tmp_path}", "DATA=/no/such/folder"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "error: --data-dir /no/such/folder is not a folder" in r.stderr


def test_gpu_env_check_without_python_3_12_says_so_in_one_line(tmp_path):
    """`make gpu-env-check` builds a Python 3.12 venv of the GPU machine's versions (4 GB, never in
    the suite); where no Python 3.12 runs, it stops at once with one line and builds nothing."""
    bin_dir = tmp_path / "bin"  # a PATH with bash and coreutils but no python3.12 and no pyenv
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "cat", "rm", "mktemp"):
        (bin_dir / tool).symlink_to(subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip())
    r = subprocess.run(["bash", "scripts/gpu_env_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={"PATH": str(bin_dir), "PY312": str(tmp_path / "no-python")})
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip().splitlines() == ["error: no Python 3.12 found; the GPU machine runs Python 3.12 "
                                             "(set PY312=/path/to/python3.12)"]


@pytest.mark.real_data
def test_gpu_serve_proof_dry_run_on_the_cpu_provider(tmp_path):
    """Stage 4's measurements (agreement with the CPU provider, plain / IO-binding / uint8-input
    runs, batches in flight, bentoml serve with several workers) on the CPU provider with tiny
    sizes: the GPU run's code paths."""
    import sys

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "scripts/gpu_serve_proof.py", "--out", str(out), "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["active_providers"][0] == "CPUExecutionProvider" and s["rc"] == 0 and s["failed_steps"] == []
    fp32 = s["agreement"]["variants"]["fp32"]
    assert s["agreement"]["images"] == 64 and fp32["argmax_agreement_with_cpu_fp32"] == 1.0
    row = s["in_process"]["fp32"]["by_batch"]["2"]
    assert {"plain", "iobinding_on_device", "uint8_input"} <= set(row) and all(v["img_s"] > 0 for v in row.values())
    assert set(s["in_flight"]["img_s"]) == {"1 thread", "2 threads, 1 session", "4 threads, 1 session", "2 threads, 2 sessions"}
    # the serving plan (1, 4, 16 workers there) as one start of 2 workers here, through bentoml serve
    assert set(s["serve_by_workers"]) == {"2"}
    run = s["serve_by_workers"]["2"]
    assert run["rc"] == 0, run
    levels = run["levels"]["service-int8"]
    assert set(levels) == {"1", "16"} and all(r["throughput_img_s"] > 0 for r in levels.values())
    assert json.loads((out / "bench-workers-2.json").read_text())["runs"]
    assert set(run["levels"]) == {"service-int8", "reference-int8"}  # the hand-written one beside it
    assert s["skipped_steps"] == [] and len(list(out.iterdir())) <= 8


def test_uint8_input_graph_gives_the_same_logits(tmp_path):
    """The uint8-input variant measured on the GPU normalizes inside the graph exactly as the
    server does outside it."""
    import importlib.util

    import numpy as np
    import onnxruntime as ort

    from serving import imaging

    spec = importlib.util.spec_from_file_location("gsp", ROOT / "scripts" / "gpu_serve_proof.py")
    gsp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gsp)
    card = json.loads((gsp.SHIPPED / "card.json").read_text())
    contract = card["input_contract"]
    x_u8 = np.random.default_rng(0).integers(0, 256, (3, 1, 224, 224), dtype=np.uint8)
    plain = ort.InferenceSession(str(gsp.SHIPPED / "model.onnx"), providers=["CPUExecutionProvider"])
    u8 = ort.InferenceSession(gsp.uint8_input_model(gsp.SHIPPED / "model.onnx", contract).SerializeToString(),
                              providers=["CPUExecutionProvider"])
    from PIL import Image

    x = imaging.normalize([Image.fromarray(a[0]) for a in x_u8], contract)
    np.testing.assert_allclose(u8.run(None, {"image": x_u8})[0], plain.run(None, {"image": x})[0], rtol=1e-4, atol=1e-4)


def test_a_step_past_its_limit_is_stopped_and_recorded_not_raised(tmp_path):
    """Proof.run stops a step at its time limit (SIGTERM) and records it; the proof goes on.
    The profile and stats steps once ran under subprocess.run(timeout=...), whose
    TimeoutExpired would have ended the whole GPU run."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("gpu_proof", ROOT / "scripts" / "gpu_proof.py")
    gpu_proof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_proof)
    p = gpu_proof.Proof(tmp_path, budget_s=60, dry_run=True)
    code = "import sys, time; print('partial', flush=True); print('to the log', file=sys.stderr, flush=True); time.sleep(60)"
    ticks = []
    r = p.run("slow", [sys.executable, "-c", code], timeout=2, output=tmp_path / "slow.txt", every_5s=lambda: ticks.append(1))
    assert ticks == [1]  # what it copies into OUT while a step runs ran, at the limit too
    assert r["timed_out"] and r["rc"] != 0 and r["seconds"] < 30 and p.summary["stages"]["slow"] == r
    assert (tmp_path / "slow.txt").read_text() == "partial\n" and "to the log" in (tmp_path / "proof.log").read_text()


def test_gpu_serve_proof_names_the_step_that_failed(tmp_path, monkeypatch):
    """A step that raises: the exit status is 1 and summary.json (written anyway) names it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gsp_fail", ROOT / "scripts" / "gpu_serve_proof.py")
    gsp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gsp)

    def broken(*args, **kwargs):
        raise RuntimeError("cuDNN said no")

    monkeypatch.setattr(gsp, "agreement", broken)
    assert gsp.main(["--out", str(tmp_path), "--dry-run", "--part", "cuda"]) == 1
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["rc"] == 1 and s["failed_steps"] == ["agreement with the CPU provider: RuntimeError: cuDNN said no"]
    assert "FAILED at agreement with the CPU provider" in (tmp_path / "serve-proof.log").read_text()


def test_gpu_serve_proof_skips_and_names_what_its_budget_leaves_out(tmp_path):
    """With no time left every step is skipped, named, and nothing runs past the budget."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gsp_budget", ROOT / "scripts" / "gpu_serve_proof.py")
    gsp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gsp)
    assert gsp.main(["--out", str(tmp_path), "--dry-run", "--part", "serve", "--budget-s", "1"]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert [x.split(":")[0] for x in s["skipped_steps"]] == ["bentoml serve with 2 workers"]  # SERVE_PLAN_DRY
    assert s["serve_by_workers"] == {}

"""scripts/gpu_home.py: what the device calls return, put in place (bench/<gpu>/, docs/gpu.md's
results, the checkpoint out of the tree, and the shipped model only when the GPU's is better)."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_home", ROOT / "scripts" / "gpu_home.py")
gpu_home = sys.modules["gpu_home"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_home)


def returned(tmp: Path, fp32_acc: float) -> list[Path]:
    """Four folders as the device calls return them, with the figures a real run writes."""
    folders = []
    summaries = {
        1: {"env": {"gpu": "NVIDIA H200", "driver": "580.159.04", "torch": "2.11.0+cu130", "cuda": "13.0", "cudnn": 91900},
            "strong": {"best_test_acc": 0.9312, "best_epoch": "9", "epochs": 9, "epoch_seconds": [7.5, 6.1],
                       "img_per_s": [8000.0, 9800.0]}, "failed_steps": []},
        2: {"failed_steps": []},
        3: {"gpu": "NVIDIA H200", "onnxruntime": "1.31.1", "failed_steps": [], "skipped_steps": ["cuDNN algorithm search: 5 s left, ~20 s needed"],
            "agreement": {"variants": {"fp32": {"argmax_agreement_with_cpu_fp32": 0.9999}, "fp16": {"argmax_agreement_with_cpu_fp32": 0.9991}}},
            "in_process": {"fp16": {"by_batch": {"1": {"plain": {"ms": 0.41}, "iobinding_on_device": {"ms": 0.22}}},
                                    "best_img_s_plain": 31000.0, "best_batch_plain": 256}}},
        4: {"failed_steps": ["bentoml serve with 16 workers"],
            "serve_by_workers": {"4": {"levels": {"service-fp16": {"1": {"p50": 1.9}, "256": {"throughput_img_s": 5400.0, "gpu_mb": 610}}}}}},
    }
    for n, summary in summaries.items():
        f = tmp / f"files-{n}"
        f.mkdir()
        (f / "call.json").write_text(json.dumps({"call": n, "failed_steps": []}))
        (f / "summary.json").write_text(json.dumps(summary))
        folders.append(f)
    (tmp / "files-1" / "strong-best.pt").write_bytes(b"weights")
    (tmp / "files-2" / "d2l-metrics.csv").write_text("epoch,test_acc\n1,0.1\n2,0.62\n")
    (tmp / "files-3" / "gpu-card.json").write_text(json.dumps({"variants": {
        "fp32": {"accuracy": fp32_acc}, "int8": {"accuracy": fp32_acc - 0.0004},
        "fp16": {"accuracy": fp32_acc, "accuracy_by_provider": {"CUDAExecutionProvider": fp32_acc}}}}))
    return folders


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "docs").mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "gpu.md", r / "docs" / "gpu.md")
    shutil.copy(ROOT / "README.md", r / "README.md")
    (r / "models" / "nin-fashion-mnist").mkdir(parents=True)
    shutil.copy(ROOT / "models" / "nin-fashion-mnist" / "card.json", r / "models" / "nin-fashion-mnist" / "card.json")
    return r


def test_results_land_in_bench_and_docs_and_the_checkpoint_stays_out(tmp_path, root, monkeypatch):
    exports = []
    monkeypatch.setattr(gpu_home.subprocess, "run", lambda *a, **k: exports.append(a))
    assert gpu_home.bring_home(returned(tmp_path, 0.9100), root) == 0
    assert exports == []  # 0.9100 does not beat the shipped model: it stays
    assert (root / "bench" / "nvidia-h200" / "call-3" / "gpu-card.json").is_file()
    assert not list((root / "bench").rglob("*.pt"))
    assert (root / ".gpu" / "home" / "nvidia-h200" / "strong-best.pt").read_bytes() == b"weights"
    docs = (root / "docs" / "gpu.md").read_text()
    block = docs[docs.index(gpu_home.START) : docs.index(gpu_home.END)]
    assert "Measured on one NVIDIA H200 (driver 580.159.04" in block and "onnxruntime-gpu 1.31.1" in block
    assert "| 0.9312 (9); 9; 7.5; 9800 |" in block and "0.100, 0.620" in block
    assert "0.41 / 0.22; 31000.0 (256)" in block and "5400.0; 1.9; 610" in block
    assert "call 4: bentoml serve with 16 workers" in block and "cuDNN algorithm search: 5 s left" in block
    assert docs.count(gpu_home.START) == 1 and (root / "README.md").read_text() == (ROOT / "README.md").read_text()


def test_a_better_gpu_model_is_exported_here_and_readme_follows_its_card(tmp_path, root, monkeypatch):
    shipped = json.loads((root / "models" / "nin-fashion-mnist" / "card.json").read_text())["test_accuracy"]

    def fake_export(cmd, cwd):  # what `python -m export` leaves: a new card
        assert cmd[1:3] == ["-m", "export"] and cmd[3].endswith("nvidia-h200/strong-best.pt")
        card = {"test_accuracy": 0.9335, "variants": {"fp32": {"accuracy": 0.9335}, "int8": {"accuracy": 0.9331},
                                                       "fp16": {"accuracy": 0.9334}}}
        (Path(cwd) / "models" / "nin-fashion-mnist" / "card.json").write_text(json.dumps(card))
        return type("R", (), {"returncode": 0})()

    monkeypatch.setattr(gpu_home.subprocess, "run", fake_export)
    assert gpu_home.bring_home(returned(tmp_path, shipped + 0.005), root) == 0
    readme = (root / "README.md").read_text()
    assert "| fp32 `model.onnx` | 0.9335 |" in readme and "| int8 `model.int8.onnx` | 0.9331 | CPU |" in readme
    assert "Trained on one NVIDIA H200" in readme and readme.count("| variant | test accuracy |") == 1
    assert "## Two commands" in readme  # nothing after the table was lost


def test_a_folder_that_no_call_returned_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no call.json"):
        gpu_home.bring_home([tmp_path], tmp_path)
    assert gpu_home.main([str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err

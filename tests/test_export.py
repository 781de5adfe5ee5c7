import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import export.exporter as exporter
from export.__main__ import main as export_main
from export.card import metadata_from_card
from export.checks import CheckFailed, accuracy_gate, parity
from serving.model_files import sha256 as sha256_file
from export.variants import cpu_session
from tests.conftest import export_random_model
from training.checkpoint import save_checkpoint
from training.config import NiNConfig
from training.model import NiN, init_weights

OPTS = dict(register=False, calibration_images=32, timing=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt_extra = {"epoch": 1, "metrics": [{"epoch": 1, "epoch_seconds": 12.5}], "args": {"preset": "strong"}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIN_CACHE_DIR", str(root / "cache"))
        yield export_random_model(root, n_test=48, ckpt_extra=ckpt_extra)


def test_export_passes_every_check_and_writes_the_card(env):
    out, card = env["out"], env["card"]
    assert sorted(p.name for p in out.iterdir()) == [
        "card.json", "card.md", "confusion.png", "model.fp16.onnx", "model.int8.onnx", "model.onnx", "report.txt"]
    assert json.loads((out / "card.json").read_text()) == json.loads(json.dumps(card))
    par = card["checks"]["parity"]
    assert par["images"] == 48 and par["disagreements_outside_near_ties"] == 0 and par["max_abs_diff"] < 1e-3
    assert card["test_images"] == 48 and set(card["per_class_accuracy"]) == set(card["class_names"])
    assert card["input_contract"]["interpolation"] == "bilinear" and card["input_contract"]["image_size"] == 224
    for name, f in card["files"].items():
        assert sha256_file(out / name) == f["sha256"]
    assert card["checkpoint_sha256"] == sha256_file(env["ckpt"])
    assert card["training"]["wall_time_s"] == 12.5
    report = (out / "report.txt").read_text()
    assert "onnx.checker full check: ok" in report and "parity on 48 real test images" in report
    assert not list(env["root"].glob(".out.tmp-*"))  # no temporary folder left
    page = (out / "card.md").read_text()  # the card for people says the same
    assert f"**Test accuracy {card['test_accuracy']:.4f}** on all 48 test images" in page
    assert all(f["sha256"] in page for f in card["files"].values())
    assert "| 1 | 1 |" in page and page.count("| 0.2 |") == 1  # the checkpoint's one epoch of 12.5 s


def test_metadata_round_trips(env):
    card = env["card"]
    for name in ("model.onnx", "model.int8.onnx", "model.fp16.onnx"):
        meta = {p.key: json.loads(p.value) for p in onnx.load(str(env["out"] / name)).metadata_props}
        expected = metadata_from_card(card)
        assert set(meta) == set(expected)
        assert meta["class_names"] == expected["class_names"] == list(NiNConfig().class_names)
        assert meta["input_contract"] == expected["input_contract"]
        assert meta["model_config"] == expected["model_config"]
        assert meta["metrics"] == json.loads(json.dumps(expected["metrics"]))
        assert meta["provenance"]["checkpoint_sha256"] == card["checkpoint_sha256"]
    # onnxruntime sees the same metadata the server will read
    session = cpu_session(env["out"] / "model.onnx")
    assert json.loads(session.get_modelmeta().custom_metadata_map["class_names"]) == card["class_names"]


def test_every_batch_size_from_1_to_64_runs(env):
    session = cpu_session(env["out"] / "model.onnx")
    x = np.random.default_rng(0).standard_normal((64, 1, 224, 224), dtype=np.float32)
    full = session.run(None, {"image": x})[0]
    for b in range(1, 65):
        out = session.run(None, {"image": x[:b]})[0]
        assert out.shape == (b, 10)
        np.testing.assert_allclose(out, full[:b], rtol=1e-4, atol=1e-5)


def test_int8_model_loads_and_agrees_mostly(env):
    s8, s32 = cpu_session(env["out"] / "model.int8.onnx"), cpu_session(env["out"] / "model.onnx")
    x = np.random.default_rng(1).standard_normal((4, 1, 224, 224), dtype=np.float32)
    a, b = s32.run(None, {"image": x})[0], s8.run(None, {"image": x})[0]
    assert a.shape == b.shape and np.isfinite(b).all()
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(env["out"] / "model.int8.onnx")).graph.node)


def test_int8_weights_use_7_bits_against_avx2_saturation(env):
    """Full-range int8 weights saturate VPMADDUBSW on CPUs without VNNI (a 7-point accuracy
    loss on the shipped model); the recipe keeps every conv weight in [-64, 64]."""
    model = onnx.load(str(env["out"] / "model.int8.onnx"))
    int8 = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    weights = [w for w in int8 if w.ndim == 4]  # conv weights (the rest are zero points)
    assert len(weights) == 12  # 4 blocks x (k x k conv + two 1x1 convs)
    assert all(int(np.abs(w).max()) == 64 for w in weights)  # 7 bits, and all of them used


def test_altered_onnx_fails_parity_and_leaves_nothing(env, monkeypatch, capsys):
    real_export = exporter.export_onnx

    def export_then_tamper(model, path, *a, **k):
        real_export(model, path, *a, **k)
        m = onnx.load(str(path))
        # the classifier's last bias: a weight every image's logits depend on
        init = next(t for t in m.graph.initializer if t.name == "net.7.6.bias")
        w = numpy_helper.to_array(init).copy()
        w.flat[0] += 1.0  # one weight perturbed
        init.CopyFrom(numpy_helper.from_array(w, init.name))
        onnx.save(m, str(path))

    monkeypatch.setattr(exporter, "export_onnx", export_then_tamper)
    dest = env["root"] / "tampered"
    with pytest.raises(CheckFailed, match="parity"):
        exporter.export_checkpoint(env["ckpt"], dest, exporter.ExportOptions(data_dir=str(env["data"]), int8=False, fp16=False, **OPTS))
    assert not dest.exists() and not list(env["root"].glob(".tampered*"))
    rc = export_main([str(env["ckpt"]), "--out", str(dest), "--data-dir", str(env["data"]), "--no-int8", "--no-fp16",
                      "--no-register", "--no-timing"])
    err = capsys.readouterr().err
    assert rc == 1 and "check failed, nothing written" in err and err.count("\n") == 1
    assert not dest.exists()


def test_a_variant_below_the_gate_is_not_written(env, monkeypatch):
    def bad_int8(fp32_path, out_path, calibration):
        m = onnx.load(str(fp32_path))
        for init in m.graph.initializer:  # a "quantized" model that lost all its weights
            if init.data_type == onnx.TensorProto.FLOAT:
                init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
        onnx.save(m, str(out_path))

    monkeypatch.setattr(exporter, "quantize_int8", bad_int8)
    # a model that really classifies the synthetic bars, so that a zeroed copy is clearly worse
    cfg = NiNConfig(batch_norm=True, width=0.25, dropout=0.0)
    torch.manual_seed(0)
    model = NiN(cfg)
    init_weights(model, "kaiming")
    from training.data import find_data_root, load_split, to_model_input

    x_u8, y = load_split(find_data_root(env["data"], allow_download=False), train=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(to_model_input(x_u8, cfg)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = env["root"] / "trained.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": cfg.to_dict()}, ckpt)
    card = exporter.export_checkpoint(ckpt, env["root"] / "gated", exporter.ExportOptions(data_dir=str(env["data"]), fp16=False, **OPTS))
    assert card["test_accuracy"] > 0.2
    assert card["variants"]["int8"]["passed"] is False and "pp allowed" in card["variants"]["int8"]["gate"]
    assert not (env["root"] / "gated" / "model.int8.onnx").exists()
    assert "model.int8.onnx" not in card["files"]


def test_accuracy_gate_edges():
    assert accuracy_gate(0.9000, 0.8970)[0]  # exactly 0.3 pp
    ok, why = accuracy_gate(0.9000, 0.8969)
    assert not ok and "0.31 pp > 0.3 pp" in why
    assert accuracy_gate(0.90, 0.95)[0]


def test_parity_tolerates_near_ties_only():
    labels = np.array([0, 1])
    ref = np.array([[1.0, 1.0000001], [0.0, 5.0]], np.float32)
    tie_flip = np.array([[1.0000001, 1.0], [0.0, 5.0]], np.float32)
    assert parity(ref, tie_flip, labels)["disagreements_outside_near_ties"] == 0
    real_flip = np.array([[1.0, 1.0000001], [5.0, 0.0]], np.float32)
    assert parity(ref, real_flip, labels)["disagreements_outside_near_ties"] == 1


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert export_main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o"), "--no-register"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: checkpoint not found: {tmp_path / 'nope.pt'}\n"


def test_weights_that_do_not_fit_their_config_are_one_line(tmp_path, capsys):
    """Was torch's paragraph-long load_state_dict RuntimeError and a traceback."""
    import torch

    from training.config import NiNConfig
    from training.model import NiN

    config = NiNConfig(image_size=72)
    state = NiN(config).state_dict()
    state.pop("net.0.0.bias")
    torch.save({"model": state, "model_config": config.to_dict()}, tmp_path / "bad.pt")
    assert export_main([str(tmp_path / "bad.pt"), "--out", str(tmp_path / "o"), "--no-register"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the weights in the checkpoint do not fit") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_import_to_store_is_idempotent_and_checks_every_file(env, tmp_path):
    """The exported folder goes into BentoML's store as name:<its card's sha256>; a second import
    keeps it; a stored copy altered since is refused in one line (a process of its own: BentoML
    reads BENTOML_HOME when its store is first used)."""
    import os
    import subprocess
    import sys

    home = tmp_path / "bentoml"

    def run():
        return subprocess.run([sys.executable, "-m", "serving.model_files", str(env["out"])], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "BENTOML_HOME": str(home)})

    first, second = run(), run()
    assert first.returncode == second.returncode == 0 and first.stdout == second.stdout, first.stderr
    name, version = first.stdout.strip().split(":")
    stored = home / "models" / name / version
    assert sha256_file(stored / "model.onnx") == env["card"]["files"]["model.onnx"]["sha256"]
    assert "fashion-mnist" in (stored / "model.yaml").read_text()
    with open(stored / "model.int8.onnx", "ab") as f:
        f.write(b"x")
    third = run()
    assert third.returncode == 1 and third.stderr.count("\n") == 1 and "does not match its card" in third.stderr, third.stderr

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import stats
from training.config import NiNConfig
from training.model import NiN
from training.resources import report, window_rule


def test_window_rule_shows_the_floor_and_unvisited_edge():
    out, formula, unvisited = window_rule(224, 11, 4, 0)
    assert out == 54 and unvisited == 1
    assert formula == "(224 + 2*0 - 11)/4 + 1 = 54.25 -> 54"
    assert window_rule(26, 5, 1, 2) == (26, "(26 + 2*2 - 5)/1 + 1 = 26", 0)
    with pytest.raises(ValueError):
        window_rule(2, 3, 2, 0)


def test_default_report_matches_the_textbook():
    rep = report(NiNConfig())
    assert rep["total_params"] == 1_992_166
    assert rep["total_macs"] == 762_297_352
    shapes = [tuple(r["output_shape"]) for r in rep["layers"] if r["layer"] in ("MaxPool2d", "Flatten")]
    assert shapes == [(96, 26, 26), (256, 12, 12), (384, 5, 5), (10,)]
    # Each max-pool leaves its last row/column unvisited, and so does the first convolution.
    assert [r["name"] for r in rep["layers"] if r["unvisited"]] == ["net.0.0", "net.1", "net.3", "net.5"]


@pytest.mark.parametrize("cfg", [NiNConfig(), NiNConfig(batch_norm=True, num_1x1=1, width=0.5)])
@pytest.mark.parametrize("batch", [1, 3])
def test_predicted_costs_match_torch(cfg, batch):
    rep = report(cfg, batch)
    model = NiN(cfg)
    assert rep["total_params"] == sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 1, 224, 224)
    total, per_module = stats.measured_macs(model.eval(), x)
    assert total == rep["total_macs"]
    for r in rep["layers"]:
        if r["macs"]:
            assert per_module[f"NiN.{r['name']}"] == r["macs"], r["name"]
    saved = stats.measured_saved_bytes(NiN(cfg), x)
    predicted = rep["memory"]["training"]["saved_activations"]
    assert abs(saved - predicted) / predicted < 0.01


def test_memory_estimate_components():
    rep = report(NiNConfig(), batch_size=2, optimizer="adamw")
    t, p = rep["memory"]["training"], rep["memory"]["prediction"]
    w = 1_992_166 * 4
    assert t["weights"] == t["gradients"] == w and t["optimizer_state"] == 2 * w
    # the largest pair: conv1's output and the first 1x1 conv's output, 96x54x54 each
    assert p["largest_activation_pair"] == 2 * 2 * 96 * 54 * 54 * 4


def test_stats_cli_json():
    # a fresh process, as a user runs it: RSS growth is only meaningful in a process whose
    # allocator has not already got freed memory to hand out again
    r = subprocess.run([sys.executable, "-m", "training.stats", "--json", "--batch-size", "2", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    for key in ("layers", "total_params", "total_macs", "memory", "measured"):
        assert key in rep
    row = rep["layers"][0]
    for key in ("name", "output_shape", "params", "macs", "activation_bytes"):
        assert key in row
    assert rep["measured"]["total_macs"] == rep["total_macs"] == 2 * 762_297_352
    assert rep["measured"]["training_step_bytes"] > rep["measured"]["prediction_bytes"] > 0


def test_stats_cli_table_and_bad_argument(capsys):
    assert stats.main(["--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "54.25 -> 54" in out and "1,992,166" in out
    assert stats.main(["--batch-size", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err

"""The textbook-exercise grid (training/experiments/): its pure parts, the floor demonstration,
and the whole pipeline on a tiny synthetic set (a handful of steps per arm; the real budgets
never run in the suite)."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from training.config import NiNConfig
from training.experiments import floor
from training.experiments.cli import main as experiments_main
from training.experiments.data import balanced_subset, synthetic
from training.experiments.grid import BUDGETS, series, series_index, structural_arms, sweep_arms, sweep_lrs
from training.experiments.report import WALL_COLUMNS, separated, summed, with_range
from training.model import NiN
from training.resources import report as resource_report


def test_lr_series_and_sweep_around_a_suggestion():
    assert [series(i) for i in range(-4, 2)] == [0.01, 0.03, 0.1, 0.3, 1, 3]
    assert series(series_index(0.117)) == 0.1 and series(series_index(0.75)) == 1
    assert sweep_lrs(0.117) == [0.01, 0.03, 0.1, 0.3]  # two below, the nearest, one above
    assert sweep_lrs(3e-4) == [3e-5, 1e-4, 3e-4, 1e-3, 0.1]  # the textbook's 0.1 added where missed
    arms = sweep_arms(BUDGETS["cpu"], {"d2l": 0.75, "strong": 0.117})
    assert {(a.preset, a.lr) for a in arms} >= {("d2l", 0.1), ("d2l", 3), ("strong", 0.01), ("strong", 0.3)}
    assert all(a.epochs == BUDGETS["cpu"].sweep_epochs for a in arms)


def test_structural_arms_differ_only_in_what_they_ask_about():
    arms = structural_arms(BUDGETS["gpu"])
    assert [a.num_1x1 for a in arms if a.question == "1x1"] == [0, 1, 2, 3]
    head = [a for a in arms if a.question == "head"]
    assert len(head) == 1 and head[0].head_width > 0 and head[0].num_1x1 == 2
    assert len({(a.preset, a.lr, a.epochs) for a in arms}) == 1
    assert BUDGETS["gpu"].image_size == 224 and BUDGETS["gpu"].epochs == 10 and BUDGETS["gpu"].train_images is None
    # the CPU budget repeats each structural arm per training seed; seed 0 keeps the plain name
    cpu = structural_arms(BUDGETS["cpu"])
    assert len(cpu) == 5 * len(BUDGETS["cpu"].seeds) == 15 and len({a.name for a in cpu}) == 15
    assert {a.seed for a in cpu} == {0, 1, 2} and {a.name for a in cpu if a.seed == 0} == {a.name for a in arms}
    assert {a.name for a in cpu if a.seed == 2} == {"1x1-0-s2", "1x1-1-s2", "1x1-2-s2", "1x1-3-s2", "head-two-step-s2"}


def test_seed_summaries():
    assert with_range([0.8]) == "0.8000" and with_range([0.8, 0.7, 0.9]) == "0.8000 (0.7000-0.9000)"
    assert separated([0.80, 0.81], [0.78, 0.79]) and separated([0.5], [0.6])
    assert not separated([0.80, 0.82], [0.81, 0.79])
    assert summed([[[1, 2], [3, 4]], [[10, 0], [0, 10]]]) == [[11, 2], [3, 14]]


def test_two_step_head_model_and_its_predicted_cost():
    cfg = NiNConfig(head_width=96)
    model = NiN(cfg)
    assert model(torch.zeros(2, 1, 224, 224)).shape == (2, 10)
    assert resource_report(cfg)["total_params"] == sum(p.numel() for p in model.parameters())
    assert set(NiN(NiNConfig()).state_dict()) == set(NiN(NiNConfig.from_dict(NiNConfig().to_dict())).state_dict())
    with pytest.raises(ValueError, match="head_width"):
        NiNConfig(head_width=-1)


def test_balanced_subset_is_seeded_and_balanced():
    labels = torch.arange(1000) % 10
    a, b = balanced_subset(labels, 200, seed=3), balanced_subset(labels, 200, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, balanced_subset(labels, 200, seed=4))
    assert torch.bincount(labels[a], minlength=10).tolist() == [20] * 10
    with pytest.raises(ValueError):
        balanced_subset(labels, 205, seed=0)
    x, y = synthetic(30, 0)
    assert x.shape == (30, 28, 28) and x.dtype == torch.uint8 and torch.bincount(y).tolist() == [3] * 10


def test_floor_drops_the_last_rows_never_random_ones():
    """(224 - 11)/4 + 1 = 54.25: conv1 never reads row/column 223, measured on a real layer; the
    same answer every time; and what it measures agrees with the formula for NiN's layers."""
    conv = floor.conv_probe(11, 4, 0)
    cov = floor.measured_coverage(conv, 224)
    assert torch.equal(cov, floor.measured_coverage(conv, 224))  # deterministic
    rows = cov.sum(dim=1)
    assert rows[223] == 0 and (rows[:223] > 0).all()
    assert cov[:, 223].sum() == 0
    for size, (k, s, p) in [(224, (11, 4, 0)), (54, (3, 2, 0)), (26, (5, 1, 2)), (12, (3, 1, 1)), (12, (3, 2, 0))]:
        layer = floor.conv_probe(k, s, p) if p or k != 3 or s == 1 else torch.nn.MaxPool2d(k, s)
        expected = torch.zeros(size, dtype=torch.long)
        for lo, hi in floor.rows_read(size, k, s, p):
            expected[lo:hi + 1] += 1
        assert torch.equal(floor.measured_coverage(layer, size).sum(dim=1) > 0, expected > 0), (size, k, s, p)
    # padding: output row 0 of a 5x5/p2 conv reads input rows 0..2, the last reads 23..25
    assert floor.rows_read(26, 5, 1, 2)[0] == (0, 2) and floor.rows_read(26, 5, 1, 2)[-1] == (23, 25)
    table = {r["layer"]: r for r in floor.nin_first_layers(224)}
    assert table["conv 11x11 s4"]["unread"] == "row 223" and table["conv 5x5 p2"]["unread"] == "none"


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("exercises")
    rc = experiments_main(["--budget", "smoke", "--synthetic", "--in-process", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    return out


@pytest.mark.slow  # the smoke grid trains and exports
def test_the_grid_writes_its_report(smoke_report):
    out = smoke_report
    text = (out / "README.md").read_text()
    for heading in ("## Budget `smoke`", "### 1x1 convolutions per block", "### The head",
                    "### Learning rate", "## Floor rounding"):
        assert heading in text, heading
    assert text.count("**Answer") >= 4
    for png in ("floor.png", "smoke/one_by_one.png", "smoke/head_confusion.png", "smoke/lr_range.png", "smoke/lr_sweep.png"):
        assert (out / png).stat().st_size > 5000, png
    rows = list(csv.DictReader((out / "runs.csv").open()))
    arms = {r["arm"] for r in rows}
    assert {"1x1-0", "1x1-1", "1x1-2", "1x1-3", "head-two-step"} <= arms
    assert {"1x1-0-s1", "1x1-2-s1", "head-two-step-s1"} <= arms  # the smoke budget's second training seed
    assert {r["seed"] for r in rows if r["arm"].endswith("-s1")} == {"1"}
    assert "Over 2 training seeds each" in text and "Seed by seed:" in text
    assert any(a.startswith("lr-d2l-") for a in arms) and any(a.startswith("lr-strong-") for a in arms)
    assert all(r["budget"] == "smoke" and r["image_size"] == "72" for r in rows)
    one = [r for r in rows if r["arm"] == "1x1-1"]
    assert [r["epoch"] for r in one] == ["1", "2"] and int(one[0]["params"]) > 0 and int(one[0]["macs"]) > 0
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "img_per_s", "peak_mem_mb"):
        assert one[0][key] != "", key


@pytest.mark.slow  # the smoke grid trains and exports
def test_rerun_resumes_and_an_arm_reproduces_its_record(smoke_report, tmp_path):
    before = (smoke_report / "runs.csv").read_text()
    arm = json.loads((smoke_report / "smoke" / "arms" / "1x1-1.json").read_text())
    rc = experiments_main(["--budget", "smoke", "--synthetic", "--in-process", "--device", "cpu", "--out", str(smoke_report)])
    assert rc == 0 and (smoke_report / "runs.csv").read_text() == before  # nothing rerun
    # the same arm from scratch elsewhere: the same numbers, wall times aside
    (tmp_path / "smoke" / "arms").mkdir(parents=True)
    rc = experiments_main(["--budget", "smoke", "--synthetic", "--device", "cpu", "--out", str(tmp_path), "--arm", "1x1-1"])
    again = json.loads((tmp_path / "smoke" / "arms" / "1x1-1.json").read_text())
    assert rc == 0
    for key in ("wall_s", *WALL_COLUMNS):
        arm.pop(key, None), again.pop(key, None)
    assert again == arm
    other = json.loads((smoke_report / "smoke" / "arms" / "1x1-1-s1.json").read_text())
    assert other["seed"] == 1 and other["logits_init"] != arm["logits_init"]  # another seed, another start


@pytest.mark.slow  # the smoke grid trains and exports
def test_retime_remeasures_every_finished_arm(smoke_report):
    rc = experiments_main(["--budget", "smoke", "--retime", "--out", str(smoke_report)])
    assert rc == 0
    records = [json.loads(f.read_text()) for f in (smoke_report / "smoke" / "arms").glob("*.json")]
    trained = [r for r in records if "arm" in r and not r["diverged"]]
    assert all(r["ort_retimed"] and r["ort_cpu_ms_b1"] > 0 for r in trained)
    # one figure per architecture, timed in alternating rounds: every seed of an arm shares it
    by_arch = {}
    for r in trained:
        if r["arm"]["question"] != "lr":
            by_arch.setdefault((r["arm"]["num_1x1"], r["arm"]["head_width"]), set()).add(r["ort_cpu_ms_b1"])
    assert len(by_arch) == 5 and all(len(v) == 1 for v in by_arch.values())
    assert "re-timed one arm after another" in (smoke_report / "README.md").read_text()


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "training.experiments", "--budget", "cpu", "--data-dir",
                        str(tmp_path / "nope"), "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --data-dir") and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "training.experiments", "--budget", "huge"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.slow  # the smoke grid trains and exports
def test_onnxruntime_latency_of_an_arm_is_measured_on_its_own_export():
    from training.experiments.runner import ort_ms_per_image

    cfg = NiNConfig(image_size=72, num_1x1=1, head_width=16)
    ms = ort_ms_per_image(NiN(cfg), cfg, runs=5)
    assert isinstance(ms, float) and 0 < ms < 1000
    assert ort_ms_per_image(NiN(cfg), cfg, runs=0) is None


def test_the_protocol_section_reads_the_full_runs_and_names_a_collapse(tmp_path):
    """The textbook recipe's 10-epoch runs (outside the grid) in the report: a run that learned
    and then sat at ln 10 to its end is named as collapsed; one that came back is not."""
    from training.experiments.report import section_protocol

    head = "epoch,train_loss,train_acc,image_size,test_loss,test_acc,hardware,amp\n"
    runs = {"dead": [(2.25, 2.26, 0.19), (1.6, 1.5, 0.45), (1.9, 2.302585, 0.1), (2.302585, 2.302585, 0.1)],
            "back": [(2.25, 2.26, 0.19), (1.9, 2.302585, 0.1), (1.2, 0.9, 0.71)],
            "alive": [(2.25, 2.26, 0.19), (1.6, 1.5, 0.45)]}
    for name, rows in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text(head + "".join(
            f"{i + 1},{tr},0.5,224,{te},{acc},2-core CPU,bfloat16\n" for i, (tr, te, acc) in enumerate(rows)))
    text = "\n".join(section_protocol((tmp_path / "dead", tmp_path / "back", tmp_path / "alive", tmp_path / "never-ran")))
    assert "| 4 | 2.3026 / 2.3026 / 0.1000 |  |  |" in text and "| 3 | 1.9000 / 2.3026 / 0.1000 | 1.2000 / 0.9000 / 0.7100 |  |" in text
    assert "`dead` (4 of 10 epochs): epoch 1's mean train loss 2.2500 against ln 10 = 2.3026" in text
    assert "best 0.4500 at epoch 2, last 0.1000" in text
    assert "collapsed back to ln 10 in epoch 3 and stayed there" in text
    assert "best 0.7100 at epoch 3" in text and text.count("collapsed") == 1
    assert "(every image one class) in epochs 2." in text and "`alive` (2 of 10 epochs)" in text
    assert text.count("test loss never at ln 10") == 1  # `alive`; `back` sat there in epoch 2
    assert section_protocol((tmp_path / "never-ran",)) == []


def test_the_protocol_section_names_each_epochs_number_format():
    """A run resumed in another format (the d2l fork: bf16 for epochs 1-3, then fp32) says so;
    fp32 epochs are recorded with amp None."""
    from training.experiments.report import number_formats

    assert number_formats([{"amp": "bfloat16"}] * 2) == "bfloat16"
    assert number_formats([{"amp": "None"}, {"amp": ""}]) == "float32"
    assert number_formats([{"amp": "bfloat16"}] * 3 + [{"amp": "None"}] * 2) == "bfloat16 in epochs 1-3, float32 in 4-5"

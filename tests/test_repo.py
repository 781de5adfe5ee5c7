"""The repository itself: what travels to the GPU machine must fit its 64 MiB transfer."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tracked files at most 24 MB, so the Fashion-MNIST .gz files (30 MB) and some wheels travel
# beside the tree in one 64 MiB transfer (scripts/gpu_proof.py, issue 12).
MAX_TRACKED_BYTES = 24 * 10**6


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_tracked_tree_fits_the_gpu_transfer():
    files = [p for p in tracked_files() if p.is_file()]
    sizes = sorted(((p.stat().st_size, p.relative_to(ROOT)) for p in files), reverse=True)
    total = sum(s for s, _ in sizes)
    biggest = ", ".join(f"{p} {s / 1e6:.1f} MB" for s, p in sizes[:5])
    assert total <= MAX_TRACKED_BYTES, f"tracked files are {total / 1e6:.1f} MB (limit 24 MB); biggest: {biggest}"


def test_ruff_finds_nothing():
    """No undefined or unused names, no syntax errors, in the product, its tests and its scripts."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "serving", "training", "export", "bench",
                        "scripts", "tests"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


def test_no_training_checkpoint_is_tracked():
    """Checkpoints live in git history only (docs/training.md: `git show COMMIT:runs/NAME/last.pt`)."""
    pts = [str(p.relative_to(ROOT)) for p in tracked_files() if p.suffix == ".pt"]
    assert pts == [], f"checkpoints are tracked again: {pts}"


def test_layers_point_one_way():
    """training/ never imports serving/, and serving/ never imports training/, export/ or torch
    (the served package stays small). Only the exercise grid, which times exports, uses export/."""
    import ast

    def imported(package: str) -> set[str]:
        names = set()
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {f"{path.relative_to(ROOT)}: {a.name}" for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names.add(f"{path.relative_to(ROOT)}: {node.module}")
        return names

    def offending(package: str, *banned: str) -> list[str]:
        return sorted(n for n in imported(package) if n.split(": ")[1].split(".")[0] in banned)

    assert offending("training", "serving", "bench") == []
    assert offending("serving", "training", "export", "bench", "torch") == []


@pytest.mark.parametrize("marker, env, fails", [
    ("", {"CI": "true"}, True), ("@pytest.mark.gpu", {"CI": "true"}, False), ("", {"CI": ""}, False),
    ("@pytest.mark.gpu", {"CI": "", "NIN_EXPECT_GPU": "1"}, True),  # the GPU machine: no skip at all
    ("@pytest.mark.real_data", {"CI": "", "NIN_EXPECT_GPU": "1"}, True),
])
def test_under_ci_only_gpu_tests_may_skip_and_on_the_gpu_machine_none(tmp_path, marker, env, fails):
    """tests/ci_skips.py: a skip under CI=true fails the run unless the test is a GPU test; under
    NIN_EXPECT_GPU=1 any skip fails it."""
    import os

    (tmp_path / "test_one.py").write_text(f"import pytest\n\n{marker}\ndef test_x():\n    pytest.skip('wrk is not installed')\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.ci_skips", "-p", "no:cacheprovider",
                        "-p", "no:warnings", str(tmp_path / "test_one.py")], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env={**os.environ, "NIN_EXPECT_GPU": "", **env, "PYTHONPATH": str(ROOT)})
    assert (r.returncode != 0) == fails, r.stdout[-1000:]
    assert ("may skip" in r.stdout) == fails and "1 skipped" in r.stdout


def test_real_data_is_found_where_the_gpu_machine_carries_it(tmp_path, monkeypatch):
    """conftest.has_real_data follows training.data: $FASHION_MNIST_DIR (the carried .gpu/data)
    counts, so the real-data tests run there instead of skipping."""
    from tests.conftest import has_real_data, make_fashion_mnist
    from training import data

    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    assert not has_real_data()
    monkeypatch.setenv("FASHION_MNIST_DIR", str(make_fashion_mnist(tmp_path / "carried")))
    assert has_real_data()


def test_every_mutation_still_finds_its_line():
    """tests/mutations/run.py breaks lines it finds by their text: a refactor that rewords one must
    update the script, or the mutation check would stop before running (it is not run by CI)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mutations", ROOT / "tests/mutations/run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    for name, (path, before, after, tests) in run.MUTATIONS.items():
        assert (ROOT / path).read_text().count(before) == 1, (name, path)
        assert before != after and all((ROOT / t).is_file() for t in tests), name

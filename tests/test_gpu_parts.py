"""scripts/gpu_parts.py on small stand-ins: onnxruntime-gpu's wheel cut into parts, received one
part per call, checked, joined and installed, as on the GPU machine (no network needed)."""

import importlib.util
import json
import os
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_parts", ROOT / "scripts" / "gpu_parts.py")
gpu_parts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_parts)


def fake_ort_wheel(path: Path, lib: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("onnxruntime/__init__.py", "__version__ = 'fake'\n")
        z.writestr(gpu_parts.BIG_LIB, lib)
        z.writestr("onnxruntime_gpu-1.31.1.dist-info/METADATA", "Name: onnxruntime-gpu\n")
    return path


def tiny_wheel(folder: Path) -> Path:
    path = folder / "tiny_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("tiny_pkg/__init__.py", "VALUE = 42\n")
        z.writestr("tiny_pkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: tiny-pkg\nVersion: 0.1\n")
        z.writestr("tiny_pkg-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("tiny_pkg-0.1.dist-info/RECORD", "")
    return path


@pytest.fixture
def parts(tmp_path):
    lib = os.urandom(150_000) + bytes(150_000)  # compresses a little, like the real one
    wheel = fake_ort_wheel(tmp_path / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl", lib)
    work = tmp_path / "work"
    work.mkdir()
    rest, lib_xz, info = gpu_parts.split_ort_wheel(wheel, work)
    assert info["bytes"] == len(lib) and not (work / "libonnxruntime_providers_cuda.so").exists()
    extra = tiny_wheel(work)
    manifest = gpu_parts.pack([lib_xz, rest, extra], tmp_path / "parts", 40_000,
                              {"ort_wheel": wheel.name, "library": info, "wheels": [extra.name], "rest": rest.name,
                               "library_xz": lib_xz.name})
    return tmp_path, manifest, lib


def test_parts_fit_their_size_and_the_manifest_travels_in_each(parts):
    tmp, manifest, _ = parts
    folders = sorted((tmp / "parts").iterdir())
    assert len(folders) == manifest["parts"] >= 3
    for d in folders:
        assert sum(f.stat().st_size for f in d.iterdir() if f.name != "manifest.json") <= 40_000
        assert json.loads((d / "manifest.json").read_text()) == manifest


def test_receive_each_part_then_assemble_installs_the_library_and_wheels(parts, capsys):
    tmp, manifest, lib = parts
    store, site = tmp / "store", tmp / "site"
    folders = sorted((tmp / "parts").iterdir())
    assert gpu_parts.main(["receive", str(folders[0]), "--store", str(store)]) == 0
    assert "missing parts" in capsys.readouterr().out
    assert gpu_parts.main(["assemble", "--store", str(store), "--site", str(site)]) == 2  # not all there yet
    for d in folders[1:]:
        assert gpu_parts.main(["receive", str(d), "--store", str(store)]) == 0
    assert "complete" in capsys.readouterr().out
    assert gpu_parts.main(["assemble", "--store", str(store), "--site", str(site)]) == 0
    assert (site / gpu_parts.BIG_LIB).read_bytes() == lib
    assert (site / "onnxruntime" / "__init__.py").is_file() and (site / "tiny_pkg" / "__init__.py").is_file()


def test_a_damaged_part_is_named_not_used(parts, capsys):
    tmp, manifest, _ = parts
    first = sorted((tmp / "parts").iterdir())[0]
    chunk = next(f for f in first.iterdir() if f.name != "manifest.json")
    chunk.write_bytes(b"x" + chunk.read_bytes()[1:])
    assert gpu_parts.main(["receive", str(first), "--store", str(tmp / "store")]) == 2
    assert "damaged" in capsys.readouterr().err
    assert gpu_parts.main(["receive", str(tmp / "nowhere"), "--store", str(tmp / "store")]) == 2


def test_what_travels_is_what_the_served_package_imports():
    """bentoml serve died on import there: serving/http.py imports fastapi, and only bentoml with
    its dependencies travelled. Now serving/requirements.txt travels, pinned, less onnxruntime-gpu
    (carried apart) and numpy (the machine's own, torch's)."""
    specs = gpu_parts.served_packages()
    names = {s.split("==")[0].lower() for s in specs}
    assert {"bentoml", "fastapi", "pillow", "prometheus-client"} <= names
    assert not names & {"onnxruntime-gpu", "numpy"} and all("==" in s for s in specs)

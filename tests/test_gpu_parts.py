"""scripts/gpu_parts.py on small stand-ins: onnxruntime-gpu's CUDA library pruned to its sm_90
code, the wheel cut into parts, received one part per call, checked, joined and installed, as on
the GPU machine (no network needed)."""

import importlib.util
import json
import os
import struct
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_parts", ROOT / "scripts" / "gpu_parts.py")
gpu_parts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_parts)


def fatbin(entries: list[tuple[int, bytes]]) -> bytes:
    """A fat binary container: header, then per (arch, payload) an entry header and its payload."""
    body = b""
    for arch, payload in entries:
        header = gpu_parts.FATBIN_ENTRY.pack(2, 0x101, 64, len(payload), 0, 0, 0, 1, arch).ljust(64, b"\0")
        body += header + payload
    return struct.pack("<IHHQ", gpu_parts.FATBIN_MAGIC, 1, 16, len(body)) + body


def elf_with(sections: dict[str, bytes]) -> bytes:
    """An ELF64 file holding `sections` and a section-name table, nothing else."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    data, offsets = b"", {}
    for n, body in [*sections.items(), (".shstrtab", names)]:
        offsets[n] = (64 + len(data), len(body))
        data += body
    shoff = 64 + len(data)
    headers = bytes(64)  # the null section
    for n, (off, size) in offsets.items():
        headers += struct.pack("<IIQQQQIIQQ", names.index(n.encode() + b"\0"), 1, 0, 0, off, size, 0, 0, 1, 0)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    head = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(offsets) + 1, len(offsets))
    return head + data + headers


def test_prune_fatbin_keeps_the_sm90_entry_alone_where_it_was():
    a75, a90, a120, lone = b"7" * 40, b"9" * 56, b"C" * 24, b"L" * 32
    first, second = fatbin([(75, a75), (90, a90), (120, a120)]), fatbin([(120, lone)])
    elf = bytearray(elf_with({".text": b"T" * 100, ".nv_fatbin": first + second}))
    before = bytes(elf)
    stats = gpu_parts.prune_fatbin(elf)
    assert len(elf) == len(before) and stats["containers"] == 2 and stats["pruned"] == 1 and stats["kept_whole"] == 1
    off, size = gpu_parts.elf_section(elf, ".nv_fatbin")
    assert elf[:off] == before[:off]  # .text untouched
    got = bytes(elf[off : off + size])
    magic, _, header, fat = struct.unpack_from("<IHHQ", got, 0)
    assert magic == gpu_parts.FATBIN_MAGIC and fat == 64 + len(a90)  # only the sm_90 entry is left in it...
    assert got[16 : 16 + 64] == first[16 + 2 * 64 + len(a75) - 64 : 16 + 2 * 64 + len(a75)]  # ...its header, moved up
    assert got[16 + 64 : 16 + 64 + len(a90)] == a90
    assert got[16 + fat : len(first)] == bytes(len(first) - 16 - fat)  # the other GPUs' code is zeros
    assert got[len(first) :] == second  # a container without sm_90 code stays whole
    assert stats["kept_bytes"] == 64 + len(a90) and stats["dropped_bytes"] == len(first) - 16 - fat


def test_prune_fatbin_refuses_what_is_not_a_fat_binary():
    elf = bytearray(elf_with({".nv_fatbin": b"\x01" * 32}))
    try:
        gpu_parts.prune_fatbin(elf)
    except ValueError as e:
        assert "no fat binary" in str(e)
    else:
        raise AssertionError("a damaged .nv_fatbin was pruned")


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
    lib = elf_with({".text": os.urandom(150_000), ".nv_fatbin": fatbin([(80, os.urandom(60_000)), (90, os.urandom(90_000))])})
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
    pruned = bytearray(lib)
    gpu_parts.prune_fatbin(pruned)
    store, site = tmp / "store", tmp / "site"
    folders = sorted((tmp / "parts").iterdir())
    assert gpu_parts.main(["receive", str(folders[0]), "--store", str(store)]) == 0
    assert "missing parts" in capsys.readouterr().out
    assert gpu_parts.main(["assemble", "--store", str(store), "--site", str(site)]) == 2  # not all there yet
    for d in folders[1:]:
        assert gpu_parts.main(["receive", str(d), "--store", str(store)]) == 0
    assert "complete" in capsys.readouterr().out
    assert gpu_parts.main(["assemble", "--store", str(store), "--site", str(site)]) == 0
    assert (site / gpu_parts.BIG_LIB).read_bytes() == pruned != lib  # the library as pruned here, no other GPU's code
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

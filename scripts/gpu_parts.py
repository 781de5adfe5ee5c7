"""Carry onnxruntime-gpu and the served package's other requirements (bentoml, fastapi, ...) to the GPU machine in parts (stage 4).

The GPU machine has no package index and takes at most 64 MiB per call, the working tree
included; onnxruntime-gpu's wheel is almost all one library, `libonnxruntime_providers_cuda.so`
(sizes: docs/gpu.md). So:

  here:   python scripts/gpu_parts.py lock       (after a change to serving/requirements.txt)
          resolves onnxruntime-gpu and serving/requirements.txt for cp312 on manylinux x86-64 and
          writes scripts/gpu-wheels.lock: every wheel pinned with its sha256 (no numpy: the GPU
          machine's own serves, torch was built against it).
          python scripts/gpu_parts.py prepare --out .gpu/parts
          downloads exactly the locked wheels (pip --require-hashes), takes the CUDA provider
          library out of the onnxruntime-gpu wheel, keeps in it only the Hopper (sm_90) kernels
          (prune_fatbin), xz-compresses it, cuts
          everything into chunks and packs folders .gpu/parts/01, 02, ... of at most --part-mb MB
          each, each with the manifest. It prints the plan.
  there, one call per part, back to back (the machine stays warm ~30 s between calls):
          python3 scripts/gpu_parts.py receive .gpu/parts/NN        (carry: [".gpu/parts/NN"])
          copies the part into /tmp/nin-gpu-parts, checks every sha256, says what is missing.
  there, in the last call (or the one after it):
          python3 scripts/gpu_parts.py assemble --site /tmp/site
          joins the chunks, decompresses and checks the library, unpacks the onnxruntime-gpu
          wheel into /tmp/site with it, and pip-installs the other wheels there (--no-index
          --no-deps); then PYTHONPATH=/tmp/site python3 scripts/gpu_serve_proof.py --out $OUT.

The manifest records the sha256 of every file and chunk, and of the library before compression,
so a part that arrives damaged, twice or not at all is named, never silently used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import struct
import subprocess  # nosec B404  # pip and xz with fixed argument lists, never a shell
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORE = Path("/tmp/nin-gpu-parts")  # nosec B108  # the GPU machine is single-user and lent to one session; the parts must wait at a path the next call knows
ORT_GPU = "onnxruntime-gpu==1.31.1"
SERVE_REQUIREMENTS = ROOT / "serving" / "requirements.txt"
LOCK = ROOT / "scripts" / "gpu-wheels.lock"
KEEP_ARCH = 90  # the H100 and H200: Hopper, sm_90 (the wheel's cubins for it are sm_90a)


def served_packages() -> list[str]:
    """What the served package imports, pinned as serving/requirements.txt pins it (bentoml,
    fastapi, pillow, ...), less onnxruntime-gpu (carried apart) and the machine's own numpy."""
    lines = [ln.split("#")[0].strip() for ln in SERVE_REQUIREMENTS.read_text().splitlines()]
    return [ln for ln in lines if ln and ln.split("==")[0].lower() not in {"onnxruntime-gpu", *KEEP_MACHINE_COPY}]

BIG_LIB = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
# Packages the GPU machine has that must not be shadowed by a copy in /tmp/site: torch was built
# against its numpy. Everything else bentoml needs travels, so versions cannot disagree.
KEEP_MACHINE_COPY = {"numpy"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_5_x86_64", "linux_x86_64", "any"]
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pip_download(dest: Path, specs: list[str], deps: bool, hashes: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    if not deps:
        cmd.append("--no-deps")
    if hashes:
        cmd.append("--require-hashes")
    subprocess.run(cmd + specs, check=True)  # nosec B603  # pip under this interpreter, pinned specs from this file


def lock(path: Path = LOCK) -> int:
    """Resolve the wheels once and pin each with its sha256: `prepare` then downloads exactly these."""
    with tempfile.TemporaryDirectory() as tmp:
        pip_download(Path(tmp), [ORT_GPU, *served_packages()], deps=True)
        wheels = sorted(w for w in Path(tmp).glob("*.whl") if dist_name(w) not in KEEP_MACHINE_COPY)
        lines = [f"{dist_name(w)}=={w.name.split('-')[1]} --hash=sha256:{sha256(w)}" for w in wheels]
    path.write_text("# scripts/gpu_parts.py lock: the GPU machine's wheels (cp312, manylinux x86-64), each with its sha256;\n"
                    "# `prepare` downloads exactly these. Regenerate after a change to serving/requirements.txt.\n"
                    + "\n".join(lines) + "\n")
    print(f"{path}: {len(lines)} wheels")
    return 0


def dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def compress(src: Path, dst: Path) -> None:
    """xz -9 (multi-threaded where the xz tool exists; Python's lzma decompresses it anywhere)."""
    if shutil.which("xz"):
        with open(dst, "wb") as out:
            subprocess.run(["xz", "-9", "-T0", "-c", str(src)], stdout=out, check=True)  # nosec B603 B607  # xz from PATH (Debian's), on files this script wrote
    else:
        with open(src, "rb") as fin, lzma.open(dst, "wb", preset=9) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


def elf_section(data: bytes | bytearray, name: str) -> tuple[int, int]:
    """(file offset, size) of an ELF64 little-endian section, read from the section headers."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not an ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    for sh_name, _, _, _, offset, size in headers:
        if data[strtab + sh_name : data.index(b"\0", strtab + sh_name)] == name.encode():
            return offset, size
    raise ValueError(f"no {name} section")


FATBIN_MAGIC = 0xBA55ED50
FATBIN_ENTRY = struct.Struct("<HHIQIIHHI")  # kind, -, header size, payload size, -, -, minor, major, sm arch


def prune_fatbin(data: bytearray, keep: int = KEEP_ARCH) -> dict:
    """Keep only the sm_`keep` code in every CUDA fat binary of a shared library, in place.

    Each container in `.nv_fatbin` (one per compiled source file: a 16-byte header, then entries of
    a header and a payload, one per GPU architecture) is rewritten to hold only its sm_`keep`
    entry, moved up behind the header, with the header's size cut to match and the rest zeroed:
    the same container nvcc writes for one architecture, at the same address, so the pointers in
    `.nvFatBinSegment` hold. A container with no such entry stays whole. The zeros compress to
    nothing; the library's size and layout do not change."""
    offset, size = elf_section(data, ".nv_fatbin")
    pos, end_all = offset, offset + size
    stats = {"containers": 0, "pruned": 0, "kept_whole": 0, "kept_bytes": 0, "dropped_bytes": 0}
    while pos < end_all:
        if data[pos : pos + 8] == bytes(8):  # padding between containers
            pos += 8
            continue
        magic, _, header, fat = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            raise ValueError(f"no fat binary at {pos:#x} (magic {magic:#x})")
        entries, e, end = [], pos + header, pos + header + fat
        while e < end:
            _, _, ehs, psize, *_, arch = FATBIN_ENTRY.unpack_from(data, e)
            entries.append((e, ehs + psize, arch))
            e += ehs + psize
        if e != end:
            raise ValueError(f"fat binary at {pos:#x}: entries overrun its size")
        stats["containers"] += 1
        keep_entries = [(e, n) for e, n, arch in entries if arch == keep]
        if len(keep_entries) != 1:
            stats["kept_whole"] += 1
        else:
            (e, n), = keep_entries
            entry = bytes(data[e : e + n])
            data[pos + header : end] = bytes(end - pos - header)
            data[pos + header : pos + header + n] = entry
            struct.pack_into("<Q", data, pos + 8, n)
            stats["pruned"] += 1
            stats["kept_bytes"] += n
            stats["dropped_bytes"] += fat - n
        pos = end
    return stats


def split_ort_wheel(wheel: Path, work: Path) -> tuple[Path, Path, dict]:
    """The wheel without its CUDA provider library (a zip), and the library pruned to sm_90 and
    xz-compressed."""
    rest, lib, lib_xz = work / "onnxruntime_gpu-rest.zip", work / "libonnxruntime_providers_cuda.so", work / "cuda-lib.xz"
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(rest, "w", zipfile.ZIP_LZMA) as zout:
        for item in zin.infolist():
            if item.filename == BIG_LIB:
                data = bytearray(zin.read(item))
                stats = prune_fatbin(data)
                lib.write_bytes(data)
            else:
                zout.writestr(item, zin.read(item))
    info = {"path": BIG_LIB, "sha256": sha256(lib), "bytes": lib.stat().st_size, "fatbin": stats}
    compress(lib, lib_xz)
    lib.unlink()
    return rest, lib_xz, info


def pack(files: list[Path], out: Path, part_bytes: int, extra: dict, first_part_bytes: int | None = None) -> dict:
    """Cut `files` into chunks and fill numbered part folders, each at most `part_bytes` (the first
    at most `first_part_bytes`: it travels beside the data). Returns the manifest, also written
    into every part."""
    entries, part, used = [], 1, 0
    for f in files:
        size, offset = f.stat().st_size, 0
        while offset < size:
            room = (first_part_bytes if part == 1 and first_part_bytes else part_bytes) - used
            if room <= 0:
                part, used = part + 1, 0
                continue
            n = min(room, size - offset)
            name = f"{f.name}.{offset:012d}" if n < size else f.name
            d = out / f"{part:02d}"
            d.mkdir(parents=True, exist_ok=True)
            with open(f, "rb") as src, open(d / name, "wb") as dst:
                src.seek(offset)
                dst.write(src.read(n))  # at most one part's bytes
            entries.append({"file": f.name, "chunk": name, "part": part, "offset": offset, "bytes": n,
                            "sha256": sha256(d / name)})
            offset += n
            used += n
    manifest = {"parts": part, "chunks": entries,
                "files": {f.name: {"sha256": sha256(f), "bytes": f.stat().st_size} for f in files}, **extra}
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def prepare(out: Path, part_mb: float, first_part_mb: float) -> int:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "wheels").mkdir()
        pip_download(work / "wheels", ["-r", str(LOCK)], deps=False, hashes=True)
        ort_wheel = next((work / "wheels").glob("onnxruntime_gpu-*.whl"))
        wheels = sorted(w for w in (work / "wheels").glob("*.whl") if w != ort_wheel)
        print(f"{len(wheels)} wheels for the service ({sum(w.stat().st_size for w in wheels) / 1e6:.1f} MB); "
              f"{ort_wheel.name} {ort_wheel.stat().st_size / 1e6:.1f} MB; compressing its CUDA library ...", flush=True)
        rest, lib_xz, lib = split_ort_wheel(ort_wheel, work)
        print(f"library {lib['bytes'] / 1e6:.1f} MB, {lib['fatbin']['dropped_bytes'] / 1e6:.1f} MB of other GPUs' "
              f"code zeroed -> {lib_xz.stat().st_size / 1e6:.1f} MB xz; "
              f"the rest of the wheel {rest.stat().st_size / 1e6:.1f} MB", flush=True)
        manifest = pack([lib_xz, rest, *wheels], out, int(part_mb * 1e6),
                        {"ort_wheel": ort_wheel.name, "library": lib, "wheels": [w.name for w in wheels],
                         "rest": rest.name, "library_xz": lib_xz.name}, int(first_part_mb * 1e6))
    plan(manifest, out)
    return 0


def plan(manifest: dict, out: Path) -> None:
    print(f"\n{manifest['parts']} parts in {out}:")
    for i in range(1, manifest["parts"] + 1):
        size = sum(c["bytes"] for c in manifest["chunks"] if c["part"] == i) / 1e6
        print(f"  {out}/{i:02d}  {size:.1f} MB")
    print("the device calls that carry them: python scripts/gpu_calls.py plan")


def receive(part_dir: Path, store: Path) -> int:
    manifest = json.loads((part_dir / MANIFEST).read_text())
    store.mkdir(parents=True, exist_ok=True)
    (store / MANIFEST).write_text(json.dumps(manifest))
    by_name = {c["chunk"]: c for c in manifest["chunks"]}
    for f in sorted(part_dir.iterdir()):
        if f.name == MANIFEST:
            continue
        entry = by_name.get(f.name)
        if entry is None:
            print(f"error: {f} is not in the manifest", file=sys.stderr)
            return 2
        if sha256(f) != entry["sha256"]:
            print(f"error: {f} is damaged (sha256 differs from the manifest)", file=sys.stderr)
            return 2
        shutil.copy(f, store / f.name)
    return status(store)


def status(store: Path) -> int:
    manifest = json.loads((store / MANIFEST).read_text())
    missing = sorted({c["part"] for c in manifest["chunks"] if not (store / c["chunk"]).is_file()})
    have = manifest["parts"] - len(missing)
    print(f"{have} of {manifest['parts']} parts in {store}" + (f"; missing parts {missing}" if missing else "; complete"))
    return 0


def join(store: Path, manifest: dict, name: str, dst: Path) -> Path:
    chunks = sorted((c for c in manifest["chunks"] if c["file"] == name), key=lambda c: c["offset"])
    with open(dst, "wb") as out:
        for c in chunks:
            with open(store / c["chunk"], "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    if sha256(dst) != manifest["files"][name]["sha256"]:
        raise SystemExit(f"error: {name} joined from its chunks does not match the manifest")
    return dst


def assemble(store: Path, site: Path) -> int:
    manifest = json.loads((store / MANIFEST).read_text())
    missing = sorted({c["part"] for c in manifest["chunks"] if not (store / c["chunk"]).is_file()})
    if missing:
        print(f"error: parts {missing} have not arrived; receive them first", file=sys.stderr)
        return 2
    site.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store) as tmp:
        work = Path(tmp)
        files = {name: join(store, manifest, name, work / name) for name in manifest["files"]}
        wheels = [files[w] for w in manifest["wheels"]]
        if wheels:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",  # nosec B603  # pip under this interpreter, --no-index, wheels checked against their sha256 first
                            "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
        with zipfile.ZipFile(files[manifest["rest"]]) as z:  # a wheel is a zip of site-packages
            z.extractall(site)
        lib = site / manifest["library"]["path"]
        lib.parent.mkdir(parents=True, exist_ok=True)
        with lzma.open(files[manifest["library_xz"]], "rb") as src, open(lib, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if sha256(lib) != manifest["library"]["sha256"]:
            raise SystemExit(f"error: {lib} does not match the manifest after decompression")
    print(f"installed into {site}: {manifest['ort_wheel']} and {len(manifest['wheels'])} wheels; "
          f"use PYTHONPATH={site}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="onnxruntime-gpu and bentoml to the GPU machine, in parts.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("lock", help=f"here: resolve the wheels and pin them with their sha256 into {LOCK.name}")
    p = sub.add_parser("prepare", help="here: download the locked wheels, prune, compress, cut into parts")
    p.add_argument("--out", default=".gpu/parts", help="default: .gpu/parts")
    p.add_argument("--part-mb", type=float, default=46.0, help="MB per part (default: 46; the working tree travels in the same 64 MiB)")
    p.add_argument("--first-part-mb", type=float, default=16.0,
                   help="MB in part 01, which travels beside the 30 MB of data (default: 16)")
    r = sub.add_parser("receive", help="there: take one part into the store")
    r.add_argument("part", help="a part folder, e.g. .gpu/parts/03")
    r.add_argument("--store", default=str(STORE), help=f"default: {STORE}")
    s = sub.add_parser("status", help="there: which parts have arrived")
    s.add_argument("--store", default=str(STORE), help=f"default: {STORE}")
    a = sub.add_parser("assemble", help="there: join, check and install into --site")
    a.add_argument("--store", default=str(STORE), help=f"default: {STORE}")
    a.add_argument("--site", default="/tmp/site", help="default: /tmp/site")  # nosec B108  # the GPU machine's scratch folder (see STORE)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "lock":
            return lock()
        if args.cmd == "prepare":
            return prepare(Path(args.out), args.part_mb, args.first_part_mb)
        if args.cmd == "receive":
            if not (Path(args.part) / MANIFEST).is_file():
                print(f"error: {args.part} is not a part folder (no {MANIFEST})", file=sys.stderr)
                return 2
            return receive(Path(args.part), Path(args.store))
        if not (Path(args.store) / MANIFEST).is_file():
            print(f"error: nothing received in {args.store} yet", file=sys.stderr)
            return 2
        return status(Path(args.store)) if args.cmd == "status" else assemble(Path(args.store), Path(args.site))
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(map(str, e.cmd[:6]))} ... failed with exit code {e.returncode}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Carry onnxruntime-gpu and the served package's other requirements (bentoml, fastapi, ...) to the GPU machine in parts (stage 4).

The GPU machine has no package index and takes at most 64 MiB per call, the working tree
(~15 MB) included. onnxruntime-gpu 1.31.1 for cp312 is a 255 MB wheel, almost all of it one
library, `libonnxruntime_providers_cuda.so` (284 MB; ~185 MB with xz -9). So:

  here:   python scripts/gpu_parts.py prepare --out .gpu/parts
          downloads the wheels for Python 3.12 (no numpy: the GPU machine's own serves), takes the
          CUDA provider library out of the onnxruntime-gpu wheel, xz-compresses it, cuts it into
          chunks, and packs everything into folders .gpu/parts/01, 02, ... of at most
          --part-mb MB each (default 46), each with the manifest. It prints the plan.
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
import subprocess  # nosec B404  # pip and xz with fixed argument lists, never a shell
import sys
import tempfile
import zipfile
from pathlib import Path

STORE = Path("/tmp/nin-gpu-parts")  # nosec B108  # the GPU machine is single-user and lent to one session; the parts must wait at a path the next call knows
ORT_GPU = "onnxruntime-gpu==1.31.1"
SERVE_REQUIREMENTS = Path(__file__).resolve().parents[1] / "serving" / "requirements.txt"


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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(dest: Path, specs: list[str], deps: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    if not deps:
        cmd.append("--no-deps")
    subprocess.run(cmd + specs, check=True)  # nosec B603  # pip under this interpreter, pinned specs from this file


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


def split_ort_wheel(wheel: Path, work: Path) -> tuple[Path, Path, dict]:
    """The wheel without its CUDA provider library (a zip), and the library xz-compressed."""
    rest, lib, lib_xz = work / "onnxruntime_gpu-rest.zip", work / "libonnxruntime_providers_cuda.so", work / "cuda-lib.xz"
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(rest, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename == BIG_LIB:
                with zin.open(item) as src, open(lib, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            else:
                zout.writestr(item, zin.read(item))
    info = {"path": BIG_LIB, "sha256": sha256(lib), "bytes": lib.stat().st_size}
    compress(lib, lib_xz)
    lib.unlink()
    return rest, lib_xz, info


def pack(files: list[Path], out: Path, part_bytes: int, extra: dict) -> dict:
    """Cut `files` into chunks and fill numbered part folders, each at most `part_bytes`.
    Returns the manifest, also written into every part."""
    entries, part, used = [], 1, 0
    for f in files:
        size, offset = f.stat().st_size, 0
        while offset < size:
            room = part_bytes - used
            if room <= 0:
                part, used = part + 1, 0
                continue
            n = min(room, size - offset)
            name = f"{f.name}.{offset:012d}" if n < size else f.name
            d = out / f"{part:02d}"
            d.mkdir(parents=True, exist_ok=True)
            with open(f, "rb") as src, open(d / name, "wb") as dst:
                src.seek(offset)
                remaining = n
                while remaining:
                    block = src.read(min(remaining, 1 << 20))
                    dst.write(block)
                    remaining -= len(block)
            entries.append({"file": f.name, "chunk": name, "part": part, "offset": offset, "bytes": n,
                            "sha256": sha256(d / name)})
            offset += n
            used += n
    manifest = {"parts": part, "chunks": entries,
                "files": {f.name: {"sha256": sha256(f), "bytes": f.stat().st_size} for f in files}, **extra}
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def prepare(out: Path, part_mb: float) -> int:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "ort").mkdir()
        (work / "wheels").mkdir()
        pip_download(work / "ort", [ORT_GPU], deps=False)
        pip_download(work / "wheels", served_packages(), deps=True)
        ort_wheel = next((work / "ort").glob("onnxruntime_gpu-*.whl"))
        wheels = sorted(w for w in (work / "wheels").glob("*.whl") if dist_name(w) not in KEEP_MACHINE_COPY)
        print(f"{len(wheels)} wheels for the service ({sum(w.stat().st_size for w in wheels) / 1e6:.1f} MB); "
              f"{ort_wheel.name} {ort_wheel.stat().st_size / 1e6:.1f} MB; compressing its CUDA library ...", flush=True)
        rest, lib_xz, lib = split_ort_wheel(ort_wheel, work)
        print(f"library {lib['bytes'] / 1e6:.1f} MB -> {lib_xz.stat().st_size / 1e6:.1f} MB xz; "
              f"the rest of the wheel {rest.stat().st_size / 1e6:.1f} MB", flush=True)
        manifest = pack([lib_xz, rest, *wheels], out, int(part_mb * 1e6),
                        {"ort_wheel": ort_wheel.name, "library": lib, "wheels": [w.name for w in wheels],
                         "rest": rest.name, "library_xz": lib_xz.name})
    plan(manifest, out)
    return 0


def plan(manifest: dict, out: Path) -> None:
    print(f"\n{manifest['parts']} parts in {out}; one device call each, back to back:")
    for i in range(1, manifest["parts"] + 1):
        size = sum(c["bytes"] for c in manifest["chunks"] if c["part"] == i) / 1e6
        print(f"  carry [\"{out}/{i:02d}\"]  ({size:.1f} MB)  command: python3 scripts/gpu_parts.py receive {out}/{i:02d}")
    print("then: python3 scripts/gpu_parts.py assemble --site /tmp/site && "
          "PYTHONPATH=/tmp/site python3 scripts/gpu_serve_proof.py --out $OUT --data-dir .gpu/data")


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
    p = sub.add_parser("prepare", help="here: download, compress, cut into parts")
    p.add_argument("--out", default=".gpu/parts", help="default: .gpu/parts")
    p.add_argument("--part-mb", type=float, default=46.0, help="MB per part (default: 46; the tree is ~15 MB of the 64 MiB)")
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
        if args.cmd == "prepare":
            return prepare(Path(args.out), args.part_mb)
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

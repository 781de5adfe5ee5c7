"""The real Fashion-MNIST, found on disk (or downloaded when online), kept as uint8 tensors.

Batches are resized 28 -> 224 and normalized on the training device itself, so a GPU is never
starved by a CPU loader: the whole training set is 47 MB of uint8.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets import FashionMNIST

from training.config import NiNConfig

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FASHION_MNIST_DIR"
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FIX = (
    "install the Debian package (`apt-get install dataset-fashion-mnist`), or pass "
    f"--data-dir / set {ENV_VAR} to a folder holding the four IDX files (.gz or not)"
)


class DataNotFoundError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("NIN_CACHE_DIR", Path.home() / ".cache" / "nin-fashion-mnist"))


def _idx_source(folder: Path, name: str) -> Path | None:
    return next((c for c in (folder / name, folder / f"{name}.gz") if c.is_file()), None)


def _as_torchvision_root(folder: Path) -> Path | None:
    """A root that `torchvision.datasets.FashionMNIST(root, download=False)` accepts, made from
    `folder` if it holds the four files (plain or gzip), or None when it does not."""
    for raw in (folder, folder / "FashionMNIST" / "raw"):
        sources = [_idx_source(raw, n) for n in IDX_FILES]
        if not all(sources):
            continue
        if all(s.suffix != ".gz" for s in sources) and raw.name == "raw":
            return raw.parent.parent
        # torchvision wants uncompressed files in ROOT/FashionMNIST/raw: unpack once into a
        # cache keyed by the source folder, atomically (a crash never leaves a half file).
        key = hashlib.sha256(str(raw.resolve()).encode()).hexdigest()[:12]
        root = cache_dir() / key
        dest = root / "FashionMNIST" / "raw"
        dest.mkdir(parents=True, exist_ok=True)
        for name, src in zip(IDX_FILES, sources):
            if (dest / name).is_file() and (dest / name).stat().st_mtime >= src.stat().st_mtime:
                continue
            opener = gzip.open if src.suffix == ".gz" else open
            with opener(src, "rb") as fin, tempfile.NamedTemporaryFile(dir=dest, delete=False) as tmp:
                shutil.copyfileobj(fin, tmp)
            os.replace(tmp.name, dest / name)
        return root
    return None


def find_data_root(data_dir: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
    """Look in --data-dir, $FASHION_MNIST_DIR, the Debian package, then download when online.

    A folder named with --data-dir is the user's choice: it must hold the data, or this stops at
    once rather than fall through to the next place and train on other data without a word."""
    tried: list[str] = []
    places = []
    if data_dir:
        folder = Path(data_dir)
        root = _as_torchvision_root(folder) if folder.is_dir() else None
        if root is None:
            what = "does not exist" if not folder.exists() else "does not hold the four Fashion-MNIST IDX files"
            raise DataNotFoundError(f"--data-dir {folder} {what} ({', '.join(IDX_FILES)}, .gz or not). Fix: {FIX}")
        log.info("Fashion-MNIST from %s (--data-dir)", folder)
        return root
    if os.environ.get(ENV_VAR):
        places.append((ENV_VAR, Path(os.environ[ENV_VAR])))
    places.append(("Debian dataset-fashion-mnist", DEBIAN_DIR))
    for label, folder in places:
        root = _as_torchvision_root(folder) if folder.is_dir() else None
        if root is not None:
            log.info("Fashion-MNIST from %s (%s)", folder, label)
            return root
        tried.append(f"{folder} ({label})")
    if allow_download:
        root = cache_dir() / "download"
        try:
            FashionMNIST(root, train=True, download=True)
            FashionMNIST(root, train=False, download=True)
            return root
        except Exception as e:  # any network failure: report it with the other places
            tried.append(f"torchvision download into {root} ({type(e).__name__}: {e})")
    raise DataNotFoundError("Fashion-MNIST not found; tried " + "; ".join(tried) + ". Fix: " + FIX)


def load_split(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 28, 28) uint8 images and (N,) int64 labels, read by torchvision from the IDX files."""
    ds = FashionMNIST(root, train=train, download=False)
    return ds.data, ds.targets


def random_crop_flip(images: torch.Tensor, pad: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched augmentation at 28x28: zero-pad by `pad`, crop back at a random offset per image,
    flip half the images left-right. `images` is (B, H, W) uint8 on any device.

    The offsets and flips are drawn on the images' device (with `generator`, if given, which
    must live there too), so a GPU step never waits for a host-to-device copy.
    """
    b, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=generator, device=dev)
    rows = torch.arange(h, device=dev).view(1, h, 1) + dy
    cols = torch.arange(w, device=dev).view(1, 1, w) + dx
    flip = torch.rand(b, 1, 1, generator=generator, device=dev) < 0.5
    cols = torch.where(flip, cols.flip(-1), cols)
    batch = torch.arange(b, device=dev).view(b, 1, 1)
    return padded[batch, rows, cols]


def to_model_input(
    images: torch.Tensor, config: NiNConfig, channels_last: bool = False, size: int | None = None
) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 224, 224) float32, normalized as the config says.

    `size` overrides config.image_size (progressive resizing trains early epochs smaller).

    Resized bilinearly on the training device, then rounded to whole grey levels, as an upload
    of an 8-bit PNG would be. PIL's bilinear resize (what clients and the exporter's accuracy
    check use: serving.imaging.as_uploads) differs by at most one grey level in some pixels.
    """
    size = size or config.image_size
    x = images.unsqueeze(1).float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.round_().clamp_(0, 255)
    x = (x * config.scale - config.mean) / config.std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x

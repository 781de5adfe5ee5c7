"""The benchmark's inputs: real Fashion-MNIST test images as a client uploads them."""

from __future__ import annotations

import io
import uuid

import numpy as np


def real_test_pngs(n: int, data_dir: str | None = None, compress_level: int = 6) -> tuple[list[bytes], np.ndarray]:
    """The first n real Fashion-MNIST test images as uploads: 224x224 8-bit PNG (PIL bilinear),
    zlib level 6 as Pillow saves by default (level 1: the same pixels, three times faster)."""
    from serving.imaging import as_uploads
    from training.data import find_data_root, load_split

    x, y = load_split(find_data_root(data_dir, allow_download=False), train=False)
    out = []
    for img in as_uploads(x[:n].numpy(), 224):
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=compress_level)
        out.append(buf.getvalue())
    return out, y[:n].numpy()


def multipart_body(png: bytes, field: str = "image", filename: str = "image.png", count: int = 1) -> tuple[bytes, str]:
    """One multipart/form-data body with the PNG in `field` (`count` times), and its
    Content-Type: what `curl -F image=@x.png` sends, built once for the native load generator."""
    boundary = uuid.uuid4().hex
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + b"\r\n"
    return part * count + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"

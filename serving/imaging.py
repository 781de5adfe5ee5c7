"""Uploads -> the model's input: decode, validate, convert, resize, normalize.

Plain functions over bytes and arrays, tested without a server. Every rejection is an
`InputError` carrying the HTTP status the server answers with.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = {"PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"}
# PIL's own bomb check raises only at 2x its limit; we check the header ourselves first.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class InputError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.status, self.error, self.detail = status, error, detail

    def to_json(self) -> dict:
        return {"error": self.error, "detail": self.detail}


@dataclass
class Decoded:
    image: Image.Image  # 8-bit grayscale ("L") at the contract's size
    format: str
    original_mode: str
    original_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"format": self.format, "mode": self.original_mode, "size": list(self.original_size),
                "converted": any(n.startswith("converted") for n in self.notes),
                "resized": any(n.startswith("resized") for n in self.notes),
                "rotated": any(n.startswith("rotated") for n in self.notes), "notes": self.notes}


def open_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Read an upload's header only: reject what is not a supported image of sane
    size before any pixel is decoded. finish() decodes it."""
    if not data:
        raise InputError(400, "empty_body", "the upload is empty; send a PNG/JPEG/BMP/TIFF/WebP/GIF image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError(400, "not_an_image", f"{len(data)} bytes that no image decoder recognises") from None
    except Exception as e:
        raise InputError(400, "not_an_image", f"cannot read the image header ({type(e).__name__}: {e})") from None
    if img.format not in ALLOWED_FORMATS:
        raise InputError(415, "unsupported_format", f"{img.format} images are not accepted; use one of {sorted(ALLOWED_FORMATS)}")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise InputError(400, "empty_image", f"the image is {w}x{h} pixels")
    if w * h > max_pixels:
        raise InputError(413, "image_too_large", f"{w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,}")
    return img


def load(img: Image.Image, size: int | None = None) -> tuple[Image.Image, str | None]:
    """Decode the pixels (first frame of an animation). With `size`, a JPEG at least twice that
    in both sides is decoded straight to grayscale at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling, Pillow's `draft`), still at least `size` on each side (docs/decisions.md); the
    bilinear resize then does the rest."""
    note = None
    if size and img.format == "JPEG" and min(img.size) >= 2 * size:
        mode, before = img.mode, img.size
        img.draft("L", (size, size))
        if img.size != before:
            gray = f"converted {mode} to L and " if img.mode != mode else ""
            note = (f"{gray}decoded at 1/{round(before[0] / img.size[0])} scale by the JPEG decoder "
                    f"({img.size[0]}x{img.size[1]}, libjpeg's DCT scaling)")
    try:
        img.seek(0)
        img.load()
    except Exception as e:
        raise InputError(400, "corrupt_image", f"the {img.format} data is truncated or corrupt ({type(e).__name__}: {e})") from None
    return img, note


def to_grayscale(img: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit grayscale as the model was trained on. Transparency is composited over black
    (Fashion-MNIST's background); 16-bit and 32-bit images are scaled, not clipped."""
    mode = img.mode
    if mode == "L":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        out = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
        return out, f"converted {mode} to 8-bit L (scaled 0..{top:.0f} to 0..255)"
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        hi = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        out = Image.fromarray(np.clip(np.rint(a * (255.0 / hi)), 0, 255).astype(np.uint8), "L")
        return out, f"converted float image to 8-bit L (scaled 0..{hi:g} to 0..255)"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        # RGBa / La (a TIFF's premultiplied alpha) are unpremultiplied on the way to RGBA
        rgba = (img.convert("LA") if mode == "La" else img).convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L"), f"converted {mode} to L (alpha composited over black)"
    if mode == "LAB":  # CIELAB (TIFF): to sRGB through littlecms, then the same luma as any colour image
        return ImageCms.applyTransform(img, _lab_to_srgb()).convert("L"), "converted LAB to L (CIELAB -> sRGB -> ITU-R 601-2 luma)"
    try:
        return img.convert("RGB").convert("L") if mode == "CMYK" else img.convert("L"), f"converted {mode} to L (ITU-R 601-2 luma)"
    except ValueError:  # a mode Pillow decodes but cannot convert: refuse it, never a 500
        raise InputError(415, "unsupported_mode", f"{mode} images cannot be converted to grayscale; "
                         "send 8/16-bit grayscale, RGB(A), palette or CMYK") from None


@functools.cache
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")


ORIENTATION = 0x0112  # the EXIF tag cameras and phones set instead of rotating the pixels


def upright(img: Image.Image) -> tuple[Image.Image, str | None]:
    """The image as a browser shows it: EXIF orientation (2-8) applied with Pillow's
    exif_transpose, so a phone photo taken sideways is classified upright."""
    try:
        orientation = img.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - an unreadable EXIF block: the pixels as stored
        return img, None
    if orientation not in range(2, 9):
        return img, None
    turned = ImageOps.exif_transpose(img)
    return turned, f"rotated/flipped as its EXIF orientation {orientation} says (as browsers show it)"


def to_contract(data: bytes, contract: dict, max_pixels: int) -> Decoded:
    """Bytes -> 8-bit grayscale image of the contract's size, with notes on what was done."""
    return finish(open_upload(data, max_pixels), contract)


def finish(img: Image.Image, contract: dict) -> Decoded:
    """An opened upload (open_upload) -> 8-bit grayscale image of the contract's size, with notes
    on what was done. Pillow's decoders and resize release the GIL: the server runs this off the
    event loop for large images (serving/http.py)."""
    fmt, original_mode, original_size = img.format, img.mode, img.size
    img, scaled = load(img, contract["image_size"])
    img, turned = upright(img)
    gray, note = to_grayscale(img)
    notes = [n for n in (scaled, turned, note) if n]
    size = (contract["image_size"], contract["image_size"])
    if gray.size != size:
        gray = gray.resize(size, Image.BILINEAR)
        notes.append(f"resized {original_size[0]}x{original_size[1]} to {size[0]}x{size[1]} (bilinear, as in training)")
    return Decoded(gray, fmt, original_mode, original_size, notes)


def as_uploads(images_u8: np.ndarray, size: int) -> list[Image.Image]:
    """(N, h, w) uint8 arrays -> the 8-bit grayscale images a client uploads: PIL bilinear resize
    to size x size. The exporter measures accuracy on these and the HTTP tests and the benchmark
    upload them, so a model card's accuracy is the served accuracy, to the pixel."""
    return [Image.fromarray(a).resize((size, size), Image.BILINEAR) for a in np.asarray(images_u8, np.uint8)]


def normalize(images: list[Image.Image] | list[np.ndarray], contract: dict) -> np.ndarray:
    """8-bit grayscale images -> float32 (N, 1, H, W): pixel * scale, then (x - mean) / std."""
    arrays = [np.asarray(i) for i in images]  # uint8 views; the float copy is made once, in place
    a = np.empty((len(arrays), 1, *arrays[0].shape), np.float32)
    for i, arr in enumerate(arrays):
        a[i, 0] = arr
    a *= np.float32(contract["scale"])
    a -= np.float32(contract["mean"])
    a /= np.float32(contract["std"])
    return a


def softmax_top_k(logits: np.ndarray, class_names: list[str], k: int) -> list[dict]:
    """Per row: label, class name and the k most probable classes with probabilities."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    out = []
    for row in p:
        order = np.argsort(-row, kind="stable")[:k]
        out.append({
            "label": int(order[0]), "class_name": class_names[order[0]],
            "top_k": [{"label": int(i), "class_name": class_names[i], "probability": round(float(row[i]), 6)} for i in order],
        })
    return out


def warm_up(contract: dict, max_pixels: int) -> None:
    """Decode one small image per common format, so the first request does not pay for Pillow's
    lazy plugin imports and first-use set-up."""
    for fmt, mode in (("PNG", "L"), ("JPEG", "RGB"), ("WEBP", "RGB")):
        buf = io.BytesIO()
        Image.new(mode, (28, 28)).save(buf, format=fmt)
        to_contract(buf.getvalue(), contract, max_pixels)


def png_base64(image: Image.Image) -> str:
    """The image as a base64 PNG: what the model saw, for the upload page."""
    import base64

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")

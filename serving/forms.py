"""Multipart bodies for BentoML's typed endpoints, made safe before BentoML parses them.

Plain functions over headers, scopes and parsed forms (no server). BentoML picks its parser by the
exact Content-Type string and saves each uploaded file to a temporary file named after the
client's file name: "Multipart/Form-Data" was parsed as JSON, a file name with a NUL byte got
BentoML's own 400 body, and one over 255 bytes a 500 (the file system's "File name too long").
"""

from __future__ import annotations

import os
import re
import secrets

from starlette.datastructures import FormData, UploadFile

MULTIPART = "multipart/form-data"
# tempfile names BentoML's file "tmp" + 8 characters + the client's name: 255 bytes at most
MAX_FILENAME_BYTES = 200
SAFE_EXT = re.compile(r"\.[A-Za-z0-9]{1,10}")
SAFE_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]*/[\w.+-]+")


def media_type(headers) -> str:
    """The Content-Type's media type, lower case, without its parameters ("" when absent)."""
    return headers.get("content-type", "").split(";")[0].strip().lower()


def with_headers(scope: dict, content_type: bytes | None = None, content_length: int | None = None) -> dict:
    """The scope with its Content-Type's media type in lower case (parameters kept as sent), or
    with the Content-Type and Content-Length given."""
    headers = []
    for name, value in scope["headers"]:
        lower = name.lower()
        if lower == b"content-type":
            if content_type is None:
                media, sep, params = value.partition(b";")
                value = media.strip().lower() + sep + params
            else:
                value = content_type
        elif lower == b"content-length" and content_length is not None:
            value = str(content_length).encode()
        headers.append((name, value))
    return {**scope, "headers": headers}


def filename_ok(name: str | None) -> bool:
    """Whether BentoML can name a temporary file after this upload's file name."""
    if name is None:
        return True
    try:
        return "\x00" not in name and len(os.fsencode(os.path.basename(name))) <= MAX_FILENAME_BYTES
    except (UnicodeError, ValueError):
        return False


def needs_rebuild(form: FormData) -> bool:
    return any(isinstance(v, UploadFile) and not filename_ok(v.filename) for _, v in form.multi_items())


async def rebuild(form: FormData) -> tuple[bytes, bytes]:
    """The same fields in a fresh multipart body, each file named "upload" plus its extension
    when that is plain (".png"): (body, Content-Type header value)."""
    boundary = secrets.token_hex(16)
    parts = []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            await value.seek(0)
            data = await value.read()
            ext = os.path.splitext(value.filename or "")[1]
            name = "upload" + (ext if SAFE_EXT.fullmatch(ext) else "")
            ctype = value.content_type if value.content_type and SAFE_MEDIA_TYPE.fullmatch(value.content_type) \
                else "application/octet-stream"
            head = f'Content-Disposition: form-data; name="{key}"; filename="{name}"\r\nContent-Type: {ctype}\r\n'
        else:
            data = value.encode()
            head = f'Content-Disposition: form-data; name="{key}"\r\n'
        parts.append(f"--{boundary}\r\n{head}\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"{MULTIPART}; boundary={boundary}".encode()

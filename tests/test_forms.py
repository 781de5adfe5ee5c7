"""serving/forms.py: what the typed endpoints hand BentoML (no server)."""

import asyncio

from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser

from serving import forms


def parse(body: bytes, content_type: bytes):
    async def stream():
        yield body

    headers = Headers(raw=[(b"content-type", content_type)])
    return asyncio.run(MultiPartParser(headers, stream()).parse())


def part(name: str, filename: str | None, data: bytes, boundary: str = "xx") -> bytes:
    fn = f'; filename="{filename}"' if filename is not None else ""
    return (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{fn}\r\n'
            f"Content-Type: image/png\r\n\r\n").encode("utf-8", "surrogateescape") + data + b"\r\n"


def test_media_type_is_lower_case_without_parameters():
    assert forms.media_type({"content-type": "Multipart/Form-Data ; boundary=AbC"}) == "multipart/form-data"
    assert forms.media_type({}) == ""


def test_with_headers_lowers_the_media_type_only_or_sets_both_headers():
    scope = {"headers": [(b"host", b"x"), (b"content-type", b"Multipart/Form-Data; boundary=AbC"),
                         (b"content-length", b"10")]}
    assert forms.with_headers(scope)["headers"][1:] == [(b"content-type", b"multipart/form-data; boundary=AbC"),
                                                        (b"content-length", b"10")]
    assert scope["headers"][1][1] == b"Multipart/Form-Data; boundary=AbC"  # a new scope, the old one untouched
    new = forms.with_headers(scope, b"multipart/form-data; boundary=n", 42)["headers"]
    assert new == [(b"host", b"x"), (b"content-type", b"multipart/form-data; boundary=n"), (b"content-length", b"42")]


def test_file_names_bentoml_cannot_use_are_recognised():
    assert forms.filename_ok("shirt.png") and forms.filename_ok(None) and forms.filename_ok("dir/" + "x" * 150)
    assert not forms.filename_ok("a\x00.png")
    assert not forms.filename_ok("x" * 300 + ".png")
    assert not forms.filename_ok("é" * 120)  # 240 bytes in UTF-8


def test_rebuild_keeps_every_field_and_file_with_safe_names():
    png, other = b"\x89PNG fake\r\n-- data \x00\xff", b"second"
    body = (part("images", "x" * 300 + ".png", png) + part("images", "b\x00.gif", other)
            + b'--xx\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n2\r\n--xx--\r\n')
    form = parse(body, b"multipart/form-data; boundary=xx")
    assert forms.needs_rebuild(form)
    new_body, ctype = asyncio.run(forms.rebuild(form))
    assert ctype.startswith(b"multipart/form-data; boundary=")
    again = parse(new_body, ctype)
    files = again.getlist("images")
    assert [f.filename for f in files] == ["upload.png", "upload.gif"]
    assert [asyncio.run(f.read()) for f in files] == [png, other]
    assert again["top_k"] == "2" and not forms.needs_rebuild(again)


def test_rebuild_drops_an_extension_or_media_type_that_could_break_the_header():
    body = part("image", 'a.p"ng', b"data").replace(b"image/png", b'image/png"; x="y') + b"--xx--\r\n"
    form = parse(body, b"multipart/form-data; boundary=xx")
    form.getlist("image")[0].filename = "\x00" + form.getlist("image")[0].filename  # force a rebuild
    new_body, ctype = asyncio.run(forms.rebuild(form))
    f = parse(new_body, ctype)["image"]
    assert f.filename == "upload" and f.content_type == "application/octet-stream"
    assert asyncio.run(f.read()) == b"data"

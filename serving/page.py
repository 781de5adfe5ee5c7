"""The upload page (/ui) and its sample images: one self-contained HTML file (no CDN; the
page works offline) that calls POST /classify like any client."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse, HTMLResponse, JSONResponse

STATIC = Path(__file__).parent / "static"
SAMPLES = STATIC / "samples"


def samples() -> list[dict]:
    """The real Fashion-MNIST test images shipped for the page: testNNNN-class-name.png."""
    out = []
    for f in sorted(SAMPLES.glob("test*.png")):
        index, _, name = f.stem.partition("-")
        out.append({"file": f.name, "test_index": int(index.removeprefix("test")),
                    "class_name": name.replace("-", " "), "url": f"/ui/samples/{f.name}"})
    return out


def add_routes(app: FastAPI) -> None:
    tags = ["Upload page"]

    @app.get("/ui", response_class=HTMLResponse, tags=tags, summary="Upload page: drop images, see the answers")
    async def ui() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/ui/samples", tags=tags, summary="The sample images the page offers (real test images)")
    async def sample_list() -> list[dict]:
        return samples()

    @app.get("/ui/samples/{name}", tags=tags, summary="One sample image (PNG)", response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such sample"}})
    async def sample(name: str):
        known = {s["file"] for s in samples()}
        if name not in known:
            return JSONResponse({"error": "not_found", "detail": f"no sample named {name!r}; see /ui/samples"},
                                status_code=404)
        return FileResponse(SAMPLES / name, media_type="image/png")

"""The FastAPI app BentoML mounts (its OpenAPI is merged into /docs.json): the upload page (/ui,
one self-contained HTML file that calls POST /classify like any client) and its sample images.
The classify routes join it as the service's own methods (serving/service.py)."""

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


app = FastAPI(title="NiN Fashion-MNIST classifier", docs_url=None, redoc_url=None, openapi_url=None)
TAGS = ["Upload page"]


@app.get("/ui", response_class=HTMLResponse, tags=TAGS, summary="Upload page: drop images, see the answers")
async def ui() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


@app.get("/ui/samples", tags=TAGS, summary="The sample images the page offers (real test images)")
async def sample_list() -> list[dict]:
    return samples()


@app.get("/ui/samples/{name}", tags=TAGS, summary="One sample image (PNG)", response_class=FileResponse,
         responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such sample"}})
async def sample(name: str):
    known = {s["file"] for s in samples()}
    if name not in known:
        return JSONResponse({"error": "not_found", "detail": f"no sample named {name!r}; see /ui/samples"},
                            status_code=404)
    return FileResponse(SAMPLES / name, media_type="image/png")

"""The server a user would write by hand instead of this project's service: FastAPI + uvicorn +
onnxruntime + Pillow, about thirty lines, default settings everywhere. The benchmark serves the
same model file with it, on the same images, and measures it exactly like the service.

    NIN_REF_MODEL=models/nin-fashion-mnist NIN_REF_VARIANT=int8 uvicorn bench.reference:app --port 3001

Same preprocessing as the service (the card's contract: 224x224 grayscale, /255, mean, std);
nothing the service adds: no batching, no byte or pixel caps, no 4xx for a bad upload, no
timing or memory figures.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from serving.model_files import CARD, VARIANT_FILES

folder = Path(os.environ.get("NIN_REF_MODEL", "models/nin-fashion-mnist"))
card = json.loads((folder / CARD).read_text())
contract, classes = card["input_contract"], card["class_names"]
session = ort.InferenceSession(str(folder / VARIANT_FILES[os.environ.get("NIN_REF_VARIANT", "int8")]),
                               providers=["CPUExecutionProvider"])
app = FastAPI()


def predict(data: bytes) -> dict:
    img = Image.open(io.BytesIO(data)).convert("L")
    size = contract["image_size"]
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    x = (np.asarray(img, np.float32) * contract["scale"] - contract["mean"]) / contract["std"]
    logits = session.run(None, {"image": x[None, None]})[0][0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(p)[::-1][:3]
    return {"label": int(top[0]), "class_name": classes[top[0]],
            "top_k": [{"label": int(i), "class_name": classes[i], "probability": float(p[i])} for i in top]}


@app.post("/classify")
def classify(image: UploadFile = File(...)) -> dict:  # FastAPI runs a `def` route on its thread pool
    return predict(image.file.read())


@app.post("/classify_async")
async def classify_async(image: UploadFile = File(...)) -> dict:  # the other style: on the event loop, no hop
    return predict(await image.read())


@app.get("/readyz")
def readyz() -> dict:
    return {"ready": True}

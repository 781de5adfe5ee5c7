"""LitServe serving the same model file, written as its docs show (a LitAPI: setup, decode_request,
predict, encode_response), for the benchmark's peers (bench/ab.py).

    NIN_REF_MODEL=models/nin-fashion-mnist NIN_REF_VARIANT=int8 NIN_LITSERVE_BATCH=16 python -m bench.litserve_peer 3002

POST /predict with a multipart field `image`. NIN_LITSERVE_BATCH > 1 turns on LitServe's batching
(batch_timeout 2 ms); then predict() gets a list of decoded images.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import litserve as ls
import numpy as np
import onnxruntime as ort
from PIL import Image

from serving.model_files import CARD, VARIANT_FILES


class NiNAPI(ls.LitAPI):
    def setup(self, device) -> None:
        folder = Path(os.environ.get("NIN_REF_MODEL", "models/nin-fashion-mnist"))
        card = json.loads((folder / CARD).read_text())
        self.contract, self.classes = card["input_contract"], card["class_names"]
        path = folder / VARIANT_FILES[os.environ.get("NIN_REF_VARIANT", "int8")]
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def decode_request(self, request) -> np.ndarray:
        img = Image.open(io.BytesIO(request["image"].file.read())).convert("L")
        size = self.contract["image_size"]
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return (np.asarray(img, np.float32) * self.contract["scale"] - self.contract["mean"]) / self.contract["std"]

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        batch = x if x.ndim == 3 else x[None]
        logits = self.session.run(None, {"image": batch[:, None]})[0]
        return logits if x.ndim == 3 else logits[0]

    def unbatch(self, logits: np.ndarray) -> list[np.ndarray]:
        return list(logits)

    def encode_response(self, logits: np.ndarray) -> dict:
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(p)[::-1][:3]
        return {"label": int(top[0]), "class_name": self.classes[top[0]],
                "top_k": [{"label": int(i), "class_name": self.classes[i], "probability": float(p[i])} for i in top]}


if __name__ == "__main__":
    batch = int(os.environ.get("NIN_LITSERVE_BATCH", "1"))
    api = NiNAPI(max_batch_size=batch, batch_timeout=0.002) if batch > 1 else NiNAPI()
    ls.LitServer(api, accelerator="cpu").run(host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000, generate_client_file=False)

"""In-process baselines on the same images: what the model costs with no server around it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from serving.model_files import CARD


def ort_baseline(path: Path, x: np.ndarray, batches=(1, 8, 16, 32, 64), repeats: int = 3, provider: str = "cpu") -> dict:
    """onnxruntime with its default settings (threads on every core, spinning on)."""
    from export.variants import cpu_session, cuda_session

    s = cuda_session(path) if provider == "cuda" else cpu_session(path)
    if s is None:
        raise RuntimeError("--provider cuda: onnxruntime's CUDA execution provider did not start")
    name = s.get_inputs()[0].name
    out = {}
    for b in batches:
        xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))
        s.run(None, {name: xb})
        runs = max(3, 64 // b) * repeats
        t = time.perf_counter()
        for _ in range(runs):
            s.run(None, {name: xb})
        sec = (time.perf_counter() - t) / runs
        out[b] = {"ms_per_batch": round(sec * 1000, 2), "img_s": round(b / sec, 1)}
    best = max(out, key=lambda b: out[b]["img_s"])
    return {"by_batch": out, "batch1_ms": out[1]["ms_per_batch"], "best_batch": best, "best_img_s": out[best]["img_s"]}


def torch_baseline(folder: Path, x: np.ndarray, repeats: int = 20) -> dict:
    """PyTorch eager, fp32, on the card's architecture (BatchNorm unfolded, as eager runs it);
    the cost does not depend on the weight values."""
    import torch

    from training.config import NiNConfig
    from training.model import NiN

    card = json.loads((folder / CARD).read_text())
    model = NiN(NiNConfig.from_dict(card["model_config"])).eval()
    out = {}
    with torch.inference_mode():
        for b in (1, 8, 32):
            xb = torch.from_numpy(np.ascontiguousarray(np.resize(x, (b, *x.shape[1:]))))
            model(xb)
            n = max(3, repeats // b)
            t = time.perf_counter()
            for _ in range(n):
                model(xb)
            sec = (time.perf_counter() - t) / n
            out[b] = {"ms_per_batch": round(sec * 1000, 2), "img_s": round(b / sec, 1)}
    return {"by_batch": out, "threads": torch.get_num_threads()}

"""Optimized variants of the fp32 ONNX model and how fast each runs on the CPU."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from export.onnx_io import INPUT_NAME


def cpu_session(path: str | os.PathLike) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def cuda_session(path: str | os.PathLike) -> ort.InferenceSession | None:
    """A session on the CUDA execution provider, or None where it cannot run (no GPU, no
    onnxruntime-gpu, or its CUDA libraries missing: onnxruntime would fall back silently)."""
    from serving.engine import cuda_device_count

    if "CUDAExecutionProvider" not in ort.get_available_providers() or cuda_device_count() == 0:
        return None
    ort.preload_dlls()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    s = ort.InferenceSession(str(path), opts, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    return s if s.get_providers()[0] == "CUDAExecutionProvider" else None


def run_batched(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


class ArrayReader(CalibrationDataReader):
    """Feeds preprocessed training images to the calibrator, `batch_size` at a time."""

    def __init__(self, images: np.ndarray, batch_size: int = 32) -> None:
        self._batches = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray) -> None:
    """Static int8 (QDQ, per-channel 7-bit weights, uint8 activations, min/max calibration on
    `calibration`, preprocessed training images).

    reduce_range=True keeps the weights in [-64, 64]: on x86 CPUs without VNNI (AVX2, plain
    AVX-512) onnxruntime's u8s8 kernels use VPMADDUBSW, whose 16-bit intermediate sums saturate
    with full-range weights and lose points of accuracy (docs/decisions.md). On VNNI CPUs and GPUs
    the 7th bit costs little.
    """
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
        quantize_static(
            str(prepped), str(out_path), ArrayReader(calibration), quant_format=QuantFormat.QDQ,
            per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )
    # quantization drops the metadata; the caller copies it back


def convert_fp16(fp32_path: Path, out_path: Path) -> None:
    """fp16 weights and compute for GPUs, fp32 input and output (casts at the edges)."""
    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))


def ms_per_image(session: ort.InferenceSession, x: np.ndarray, batch_size: int, repeats: int = 5) -> float:
    """Median wall time of one run at `batch_size`, per image, after one warm-up run."""
    name = session.get_inputs()[0].name
    batch = np.ascontiguousarray(np.resize(x, (batch_size, *x.shape[1:])))
    session.run(None, {name: batch})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {name: batch})
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1000 / batch_size

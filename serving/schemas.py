"""What the routes answer, as pydantic models: the OpenAPI document (/docs.json, the Swagger
UI at /) is generated from these, and the tests validate real responses against them.

The routes build their JSON by hand (no validation on the hot path); these models describe it.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassProbability(Strict):
    label: int = Field(description="class index, 0-9", examples=[9])
    class_name: str = Field(examples=["Ankle boot"])
    probability: float = Field(ge=0, le=1, examples=[0.98])


class InputReport(Strict):
    """What the service did to the upload to reach the model's input contract."""

    format: str = Field(description="decoded image format", examples=["PNG"])
    mode: str = Field(description="Pillow mode of the upload", examples=["L"])
    size: list[int] = Field(description="width, height of the upload", examples=[[28, 28]])
    converted: bool = Field(description="colour or bit depth converted to 8-bit grayscale")
    resized: bool = Field(description="resized (bilinear) to the model's input size")
    rotated: bool = Field(description="turned upright as its EXIF orientation tag says (as browsers show it)")
    notes: list[str] = Field(description="each conversion, in words")
    png_base64: Optional[str] = Field(
        default=None, description="the 224x224 grayscale image the model saw, as a base64 PNG (only with show_input=true)")


class Timing(Strict):
    """Milliseconds spent in each stage of this request (also sent as a Server-Timing header)."""

    read: float = Field(description="reading the request body")
    decode: float = Field(description="decoding, grayscale conversion and resizing")
    preprocess: float = Field(description="scaling and normalizing to float32")
    queue: float = Field(description="waiting for the micro-batch to start")
    inference: float = Field(description="onnxruntime run of the batch")
    total: float = Field(description="from the request's arrival to the response")


class Memory(Strict):
    peak_rss_mb: float = Field(description="peak resident set size of the worker process during this request's batch")
    pid: int = Field(description="the worker process that answered (one of NIN_WORKERS)")
    gpu_mb: Optional[float] = Field(default=None, description="GPU memory this worker process uses (CUDA provider only)")


class ModelRef(Strict):
    variant: str = Field(description="the served ONNX file: fp32, int8 or fp16", examples=["int8"])
    provider: str = Field(description="onnxruntime execution provider", examples=["CPUExecutionProvider"])


class Prediction(Strict):
    label: int = Field(description="the predicted class index", examples=[9])
    class_name: str = Field(examples=["Ankle boot"])
    top_k: list[ClassProbability] = Field(description="the k most probable classes, most probable first")
    input: InputReport


class Classification(Prediction):
    """One image's answer, with the request's timing, memory and model."""

    timing_ms: Timing
    memory: Memory
    batch_size: int = Field(description="images in the onnxruntime batch this request rode in")
    model: ModelRef


class BatchClassification(Strict):
    results: list[Prediction] = Field(description="one per uploaded image, in upload order")
    timing_ms: Timing
    memory: Memory
    batch_size: int
    model: ModelRef


class Error(Strict):
    """Every refusal: a short machine-readable code and a sentence for people."""

    error: str = Field(description="machine-readable code", examples=["not_an_image"])
    detail: str = Field(description="what was wrong and how to fix it",
                        examples=["11 bytes that no image decoder recognises"])


class ModelInfo(BaseModel):
    """The served model: variant, provider, input contract, limits, batching and its card."""

    model_config = ConfigDict(extra="allow")
    model_folder: str
    variant: str
    provider: str
    pid: int = Field(description="the worker process that answered")
    workers: int = Field(description="BentoML worker processes serving (NIN_WORKERS); each answers with its own pid")
    input_contract: dict
    class_names: list[str]
    batching: dict
    limits: dict
    ready: bool
    card: dict


def error_responses(*statuses: int) -> dict:
    """FastAPI `responses=` entries for these statuses, each with the Error schema."""
    words = {
        400: "not an image, a corrupt or empty one, a bad multipart body, or a body that ended early",
        413: "body over NIN_MAX_BYTES (refused while it is read), image over NIN_MAX_PIXELS, or too many images",
        415: "a Content-Type other than multipart/form-data, image/* or application/octet-stream, or an image format or pixel mode not accepted",
        422: "the file field is missing, or top_k is not an integer from 1 to 10",
        503: "still warming up (not_ready), or overloaded: the service holds its bound of images "
             "(Retry-After header says when to retry)",
    }
    return {s: {"model": Error, "description": words[s]} for s in statuses}


TOP_K_PARAM = {
    "name": "top_k", "in": "query", "required": False,
    "description": "how many of the most probable classes to return (1-10)",
    "schema": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3},
}
SHOW_INPUT_PARAM = {
    "name": "show_input", "in": "query", "required": False,
    "description": "also return the 224x224 grayscale image the model saw (input.png_base64)",
    "schema": {"type": "boolean", "default": False},
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}


def image_request_body(field: str, many: bool) -> dict:
    """Multipart with the file field(s), or the image itself as the body (one image only)."""
    part = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": part} if many else part
    content = {"multipart/form-data": {"schema": {"type": "object", "properties": {field: prop}, "required": [field]}}}
    if not many:
        content.update({"image/png": _BINARY, "image/jpeg": _BINARY, "application/octet-stream": _BINARY})
    return {"required": True, "content": content,
            "description": (f"multipart/form-data with {'one or more file fields' if many else 'a file field'} "
                            f"named `{field}`" + ("" if many else ", or the image itself as the body (image/* or "
                                                  "application/octet-stream)") +
                            ". PNG, JPEG, BMP, TIFF, WebP or GIF, any size up to the limits; converted to 8-bit "
                            "grayscale and resized to 224x224 as in training.")}

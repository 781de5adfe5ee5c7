"""A near-free model with the shipped model's contract, for measuring what serving costs alone.

Same input (N, 1, 224, 224) float32 and output (N, 10) as the card says, same card (classes,
input contract, limits), but the graph is a global average pool and a 1×10 MatMul: microseconds
per image. Built by the benchmark into a temporary folder; never shipped, never exported.

    .venv/bin/python -m bench.null_model [FOLDER]   # default: a new temporary folder
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serving.model_files import CARD, VARIANT_FILES, sha256


def null_graph(input_name: str, output_name: str, n_classes: int, opset: int = 18) -> onnx.ModelProto:
    weights = numpy_helper.from_array(np.linspace(-1, 1, n_classes, dtype=np.float32).reshape(1, n_classes), "w")
    nodes = [helper.make_node("GlobalAveragePool", [input_name], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], [output_name])]
    graph = helper.make_graph(nodes, "null", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 1, 224, 224])],
                              [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", n_classes])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def make_null_model(out: str | Path, like: str | Path) -> Path:
    """A model folder at `out` the service accepts: `like`'s card, its fp32 and int8 files
    replaced by the null graph (sha256 updated), no fp16."""
    out, like = Path(out), Path(like)
    card = json.loads((like / CARD).read_text())
    out.mkdir(parents=True, exist_ok=True)
    model = null_graph(card.get("input_name", "input"), card.get("output_name", "logits"), len(card["class_names"]))
    files = {}
    for variant in ("fp32", "int8"):
        name = VARIANT_FILES[variant]
        onnx.save(model, out / name)
        files[name] = {"sha256": sha256(out / name), "bytes": (out / name).stat().st_size, "variant": variant}
    card.update(name="null (benchmark only)", files=files, test_accuracy=None,
                variants={v: {**card["variants"][v], "accuracy": None} for v in ("fp32", "int8")})
    (out / CARD).write_text(json.dumps(card, indent=1))
    return out


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    print(make_null_model(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="nin-null-"), root / "models" / "nin-fashion-mnist"))

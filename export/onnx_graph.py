"""Convert the torch model to an ONNX decoder graph with a KV cache (optimum's text-generation-with-past), and
describe its inputs and outputs for the manifest."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import onnx

from appliance.errors import ExportError

_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
           onnx.TensorProto.INT32: "int32"}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"present\.(\d+)\.(key|value)$")


def export_onnx(model, out_dir: Path) -> Path:
    """Write model.onnx (+ external data) into out_dir; return the graph path."""
    from optimum.exporters.onnx import onnx_export_from_model

    try:
        with warnings.catch_warnings():  # torch.onnx tracer warnings are about shapes optimum handles itself
            warnings.simplefilter("ignore")
            onnx_export_from_model(model, str(out_dir), task="text-generation-with-past", do_validation=False,
                                   no_post_process=False)
    except OSError:
        raise  # a full disk or a permission problem: the pipeline reports those itself
    except Exception as e:  # optimum and torch.onnx raise assorted errors
        raise ExportError(f"ONNX conversion failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from e
    graph = out_dir / "model.onnx"
    if not graph.is_file():
        raise ExportError(f"ONNX conversion wrote no {graph}.")
    return graph


def _describe(value_info) -> dict:
    tensor = value_info.type.tensor_type
    return {"name": value_info.name, "dtype": _DTYPES.get(tensor.elem_type, str(tensor.elem_type)),
            "shape": [d.dim_param or d.dim_value for d in tensor.shape.dim]}


def describe_graph(graph_path: Path, layers: int) -> tuple[dict, dict]:
    """Return the manifest's `graph` section (without `file`) and its `kv_cache` section."""
    model = onnx.load(str(graph_path), load_external_data=False)
    inputs = [_describe(v) for v in model.graph.input]
    outputs = [_describe(v) for v in model.graph.output]
    names = {v["name"] for v in inputs} | {v["name"] for v in outputs}
    roles = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
             "logits": "logits"}
    missing = [n for n in roles.values() if n not in names]
    if missing:
        raise ExportError(f"the exported graph lacks {missing}; it is not a decoder with a KV cache.")

    def ordered(pattern: re.Pattern, kind: str, values: list[dict]) -> list[str]:
        found = {int(m.group(1)): v["name"] for v in values if (m := pattern.match(v["name"])) and m.group(2) == kind}
        if sorted(found) != list(range(layers)):
            raise ExportError(f"the graph has {kind} caches for layers {sorted(found)}, expected 0..{layers - 1}.")
        return [found[i] for i in range(layers)]

    kv_dtype = next(v["dtype"] for v in inputs if _PAST.match(v["name"]))
    kv = {
        "layout": "past-present",
        "dtype": kv_dtype,
        "shape": ["batch", "kv_heads", "sequence", "head_dim"],
        "past_key": ordered(_PAST, "key", inputs), "past_value": ordered(_PAST, "value", inputs),
        "present_key": ordered(_PRESENT, "key", outputs), "present_value": ordered(_PRESENT, "value", outputs),
    }
    return {"inputs": inputs, "outputs": outputs, "roles": roles}, kv

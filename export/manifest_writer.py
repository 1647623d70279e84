"""Write manifest.json: everything the runtime needs to know about an artifact, read from the artifact itself
(graph inputs and outputs come from the saved graph, checksums from the saved files), never from conventions."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnx

from appliance.errors import ExportError
from appliance.model.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, file_entries
from export.catalog import Architecture

END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "<|eot_id|>")
THINK = ("<think>", "</think>")
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
           onnx.TensorProto.INT32: "int32"}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"present\.(\d+)\.(key|value)$")


def architecture(cfg) -> dict:
    return {**asdict(Architecture.from_config(cfg)), "tie_word_embeddings": bool(cfg.tie_word_embeddings)}


def chat_section(staging: Path, template_family: str | None, tok_config: dict, eos_ids: list[int]) -> dict:
    template = tok_config.get("chat_template")
    if not template:
        raise ExportError("the source has no chat template; r1box needs one to render conversations.")
    (staging / "chat_template.jinja").write_text(template)
    vocab = json.loads((staging / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    family = template_family or ("deepseek-r1" if "<｜Assistant｜>" in template else "chatml")
    stop = {ids[t] for t in END_TOKENS if t in ids} | set(eos_ids)
    if tok_config.get("eos_token") in ids:
        stop.add(ids[tok_config["eos_token"]])
    think = None
    if family == "deepseek-r1" and all(t in ids for t in THINK):
        think = {"open": THINK[0], "close": THINK[1], "open_id": ids[THINK[0]], "close_id": ids[THINK[1]],
                 "opened_in_prompt": True}
    return {"family": family, "template_file": "chat_template.jinja", "stop_ids": sorted(stop), "think": think}


def describe_graph(graph_path: Path, layers: int) -> tuple[dict, dict]:
    """The manifest's `graph` section (without `file`) and its `kv_cache` section, read from the saved graph."""
    model = onnx.load(str(graph_path), load_external_data=False)
    inputs = [_describe(v) for v in model.graph.input]
    outputs = [_describe(v) for v in model.graph.output]
    names = {v["name"] for v in inputs} | {v["name"] for v in outputs}
    roles = {"input_ids": "input_ids", "attention_mask": "attention_mask", "logits": "logits"}
    missing = [n for n in roles.values() if n not in names]
    if missing:
        raise ExportError(f"the exported graph lacks {missing}; it is not a decoder with a KV cache.")

    def ordered(pattern: re.Pattern, kind: str, values: list[dict]) -> list[str]:
        found = {int(m.group(1)): v["name"] for v in values if (m := pattern.match(v["name"])) and m.group(2) == kind}
        if sorted(found) != list(range(layers)):
            raise ExportError(f"the graph has {kind} caches for layers {sorted(found)}, expected 0..{layers - 1}.")
        return [found[i] for i in range(layers)]

    kv = {
        # past and present are the same buffer, bound by the runtime; attention writes new positions in place
        "layout": "gqa-shared",
        "dtype": next(v["dtype"] for v in inputs if _PAST.match(v["name"])),
        "shape": ["batch", "kv_heads", "max_length", "head_dim"],
        "lengths_from": "attention_mask",
        "logits": "last position only",
        "past_key": ordered(_PAST, "key", inputs), "past_value": ordered(_PAST, "value", inputs),
        "present_key": ordered(_PRESENT, "key", outputs), "present_value": ordered(_PRESENT, "value", outputs),
    }
    return {"inputs": inputs, "outputs": outputs, "roles": roles}, kv


def write_manifest(staging: Path, *, name: str, source: dict, arch: dict, graph_name: str, quantization: dict,
                   tokenizer: dict, chat: dict, timings: dict, parity: dict | None) -> None:
    graph, kv = describe_graph(staging / graph_name, arch["layers"])
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": {"name": name, "source": source},
        "architecture": arch,
        "graph": {"file": graph_name, **graph},
        "kv_cache": kv,
        "quantization": quantization,
        "tokenizer": tokenizer,
        "chat": chat,
        "export": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tools": _tool_versions(),
                   "step_seconds": dict(timings)},
        "parity": parity,
        "files": file_entries(staging),
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, ensure_ascii=False, indent=2))


def _describe(value_info) -> dict:
    tensor = value_info.type.tensor_type
    return {"name": value_info.name, "dtype": _DTYPES.get(tensor.elem_type, str(tensor.elem_type)),
            "shape": [d.dim_param or d.dim_value for d in tensor.shape.dim]}


def _tool_versions() -> dict[str, str]:
    versions = {}
    for pkg in ("r1box", "torch", "transformers", "onnx", "onnxruntime", "gguf"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return versions

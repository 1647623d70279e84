"""`r1box export`: source → torch → ONNX with KV cache → int4 → manifest → parity, into a directory that appears
under its final name only when every step, the parity gate included, has passed."""

from __future__ import annotations

import errno
import json
import os
import shutil
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from appliance.errors import ExportError
from appliance.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, file_entries, load_manifest
from appliance.model import OnnxDecoder
from appliance.tokenizer import ChatTokenizer
from export.onnx_graph import describe_graph, export_onnx
from export.parity import parity_report
from export.progress import say, step
from export.quantize import QuantConfig, quantize
from export.source import Source, load_model, resolve

END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "<|eot_id|>")
THINK = ("<think>", "</think>")


def export_model(spec: str, out: Path, quant: QuantConfig = QuantConfig(), min_agreement: float = 0.9,
                 force: bool = False) -> Path:
    out = Path(out).expanduser().resolve()
    staging = out.with_name(out.name + ".partial")
    _prepare_output(out, staging, force)
    timings: dict[str, float] = {}
    try:
        with step("resolve source", timings):
            source = resolve(spec)
            say(f"  source: {source.kind} {source.path} ({source.origin})")
        with step("load weights", timings):
            model, tok_config = load_model(source, staging)
        with step("convert to ONNX with KV cache", timings):
            fp32_graph = export_onnx(model, staging / "fp32")
        if quant.precision == "fp32":
            graph_name = "model.onnx"
            for f in (staging / "fp32").glob("model.onnx*"):
                f.rename(staging / f.name)
            quantization = {"method": "none", "precision": "fp32"}
        else:
            with step(f"quantize ({quant.tag})", timings):
                graph_name = "model.onnx"
                quantization = quantize(fp32_graph, staging / graph_name, quant)
        shutil.rmtree(staging / "fp32")
        with step("parity check", timings):
            _write_manifest(staging, source, model, tok_config, graph_name, quantization, timings, parity=None)
            manifest = load_manifest(staging, verify=False)
            report = parity_report(model, OnnxDecoder(manifest), ChatTokenizer(manifest))
            report["threshold"] = min_agreement
            report["passed"] = report["agreement"] >= min_agreement
            say(f"  agreement {report['agreement']:.3f} (threshold {min_agreement}), max |Δ logits| "
                f"{report['max_abs_logit_diff']:.2f}")
        if not report["passed"]:
            raise ExportError(
                f"parity check failed: top-1 agreement {report['agreement']:.3f} is below {min_agreement}. Try "
                "--block-size 32 without --symmetric, or --precision int8; --min-agreement 0 keeps the artifact "
                "anyway.")
        with step("checksums and manifest", timings):
            _write_manifest(staging, source, model, tok_config, graph_name, quantization, timings, parity=report)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise ExportError(f"disk full while writing {staging}; free space there and export again.") from None
        raise ExportError(f"could not write the artifact ({e}).") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir())
    say(f"artifact: {out} ({size / 1e9:.2f} GB)")
    return out


def _prepare_output(out: Path, staging: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty; pass --force to replace it, or choose another --out.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as e:
        raise ExportError(f"cannot write to {out.parent} ({e.strerror}); choose a writable --out.") from None


def _tool_versions() -> dict[str, str]:
    versions = {}
    for pkg in ("r1box", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "gguf"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return versions


def _chat_section(staging: Path, source: Source, tok_config: dict, model) -> dict:
    template = tok_config.get("chat_template")
    if not template:
        raise ExportError(f"{source.path} has no chat template; r1box needs one to render conversations.")
    (staging / "chat_template.jinja").write_text(template)
    vocab = json.loads((staging / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    family = source.template_family or ("deepseek-r1" if "<｜Assistant｜>" in template else "chatml")
    stop = {ids[t] for t in END_TOKENS if t in ids}
    eos = model.generation_config.eos_token_id if model.generation_config else None
    stop |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok_config.get("eos_token") in ids:
        stop.add(ids[tok_config["eos_token"]])
    think = None
    if family == "deepseek-r1" and all(t in ids for t in THINK):
        think = {"open": THINK[0], "close": THINK[1], "open_id": ids[THINK[0]], "close_id": ids[THINK[1]],
                 "opened_in_prompt": True}
    return {"family": family, "template_file": "chat_template.jinja", "stop_ids": sorted(stop), "think": think}


def _write_manifest(staging: Path, source: Source, model, tok_config: dict, graph_name: str, quantization: dict,
                    timings: dict, parity: dict | None) -> None:
    cfg = model.config
    arch = {
        "model_type": cfg.model_type, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads, "head_dim": getattr(cfg, "head_dim", None)
        or cfg.hidden_size // cfg.num_attention_heads, "hidden": cfg.hidden_size, "ffn": cfg.intermediate_size,
        "vocab": cfg.vocab_size, "context": cfg.max_position_embeddings, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
    }
    graph, kv = describe_graph(staging / graph_name, arch["layers"])
    chat = _chat_section(staging, source, tok_config, model)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": {"name": source.name, "source": {"kind": source.kind, "path": str(source.path),
                                                  "sha256": source.sha256, "origin": source.origin}},
        "architecture": arch,
        "graph": {"file": graph_name, **graph},
        "kv_cache": kv,
        "quantization": quantization,
        "tokenizer": {"file": "tokenizer.json", "config_file": "tokenizer_config.json",
                      "bos_token": tok_config.get("bos_token"), "eos_token": tok_config.get("eos_token"),
                      "add_bos_token": tok_config.get("add_bos_token", False)},
        "chat": chat,
        "export": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tools": _tool_versions(),
                   "step_seconds": dict(timings)},
        "parity": parity,
        "files": file_entries(staging),
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, ensure_ascii=False, indent=2))

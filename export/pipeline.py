"""`r1box export`: source → torch → fused ONNX decoder graph with a KV cache → int4 → manifest → parity, into a
directory that appears under its final name only when every step, the parity gate included, has passed."""

from __future__ import annotations

import errno
import gc
import math
import os
import shutil
from pathlib import Path

from appliance.errors import ExportError
from appliance.model.decoder import Decoder
from appliance.model.manifest import Manifest, load_manifest
from appliance.model.tokenizer import ChatTokenizer
from export.catalog import Architecture
from export.gguf_blocks import carried_blocks
from export.gptq import CALIBRATION_PROMPTS, calibrate
from export.manifest_writer import architecture, chat_section, write_manifest
from export.parity import MAX_KL_DIVERGENCE, parity_report, source_references
from export.progress import say, step
from export.quantize import QuantConfig, quantize
from export.qwen2_graph import build_qwen2_graph, check_supported
from export.source import load_model, resolve

GRAPH = "model.onnx"


def export_model(spec: str, out: Path, quant: QuantConfig = QuantConfig(),
                 max_kl_divergence: float = MAX_KL_DIVERGENCE, force: bool = False, dtype: str = "float32") -> Path:
    """dtype: float32 for CPU boxes, float16 for CUDA ones (its attention kernel takes half precision only).
    max_kl_divergence: the parity gate (export/parity.py); math.inf keeps any result."""
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
            eos = model.generation_config.eos_token_id if model.generation_config else None
            sections = {
                "name": source.name, "arch": architecture(model.config),
                "source": {"kind": source.kind, "path": str(source.path), "sha256": source.sha256,
                           "origin": source.origin},
                "tokenizer": {"file": "tokenizer.json", "config_file": "tokenizer_config.json",
                              "bos_token": tok_config.get("bos_token"), "eos_token": tok_config.get("eos_token"),
                              "add_bos_token": tok_config.get("add_bos_token", False)},
                "chat": chat_section(staging, source.template_family, tok_config,
                                     eos if isinstance(eos, list) else [eos] if eos is not None else []),
            }
            tokenizer = ChatTokenizer(Manifest(staging, sections))
        with step("source model's reference answers", timings):
            refs = source_references(model, tokenizer)
        carried = {}
        if source.kind == "gguf" and quant.keeps_gguf_blocks:
            with step("the GGUF's Q4_K blocks, kept as they are", timings):
                carried = {name: parts for name, parts in carried_blocks(source.path).items()
                           if quant.bits_for(name) == 4}
                say(f"  {len(carried)} MatMuls take the GGUF's own blocks; the rest are quantized here")
        fitted = None
        if quant.gptq and quant.precision != "fp32":
            with step(f"GPTQ on the source's own answers ({len(CALIBRATION_PROMPTS)} conversations)", timings):
                # after the references: calibrating leaves the quantized weights in the torch model
                fitted = calibrate(model, tokenizer, quant.bits_for, quant.block_size, quant.symmetric,
                                   carried=carried)
        with step(f"build the fused decoder graph ({dtype})", timings):
            check_supported(model.config)
            shape = Architecture.from_config(model.config)
            state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
            del model  # the graph holds its own copy of the weights; the 1.5B would not fit twice more
            gc.collect()
            graph = build_qwen2_graph(state, shape, dtype)
            del state
        with step(f"quantize and save ({quant.tag})", timings):
            quantization = quantize(graph, staging / GRAPH, quant, fitted, carried)
            del graph, fitted, carried
        with step("parity check", timings):
            write_manifest(staging, graph_name=GRAPH, quantization=quantization, timings=timings, parity=None,
                           **sections)
            report = parity_report(refs, Decoder(load_manifest(staging, verify=False)))
            report["max_kl_divergence"] = max_kl_divergence if math.isfinite(max_kl_divergence) else None
            report["passed"] = report["kl_divergence"] <= max_kl_divergence
            say(f"  KL divergence {report['kl_divergence']:.4f} nats a token (gate {max_kl_divergence}); top-1 "
                f"agreement {report['agreement']:.3f} (lowest prompt {report['lowest_agreement']:.3f}); where the "
                f"source leads by {report['near_tie_logits']} logits or more {report['agreement_where_sure']:.3f} "
                f"(lowest {report['lowest_agreement_where_sure']:.3f}); max |Δ logits| "
                f"{report['max_abs_logit_diff']:.2f}")
        if not report["passed"]:
            raise ExportError(
                f"parity check failed: the artifact's predictions moved {report['kl_divergence']:.4f} nats a token "
                f"from the source's (KL divergence), more than {max_kl_divergence}. Try --int8-layers "
                "lm_head,qkv_proj,down_proj, or --precision int8; --max-kl-divergence inf keeps the artifact anyway.")
        with step("checksums and manifest", timings):
            write_manifest(staging, graph_name=GRAPH, quantization=quantization, timings=timings, parity=report,
                           **sections)
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

"""`r1box export` on a tiny random Qwen2 with the real R1 tokenizer: graph, quantization, manifest, parity, and
the failures that must leave nothing behind."""

import dataclasses
import fcntl
import json
import math
import os
import shutil
import threading
from collections import Counter
from pathlib import Path

import onnx
import pytest

from appliance.errors import ExportError, ModelSourceError, UnsupportedModelError
from appliance.model import int4_kernel
from appliance.model.manifest import sha256_of
from export.artifacts import artifact_path, cached_artifact
from export.pipeline import export_model
from export.quantize import QuantConfig
from tests.conftest import read_manifest


def _ops(artifact):
    return Counter(n.op_type for n in onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph.node)


def test_int4_graph_uses_matmulnbits(tiny_int4):
    ops = _ops(tiny_int4)
    assert ops["MatMulNBits"] == 2 * 4 + 1  # fused qkv, o, fused gate|up, down per layer, and lm_head
    assert ops["GroupQueryAttention"] == 2
    assert ops["GatherBlockQuantized"] == 1  # the embedding table


def test_manifest_describes_the_artifact(tiny_int4):
    m = read_manifest(tiny_int4)
    assert m["format"] == "r1box-artifact" and m["format_version"] == 1
    assert m["architecture"] | {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "hidden": 64,
                                "vocab": 152064} == m["architecture"]
    assert m["kv_cache"]["past_key"] == ["past_key_values.0.key", "past_key_values.1.key"]
    assert m["kv_cache"]["present_value"] == ["present.0.value", "present.1.value"]
    inputs = {i["name"]: i for i in m["graph"]["inputs"]}
    assert inputs["input_ids"]["dtype"] == "int64"
    assert inputs["past_key_values.0.key"]["shape"] == ["batch", 2, "max_length", 16]
    assert m["kv_cache"]["layout"] == "gqa-shared"
    q = m["quantization"]
    assert (q["method"], q["bits"], q["block_size"], q["symmetric"], q["accuracy_level"]) == \
        ("MatMulNBits", 4, 32, False, 4)
    assert q["gptq"] and "GPTQ" in q["fit"]
    assert any(title.startswith("GPTQ") for title in m["export"]["step_seconds"])
    assert m["chat"]["family"] == "deepseek-r1"
    assert m["chat"]["think"] == {"open": "<think>", "close": "</think>", "open_id": 151648, "close_id": 151649,
                                  "opened_in_prompt": True}
    assert 151643 in m["chat"]["stop_ids"]
    assert m["tokenizer"]["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert {"torch", "transformers", "onnxruntime"} <= set(m["export"]["tools"])
    assert set(m["export"]["step_seconds"]) >= {"load weights", "build the fused decoder graph (float32)",
                                                "parity check"}
    assert m["model"]["source"]["kind"] == "hf-dir"


def test_sha256_entries_match_the_files(tiny_int4):
    files = read_manifest(tiny_int4)["files"]
    on_disk = {p.name for p in tiny_int4.iterdir()} - {"manifest.json"}
    assert set(files) == on_disk
    for name, entry in files.items():
        assert sha256_of(tiny_int4 / name) == entry["sha256"]
        assert (tiny_int4 / name).stat().st_size == entry["size"]


def test_every_file_is_readable_by_the_service_user(tiny_int4):
    """The service runs as its own user (the image's, a container's): every file of the artifact gets the mode the
    umask gives, the weights too (onnx writes them for their owner alone)."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tiny_int4.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_fp32_artifact_matches_torch_exactly(tiny_fp32):
    parity = read_manifest(tiny_fp32)["parity"]
    assert parity["agreement"] == parity["agreement_where_sure"] == 1.0
    assert parity["max_abs_logit_diff"] < 1e-3 and parity["kl_divergence"] < 1e-6
    assert len(parity["cases"]) == 8 and parity["passed"]
    assert _ops(tiny_fp32)["MatMulNBits"] == 0


def test_the_same_source_and_recipe_give_the_same_bytes(tiny_int4, tiny_hf_dir, tmp_path):
    """GPTQ's calibration answers, its column loop and the block search are all deterministic on one machine: an
    artifact exported again is the same artifact, so a parity figure that moves comes from how it is read."""
    again = export_model(str(tiny_hf_dir), tmp_path / "again", QuantConfig(), max_kl_divergence=math.inf)
    first, second = read_manifest(tiny_int4), read_manifest(again)
    assert {n: f["sha256"] for n, f in first["files"].items()} == {n: f["sha256"] for n, f in second["files"].items()}
    assert first["parity"]["cases"] == second["parity"]["cases"]


def test_a_second_process_waits_for_the_cached_export(tiny_int4, monkeypatch, tmp_path):
    """Two starts at once (a test run beside `r1box chat`): the second waits on the first's lock instead of clearing
    its staging folder, then takes the finished artifact."""
    monkeypatch.setenv("R1BOX_CACHE", str(tmp_path))
    out, _ = artifact_path("qwen2.5-coder-0.5b-instruct")
    out.parent.mkdir(parents=True)
    got = []
    with open(out.with_name(out.name + ".lock"), "w") as first:
        fcntl.flock(first, fcntl.LOCK_EX)
        second = threading.Thread(target=lambda: got.append(cached_artifact("qwen2.5-coder-0.5b-instruct")))
        second.start()
        second.join(1.0)
        assert second.is_alive() and not got
        shutil.copytree(tiny_int4, out)  # the first process's export, finished
    second.join(30)
    assert got == [out]


def test_int4_parity_is_reported(tiny_int4):
    parity = read_manifest(tiny_int4)["parity"]
    assert 0.0 <= parity["agreement"] <= 1.0 and parity["max_abs_logit_diff"] > 0 and parity["kl_divergence"] > 0
    assert parity["max_kl_divergence"] is None and parity["passed"]  # exported with the gate off (math.inf)


def test_without_gptq_the_blocks_are_fitted_alone(tiny_hf_dir, tmp_path):
    out = export_model(str(tiny_hf_dir), tmp_path / "nogptq", QuantConfig(gptq=False), max_kl_divergence=math.inf)
    m = read_manifest(out)
    assert not m["quantization"]["gptq"] and "block_fit" in m["quantization"]["fit"]
    assert not any(title.startswith("GPTQ") for title in m["export"]["step_seconds"])
    assert _ops(out)["MatMulNBits"] == 2 * 4 + 1


def test_int8_option(tiny_hf_dir, tmp_path):
    out = export_model(str(tiny_hf_dir), tmp_path / "int8", QuantConfig(precision="int8"), max_kl_divergence=math.inf)
    assert read_manifest(out)["quantization"]["bits"] == 8
    assert _ops(out)["MatMulNBits"] == 9


def test_parity_gate_fails_the_export_and_keeps_nothing(tiny_hf_dir, tmp_path):
    out = tmp_path / "gated"
    with pytest.raises(ExportError, match="parity check failed"):
        export_model(str(tiny_hf_dir), out, QuantConfig(symmetric=True, block_size=128), max_kl_divergence=0.0)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(tiny_int4, tiny_hf_dir):
    with pytest.raises(ExportError, match="--force"):
        export_model(str(tiny_hf_dir), tiny_int4)
    assert (tiny_int4 / "manifest.json").is_file()


def test_unwritable_output(tiny_hf_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes past modes; sysfs refuses even root a new directory
        locked = Path("/sys")
    with pytest.raises(ExportError, match="cannot write"):
        export_model(str(tiny_hf_dir), locked / "sub" / "art")


def test_output_under_a_file(tiny_hf_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ExportError, match="cannot write"):
        export_model(str(tiny_hf_dir), blocker / "art")


def test_wrong_architecture(tiny_hf_dir, tmp_path):
    llama = tmp_path / "llama"
    shutil.copytree(tiny_hf_dir, llama)
    config = json.loads((llama / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="architecture 'llama' is not supported"):
        export_model(str(llama), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_missing_files(tmp_path):
    with pytest.raises(ModelSourceError, match="no such file"):
        export_model(str(tmp_path / "nowhere" / "model.gguf"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="without config.json"):
        export_model(str(tmp_path / "empty"), tmp_path / "out2")


def test_corrupt_gguf(tmp_path, r1_gguf):
    """A GGUF whose header reads but whose tensor data is cut off: the real R1 chunk is exactly that."""
    truncated = tmp_path / "r1-7b.gguf"
    os.link(r1_gguf, truncated) if r1_gguf.stat().st_dev == tmp_path.stat().st_dev else \
        shutil.copyfile(r1_gguf, truncated)
    with pytest.raises(UnsupportedModelError, match="tensors do not load"):
        export_model(str(truncated), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mixed_recipe_keeps_named_layers_at_8_bits(tiny_hf_dir, tmp_path):
    quant = QuantConfig(int8_layers=("lm_head", "down_proj"))
    out = export_model(str(tiny_hf_dir), tmp_path / "mixed", quant, max_kl_divergence=math.inf)
    bits = Counter(next(a.i for a in n.attribute if a.name == "bits")
                   for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
                   if n.op_type == "MatMulNBits")
    assert bits == {8: 1 + 2, 4: 2 * 3}
    assert read_manifest(out)["quantization"]["int8_layers"] == ["lm_head", "down_proj"]
    with pytest.raises(ExportError, match="no MatMul matches"):
        export_model(str(tiny_hf_dir), tmp_path / "typo", QuantConfig(int8_layers=("lm_haed",)),
                     max_kl_divergence=math.inf)


def test_float16_artifact_for_cuda_boxes_runs_and_agrees(tiny_hf_dir, tmp_path):
    out = export_model(str(tiny_hf_dir), tmp_path / "fp16", QuantConfig(precision="fp32"), dtype="float16")
    m = read_manifest(out)
    assert m["kv_cache"]["dtype"] == "float16"
    assert m["parity"]["agreement"] >= 0.9 and m["parity"]["max_abs_logit_diff"] < 0.5


def test_the_catalog_recipe_reaches_export_and_cache_and_flags_override_it():
    from appliance.cli import build_parser, export_recipe

    parse = lambda *argv: export_recipe(build_parser().parse_args(["export", *argv, "--out", "unused"]))
    stand_in = parse("qwen2.5-coder-1.5b-instruct")
    assert (stand_in.block_size, stand_in.int8_layers, stand_in.int8_layers_bits, stand_in.gptq) == \
        (32, ("lm_head",), 6, False)
    assert stand_in.keeps_gguf_blocks
    # the box's own export keeps them where its CPU serves float zero points as they are (the int4 kernel)
    on_this_box = artifact_path("qwen2.5-coder-1.5b-instruct")[1]
    assert on_this_box == (stand_in if int4_kernel.cpu_supports() else dataclasses.replace(stand_in, gguf_blocks=False))
    # a GPU artifact is quantized anew: float zero points are the CPU kernel's
    assert not parse("qwen2.5-coder-1.5b-instruct", "--dtype", "float16").gguf_blocks
    assert not artifact_path("qwen2.5-coder-1.5b-instruct", dtype="float16")[1].gguf_blocks
    redone = parse("qwen2.5-coder-1.5b-instruct", "--no-keep-gguf-blocks", "--gptq", "--block-size", "128",
                   "--int8-layers", "none", "--int8-layers-bits", "8")
    assert (redone.gguf_blocks, redone.gptq, redone.block_size, redone.int8_layers, redone.int8_layers_bits) == \
        (False, True, 128, (), 8)
    assert parse("some/hf-dir") == QuantConfig()  # outside the catalog: the defaults
    assert parse("qwen2.5-coder-0.5b-instruct").int8_layers == ("lm_head", "qkv_proj", "down_proj")

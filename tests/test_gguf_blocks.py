"""A GGUF's Q4_K blocks carried into MatMulNBits (export/gguf_blocks.py): the same weights as gguf's own
dequantization, and the same products through onnxruntime's MatMulNBits with float zero points and r1box's kernel."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize
from onnx import TensorProto, helper, numpy_helper

from appliance.model import int4_kernel
from appliance.model.decoder import Decoder
from appliance.model.manifest import load_manifest
from appliance.model.tokenizer import ChatTokenizer
from export.gguf_blocks import BLOCK, carried_blocks, q4k_as_nbits, stack


def _q4k_bytes(n: int, k: int, seed: int) -> np.ndarray:
    """Random Q4_K super-blocks: any levels and 6-bit scales are valid; d and dmin finite fp16. One sub-block of
    every super-block gets sc = 0 (the constant case) where its packed bits allow."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n * k // 256, 144), dtype=np.uint8)
    for at in (0, 2):  # d, then dmin
        blocks[:, at:at + 2] = rng.uniform(1e-4, 2e-3, len(blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    blocks[::3, 4] &= 0xC0  # sub-block 0's scale bits: sc = 0 in every third super-block
    return blocks.reshape(n, -1)


def _dequantized(b: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    levels = np.stack([b & 15, b >> 4], -1).reshape(n, -1, BLOCK).astype(np.float32)
    return ((levels - zeros.reshape(n, -1, 1)) * scales.reshape(n, -1, 1)).reshape(n, -1)


def test_weights_equal_gguf_dequantization():
    n, k = 48, 768
    raw = _q4k_bytes(n, k, 1)
    b, scales, zeros = q4k_as_nbits(raw, n, k)
    assert b.shape == (n, k // BLOCK, BLOCK // 2) and scales.shape == zeros.shape == (n, k // BLOCK)
    expected = dequantize(raw, GGMLQuantizationType.Q4_K).reshape(n, k)
    assert (expected[:, :32] == expected[:, :1]).all(axis=1).any(), "no constant sub-block was made"
    assert int4_kernel.fp16_exact(scales) and int4_kernel.fp16_exact(zeros)  # as the kernel holds them
    np.testing.assert_allclose(_dequantized(b, scales, zeros), expected, rtol=0, atol=2 ** -11 * np.abs(expected).max())


def test_a_truncated_tensor_is_refused():
    with pytest.raises(ValueError, match="super-blocks"):
        q4k_as_nbits(_q4k_bytes(16, 256, 2)[:15], 16, 256)


def _matmul(inputs: list[np.ndarray], k: int, n: int, op: str, library=None) -> ort.InferenceSession:
    names = ["B", "scales", "zero_points"][:len(inputs)]  # the kernel's: weights, then scales and zero points in one
    domain = "com.microsoft" if op == "MatMulNBits" else int4_kernel.DOMAIN
    attrs = dict(K=k, N=n, block_size=BLOCK, bits=4) | (dict(accuracy_level=4) if op == "MatMulNBits" else {})
    node = helper.make_node(op, ["A", *names], ["Y"], domain=domain, **attrs)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(x, name) for x, name in zip(inputs, names)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])
    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_matmulnbits_and_the_kernel_read_float_zero_points_as_the_gguf_means_them():
    n, k = 64, 512
    raw = _q4k_bytes(n, k, 3)
    b, scales, zeros = q4k_as_nbits(raw, n, k)
    weight = _dequantized(b, scales, zeros)  # the GGUF's, within fp16's rounding of scales and offsets (above)
    a = np.random.default_rng(4).standard_normal((5, k)).astype(np.float32)
    exact = a @ weight.T
    # onnxruntime's CPU kernel takes float zero points on its slow path (the weights dequantized, fp32 products)
    theirs = _matmul([b, scales.ravel(), zeros.ravel()], k, n, "MatMulNBits").run(None, {"A": a})[0]
    np.testing.assert_allclose(theirs, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
    if not int4_kernel.cpu_supports():
        pytest.skip("this CPU lacks AVX2/FMA: the kernel's half of the check cannot run")
    library = int4_kernel.build()
    ours = _matmul(list(int4_kernel.pack(b, scales, zeros, n, k, BLOCK)), k, n, int4_kernel.OP, library)
    # the kernel's arithmetic: activations rounded to int8 per block of 32 (127 / amax), exact weights
    blocks = a.reshape(len(a), -1, BLOCK)
    amax = np.abs(blocks).max(-1, keepdims=True)
    rounded = (np.rint(blocks * (127 / amax)) * (amax / 127)).reshape(a.shape)
    expected = rounded @ weight.T
    np.testing.assert_allclose(ours.run(None, {"A": a})[0], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_stack_keeps_each_part_s_rows():
    n, k = 32, 256
    carried = q4k_as_nbits(_q4k_bytes(n, k, 5), n, k)
    rng = np.random.default_rng(6)
    quantized = (rng.integers(0, 256, (16, k // BLOCK, BLOCK // 2), dtype=np.uint8),
                 rng.uniform(0.01, 0.02, (16, k // BLOCK)).astype(np.float32),
                 rng.integers(0, 256, (16, k // BLOCK // 2), dtype=np.uint8))
    b, scales, zeros = stack([carried, quantized])
    np.testing.assert_array_equal(b[n:], quantized[0])
    np.testing.assert_array_equal(_dequantized(b[:n], scales[:n], zeros[:n]), _dequantized(*carried))
    nibbles = quantized[2]
    np.testing.assert_array_equal(zeros[n:, 0::2], nibbles & 15)
    np.testing.assert_array_equal(zeros[n:, 1::2], nibbles >> 4)


def test_carried_blocks_maps_the_graph_s_fused_matmuls(tmp_path):
    """A GGUF with one layer: q/k Q4_K, v another type, so the fused qkv carries two parts of three."""
    path = tmp_path / "one-layer.gguf"
    writer = GGUFWriter(path, "qwen2")
    hidden, kv = 256, 64
    shapes = {"attn_q": hidden, "attn_k": kv, "attn_output": hidden, "ffn_gate": 512, "ffn_up": 512}
    for i, (name, rows) in enumerate(shapes.items()):
        writer.add_tensor(f"blk.0.{name}.weight", _q4k_bytes(rows, hidden, 10 + i),
                          raw_dtype=GGMLQuantizationType.Q4_K)
    writer.add_tensor("blk.0.attn_v.weight", np.zeros((kv, hidden), np.float32))
    writer.add_tensor("blk.0.ffn_down.weight", np.zeros((hidden, 512), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    carried = carried_blocks(path)
    assert sorted(carried) == ["model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                               "model.layers.0.self_attn.qkv_proj.weight"]
    q, k, v = carried["model.layers.0.self_attn.qkv_proj.weight"]
    assert q[0].shape[0] == hidden and k[0].shape[0] == kv and v == kv  # v: rows to quantize here


def _write_tiny_gguf(path: Path, header: dict, hidden: int = 256, ffn: int = 512, layers: int = 2) -> None:
    """A random 2-layer Qwen2 as a GGUF, the R1 tokenizer's header keys, its matrices Q4_K except the value
    projections and the output, which are fp32 and fp16 (the parts of another type a Q4_K_M file has)."""
    heads, kv_heads, head_dim = 4, 2, hidden // 4
    vocab = len(header["tokenizer.ggml.tokens"])
    writer = GGUFWriter(path, "qwen2")
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    for key, value in header.items():
        if key.startswith("tokenizer."):
            if isinstance(value, np.ndarray):
                value = value.tolist()
            if isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            else:
                writer.add_array(key, value)
    rng = np.random.default_rng(7)
    seed = iter(range(100, 1000))

    def q4k(name, rows, cols):
        writer.add_tensor(name, _q4k_bytes(rows, cols, next(seed)), raw_dtype=GGMLQuantizationType.Q4_K)

    q4k("token_embd.weight", vocab, hidden)
    for i in range(layers):
        p = f"blk.{i}"
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"{p}.{norm}.weight", np.ones(hidden, np.float32))
        q4k(f"{p}.attn_q.weight", hidden, hidden)
        q4k(f"{p}.attn_k.weight", kv_heads * head_dim, hidden)
        writer.add_tensor(f"{p}.attn_v.weight", rng.normal(0, 0.05, (kv_heads * head_dim, hidden)).astype(np.float32))
        for x, rows in (("q", hidden), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            writer.add_tensor(f"{p}.attn_{x}.bias", rng.normal(0, 0.1, rows).astype(np.float32))
        q4k(f"{p}.attn_output.weight", hidden, hidden)
        q4k(f"{p}.ffn_gate.weight", ffn, hidden)
        q4k(f"{p}.ffn_up.weight", ffn, hidden)
        q4k(f"{p}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", rng.normal(0, 0.05, (vocab, hidden)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_q4k(tmp_path_factory, r1_header) -> Path:
    path = tmp_path_factory.mktemp("tiny-q4k") / "tiny-q4k.gguf"
    _write_tiny_gguf(path, r1_header)
    return path


@pytest.mark.slow
def test_an_export_keeps_the_gguf_s_blocks_and_serves_them_both_ways(tiny_q4k, tmp_path, caplog):
    from export.pipeline import export_model
    from export.quantize import QuantConfig

    # without GPTQ, whose lm_head over the R1 vocabulary takes minutes; the real 1.5B's export runs it (README)
    kept = export_model(str(tiny_q4k), tmp_path / "kept", QuantConfig(block_size=32, gptq=False, gguf_blocks=True),
                        max_kl_divergence=math.inf)
    redone = export_model(str(tiny_q4k), tmp_path / "redone", QuantConfig(block_size=32, gptq=False),
                          max_kl_divergence=math.inf)
    manifest = load_manifest(kept)
    assert manifest.kept_gguf_blocks == 2 * 4  # qkv (q and k kept, v quantized), o, gate|up, down; not lm_head
    assert load_manifest(redone).kept_gguf_blocks == 0

    # the o projection's tensors in the artifact are the GGUF's own, bit for bit
    from gguf import GGUFReader

    source = {t.name: t for t in GGUFReader(tiny_q4k).tensors}["blk.1.attn_output.weight"]
    graph = onnx.load(str(kept / "model.onnx"), load_external_data=False).graph
    tensors = {t.name: t for t in graph.initializer}
    node = next(n for n in graph.node if n.name == "model.layers.1.self_attn.o_proj/MatMul")
    for name, expected in zip(node.input[1:], q4k_as_nbits(source.data, 256, 256)):
        np.testing.assert_array_equal(numpy_helper.to_array(tensors[name], str(kept)).ravel(), expected.ravel())

    # the parity report, which reads the artifact as this box serves it: where the kernel serves (exact float zero
    # points), keeping the blocks is nearer the source than quantizing them anew; elsewhere they are rounded at load
    report, redone_report = (json.loads((a / "manifest.json").read_text())["parity"] for a in (kept, redone))
    if int4_kernel.unavailable() is None:
        assert report["max_abs_logit_diff"] < redone_report["max_abs_logit_diff"]
        assert report["kl_divergence"] < redone_report["kl_divergence"]
        assert report["agreement_where_sure"] >= redone_report["agreement_where_sure"]
    else:
        assert report["kl_divergence"] > 0 and redone_report["kl_divergence"] > 0

    # served by the int4 kernel where the CPU has it, and by MatMulNBits with whole zero points everywhere
    tokenizer = ChatTokenizer(manifest)
    ids = tokenizer.encode(tokenizer.render([{"role": "user", "content": "你好"}]))
    with caplog.at_level(logging.WARNING, logger="appliance.model.decoder"):
        plain = Decoder(manifest, threads=2, int4=False)
    assert "rounded to whole levels" in caplog.text
    answers = []
    for decoder in ([plain, Decoder(manifest, threads=2)] if int4_kernel.unavailable() is None else [plain]):
        cache = decoder.new_cache(slots=1, max_length=64)
        answers.append(decoder.prefill(cache, 0, ids))
        assert np.isfinite(answers[-1]).all()
    if len(answers) == 2:
        assert int(answers[0].argmax()) == int(answers[1].argmax())

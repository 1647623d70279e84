"""Build a fused Qwen2 decoder graph straight from the weights, in the layout the engine needs.

Why not optimum's graph: there `present = concat(past, new)`, so every decode step reallocates and copies the whole
cache, and batched sequences of different lengths cannot share one buffer. This graph uses onnxruntime's fused
operators instead (the same ones onnxruntime-genai's builder emits, measured 20-25 % faster at decode in
shared/MODELS.md):

    input_ids [batch, seq] ─ Gather(embed) ─┬─ per layer:
                                            │   SkipSimplifiedLayerNorm → MatMul(qkv)+bias
                                            │   → GroupQueryAttention(rotary inside, KV written in place)
                                            │   → MatMul(o) → SkipSimplifiedLayerNorm → MatMul(gate|up) → SiLU·up
                                            │   → MatMul(down)
                                            └─ SkipSimplifiedLayerNorm → last position → MatMul(lm_head) → logits

KV layout "gqa-shared": past_key_values.N.key/value are [batch, kv_heads, max_length, head_dim] and the runtime binds
present.N.key/value to the same memory, so attention appends the new positions in place. Each row's length comes from
attention_mask (right-padded ones), which is how rows of different lengths decode in one batch. Only the last
position's logits are computed: a prefill never needs the others, and the vocabulary projection is a quarter of the
work per prompt token on the 0.5B.

Weights arrive as fp32 MatMuls; quantize.py turns them into MatMulNBits afterwards.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from appliance.errors import UnsupportedModelError
from export.catalog import Architecture

OPSET = 21
MS = "com.microsoft"
LM_HEAD = "lm_head/MatMul"


def check_supported(cfg) -> None:
    if getattr(cfg, "rope_scaling", None):
        raise UnsupportedModelError(f"rope scaling {cfg.rope_scaling} is not supported by the fused graph yet.")


def rotary_tables(shape: Architecture) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin caches, [context, head_dim / 2], non-interleaved halves as Qwen2's rotate_half expects."""
    inv_freq = 1.0 / (shape.rope_theta ** (np.arange(0, shape.head_dim, 2, dtype=np.float64) / shape.head_dim))
    angles = np.outer(np.arange(shape.context, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _Graph:
    """Accumulates nodes and initializers straight into one ModelProto: helper.make_graph and make_model copy every
    initializer, which for the 1.5B meant three copies of 7 GB of weights and an out-of-memory kill. Names stay
    readable so quantization can pick nodes by name."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.model = onnx.ModelProto()
        self.graph = self.model.graph

    def weight(self, name: str, array: np.ndarray) -> str:
        return self.const(name, np.ascontiguousarray(array, self.dtype))

    def const(self, name: str, array: np.ndarray) -> str:
        tensor = self.graph.initializer.add()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.raw_data = np.ascontiguousarray(array).tobytes()
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | int = 1, name: str = "", domain: str = "",
           **attrs) -> list[str]:
        name = name or f"/{op_type}_{len(self.graph.node)}"
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.graph.node.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def linear(self, name: str, x: str, weight: np.ndarray, bias: np.ndarray | None = None) -> str:
        """x @ weightᵀ (+ bias), weight in torch's [out, in] layout; node named NAME/MatMul for the quantizer."""
        (y,) = self.op("MatMul", [x, self.weight(f"{name}.weight", weight.T)], name=f"{name}/MatMul")
        if bias is not None:
            (y,) = self.op("Add", [y, self.weight(f"{name}.bias", bias)], name=f"{name}/Add")
        return y


DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}


def build_qwen2_graph(state: dict[str, np.ndarray], shape: Architecture, dtype: str = "float32") -> onnx.ModelProto:
    """state: torch-named fp32 arrays (model.layers.N.self_attn.q_proj.weight, …), consumed as the graph is built
    so that each layer's source memory is freed once copied; returns the unquantized graph.

    dtype is that of activations, KV and weights: float32 for the CPU, float16 for CUDA (whose attention kernel
    takes half precision only)."""
    np_dtype, onnx_dtype = DTYPES[dtype]
    g = _Graph(np_dtype)
    s = shape
    want = [f"model.layers.{i}.{p}" for i in range(s.layers) for p in (
        "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
        "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "mlp.down_proj.weight")] + ["model.embed_tokens.weight", "model.norm.weight"]
    missing = [k for k in want if k not in state]
    if missing:
        raise UnsupportedModelError(f"the weights lack {missing[:3]} (and {max(len(missing) - 3, 0)} more); "
                                    "is this a Qwen2 model?")
    embed = state.pop("model.embed_tokens.weight")
    lm_head = state.pop("lm_head.weight", embed)  # tied in the 1.5B/7B distills

    # attention bookkeeping, shared by every layer: lengths per row from the right-padded mask
    (mask_sum,) = g.op("ReduceSum", ["attention_mask", g.const("axis_1", np.array([1], np.int64))], keepdims=0,
                       name="/lengths/ReduceSum")
    (last_index,) = g.op("Sub", [mask_sum, g.const("one_i64", np.array(1, np.int64))], name="/lengths/Sub")
    (seqlens_k,) = g.op("Cast", [last_index], to=TensorProto.INT32, name="/lengths/seqlens_k")
    (mask_shape,) = g.op("Shape", ["attention_mask"], name="/lengths/Shape")
    (total,) = g.op("Gather", [mask_shape, g.const("one_scalar", np.array(1, np.int64))], axis=0,
                    name="/lengths/total_i64")
    (total_len,) = g.op("Cast", [total], to=TensorProto.INT32, name="/lengths/total_sequence_length")
    cos, sin = rotary_tables(s)
    g.const("cos_cache", cos.astype(np_dtype))
    g.const("sin_cache", sin.astype(np_dtype))

    (hidden,) = g.op("Gather", [g.weight("model.embed_tokens.weight", embed),
                                "input_ids"], name="/model/embed_tokens/Gather")
    residual = None
    for i in range(s.layers):
        p = f"model.layers.{i}"
        normed, residual = _norm(g, f"/{p}/input_layernorm", hidden, residual,
                                 state.pop(f"{p}.input_layernorm.weight"), s.rms_eps)
        qkv_w = np.concatenate([state.pop(f"{p}.self_attn.{x}_proj.weight") for x in "qkv"])
        qkv_b = (np.concatenate([state.pop(f"{p}.self_attn.{x}_proj.bias") for x in "qkv"])
                 if f"{p}.self_attn.q_proj.bias" in state else None)
        qkv = g.linear(f"{p}.self_attn.qkv_proj", normed, qkv_w, qkv_b)
        attn, _, _ = g.op(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
             "cos_cache", "sin_cache"],
            ["/" + p + "/attn/out", f"present.{i}.key", f"present.{i}.value"], name=f"/{p}/attn/GroupQueryAttention",
            domain=MS, num_heads=s.heads, kv_num_heads=s.kv_heads, do_rotary=1, rotary_interleaved=0,
            scale=float(1 / np.sqrt(s.head_dim)), local_window_size=-1)
        hidden = g.linear(f"{p}.self_attn.o_proj", attn, state.pop(f"{p}.self_attn.o_proj.weight"))
        normed, residual = _norm(g, f"/{p}/post_attention_layernorm", hidden, residual,
                                 state.pop(f"{p}.post_attention_layernorm.weight"), s.rms_eps)
        gate_up = g.linear(f"{p}.mlp.gate_up_proj", normed, np.concatenate(
            [state.pop(f"{p}.mlp.gate_proj.weight"), state.pop(f"{p}.mlp.up_proj.weight")]))
        gate, up = g.op("Split", [gate_up, g.const(f"/{p}/mlp/split", np.array([s.ffn, s.ffn], np.int64))], 2,
                        axis=-1, name=f"/{p}/mlp/Split")
        (gate_sig,) = g.op("Sigmoid", [gate], name=f"/{p}/mlp/Sigmoid")
        (silu,) = g.op("Mul", [gate, gate_sig], name=f"/{p}/mlp/SiLU")
        (act,) = g.op("Mul", [silu, up], name=f"/{p}/mlp/Mul")
        hidden = g.linear(f"{p}.mlp.down_proj", act, state.pop(f"{p}.mlp.down_proj.weight"))

    normed, _ = _norm(g, "/model/norm", hidden, residual, state.pop("model.norm.weight"), s.rms_eps)
    (last,) = g.op("Slice", [normed, g.const("slice_start", np.array([-1], np.int64)),
                             g.const("slice_end", np.array([np.iinfo(np.int64).max], np.int64)),
                             g.const("slice_axis", np.array([1], np.int64))], name="/model/last_position/Slice")
    (logits,) = g.op("MatMul", [last, g.weight("lm_head.weight", lm_head.T)], ["logits"], name=LM_HEAD)

    kv = ["batch", s.kv_heads, "max_length", s.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])]
    outputs = [helper.make_tensor_value_info(logits, onnx_dtype, ["batch", 1, s.vocab])]
    for i in range(s.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", onnx_dtype, kv))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", onnx_dtype, kv))
    g.graph.name = "r1box-qwen2-gqa"
    g.graph.input.extend(inputs)
    g.graph.output.extend(outputs)
    g.model.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)])
    g.model.producer_name = "r1box"
    g.model.ir_version = 10
    return g.model


def _norm(g: _Graph, name: str, x: str, residual: str | None, weight: np.ndarray, eps: float) -> tuple[str, str]:
    """RMSNorm of x + residual; returns (normed, the new residual stream)."""
    w = g.weight(f"{name.strip('/').replace('/', '.')}.weight", weight)
    if residual is None:
        (normed,) = g.op("SimplifiedLayerNormalization", [x, w], name=f"{name}/SimplifiedLayerNorm", axis=-1,
                         epsilon=eps, stash_type=1)
        return normed, x
    normed, _, _, summed = g.op("SkipSimplifiedLayerNormalization", [x, residual, w],
                                [f"{name}/out", "", "", f"{name}/residual"], name=f"{name}/SkipSimplifiedLayerNorm",
                                domain=MS, epsilon=eps)
    return normed, summed

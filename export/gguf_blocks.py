"""A GGUF's Q4_K blocks carried into MatMulNBits as they are, instead of re-quantizing their dequantized weights.

Q4_K holds super-blocks of 256 weights along K, each of eight sub-blocks of 32: w = d·sc·q − dmin·m, q in 0…15, sc
and m 6-bit, d and dmin fp16 a super-block. MatMulNBits at block 32 holds w = scale·(q − zero): scale = d·sc and zero
= dmin·m / (d·sc), a float zero point, since Q4_K's offset is no whole number of levels (onnxruntime's integer zero
points would round it). The levels are the GGUF's own; the scale and zero point are rounded to fp16, as r1box's int4
kernel holds them (d·sc takes up to 17 significant bits): a weight moves by 2⁻¹¹ of the largest at most, far
below what int8 activations round away. So the artifact's weights are the source's, and what the parity check still
sees is the arithmetic (int8 activations), as llama.cpp's own output on these blocks does.

Other types (Q6_K, which llama.cpp's Q4_K_M keeps for half the down and value projections and the output) are not
carried: their rows are quantized by GPTQ or the block search like any source's, into the same block-32 layout.
Chosen by `--keep-gguf-blocks` (QuantConfig.gguf_blocks): the float zero points are exact on r1box's int4 kernel
only; elsewhere the decoder rounds them at load (appliance/model/int4_kernel.py, whole_zero_points).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from export.block_fit import Fitted

BLOCK = 32  # Q4_K's sub-block: the MatMulNBits block size of a carried artifact
_SUPER = 144  # bytes of a Q4_K super-block: d, dmin (fp16), 12 bytes of packed 6-bit sc/m, 128 of levels

# the graph's fused MatMuls (export/qwen2_graph.py) and the GGUF tensors whose rows they stack, in order
_PARTS = {"self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"), "self_attn.o_proj": ("attn_output",),
          "mlp.gate_up_proj": ("ffn_gate", "ffn_up"), "mlp.down_proj": ("ffn_down",)}

# a fused MatMul's row blocks, one a GGUF tensor: its carried tensors, or the count of rows to quantize here
Parts = list[Fitted | int]


def carried_blocks(gguf: Path) -> dict[str, Parts]:
    """The graph's weight names (model.layers.N.self_attn.qkv_proj.weight, …, lm_head.weight) → one entry a part:
    the MatMulNBits tensors of a Q4_K part, the row count of a part of another type. Only MatMuls with a Q4_K part
    appear."""
    from gguf import GGUFReader, GGMLQuantizationType

    tensors = {t.name: t for t in GGUFReader(gguf).tensors}
    names = {"lm_head.weight": ["output.weight" if "output.weight" in tensors else "token_embd.weight"]}
    for name in tensors:
        layer = re.match(r"blk\.(\d+)\.attn_q\.weight", name)
        if layer:
            for graph_part, parts in _PARTS.items():
                names[f"model.layers.{layer.group(1)}.{graph_part}.weight"] = [
                    f"blk.{layer.group(1)}.{p}.weight" for p in parts]
    carried = {}
    for graph_name, parts in names.items():
        found = [tensors[p] for p in parts if p in tensors]
        if len(found) != len(parts) or not any(t.tensor_type == GGMLQuantizationType.Q4_K for t in found):
            continue
        carried[graph_name] = [
            q4k_as_nbits(t.data, int(t.shape[1]), int(t.shape[0])) if t.tensor_type == GGMLQuantizationType.Q4_K
            else int(t.shape[1]) for t in found]
    return carried


def q4k_as_nbits(raw: np.ndarray, n: int, k: int) -> Fitted:
    """A Q4_K tensor's bytes ([N rows of K/256 super-blocks]) → MatMulNBits's B uint8 [N, K/32, 16], scales float
    [N, K/32] and zero points float [N, K/32] (both fp16-exact), with (q − zero)·scale = the GGUF's own dequantized
    weight within fp16's rounding."""
    from gguf.quants import Q4_K

    blocks = np.ascontiguousarray(raw, np.uint8).reshape(-1, _SUPER)
    if blocks.shape[0] * 256 != n * k:
        raise ValueError(f"a Q4_K tensor of {n}×{k} holds {blocks.shape[0]} super-blocks")
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())
    scale, offset = d * sc.astype(np.float32), dmin * m.astype(np.float32)  # [super-blocks, 8]
    # 32 bytes a pair of sub-blocks: the first sub-block's levels in the low nibbles, the second's in the high
    levels = ((blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15
              ).reshape(-1, 8, 32)
    zero = np.divide(offset, scale, out=np.zeros_like(offset), where=scale != 0)
    # sc = 0 leaves a sub-block of one value, −dmin·m: level 0 at zero point 1 with that as its scale
    constant = (scale == 0) & (offset != 0)
    scale = np.where(constant, offset, scale)
    zero = np.where(constant, 1.0, zero).astype(np.float16).astype(np.float32)
    scale = scale.astype(np.float16).astype(np.float32)
    levels = np.where(constant[..., None], 0, levels).astype(np.uint8)
    packed = levels[..., 0::2] | (levels[..., 1::2] << 4)
    return packed.reshape(n, k // BLOCK, BLOCK // 2), scale.reshape(n, k // BLOCK), zero.reshape(n, k // BLOCK)


def stack(parts: list[Fitted]) -> Fitted:
    """Row blocks of one fused MatMul, carried or quantized here, as one: zero points float for every row (the
    quantized rows' 4-bit ones unpacked; none means the middle level)."""
    b = np.concatenate([p[0] for p in parts])
    scales = np.concatenate([p[1].reshape(p[0].shape[0], -1) for p in parts]).astype(np.float32)
    zeros = []
    for packed, part_scales, part_zeros in parts:
        n, blocks = packed.shape[0], part_scales.size // packed.shape[0]
        if part_zeros is None:
            zeros.append(np.full((n, blocks), 8, np.float32))
        elif part_zeros.dtype == np.float32:
            zeros.append(part_zeros.reshape(n, blocks))
        else:
            nibbles = part_zeros.reshape(n, -1)
            zeros.append(np.stack([nibbles & 15, nibbles >> 4], -1).reshape(n, -1)[:, :blocks].astype(np.float32))
    return b, scales, np.concatenate(zeros)


def fill(parts: Parts, quantized: Fitted) -> list[Fitted]:
    """parts with their row counts replaced, in order, by consecutive rows of `quantized` (the MatMulNBits tensors
    of those parts' rows stacked)."""
    b, scales, zeros = quantized
    n = b.shape[0]
    scales = scales.reshape(n, -1)
    zeros = None if zeros is None else zeros.reshape(n, -1)
    out, row = [], 0
    for part in parts:
        if isinstance(part, int):
            rows = slice(row, row + part)
            out.append((b[rows], scales[rows], None if zeros is None else zeros[rows]))
            row += part
        else:
            out.append(part)
    if row != n:
        raise ValueError(f"{n} quantized rows for parts that ask {row}")
    return out

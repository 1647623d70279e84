"""Block quantization by search: each block's scale and zero point chosen to minimize its weighted squared error.

onnxruntime's quantizer rounds to nearest on the block's [min, max] grid. That grid spends levels on a block's one
outlier and rounds everything else coarsely; at block 64 and 128, where a block spans more values, the loss shows in
the parity report. Here, as in llama.cpp's k-quants (make_qkx2_quants), each block tries a range of scales around
(max - min) / levels, rounds with each, refits the scale by least squares for the levels it chose, and keeps the one
with the smallest error, weighting each weight by its magnitude plus the block's RMS (llama.cpp's weighting without an
importance matrix: large weights matter more to the output). Weighting by calibration activations instead (llama.cpp's
imatrix, measured on bank-service text) did no better on the parity prompts: 0.887 against 0.899 on the 1.5B at
block 128, 0.832 against 0.836 on the 0.5B, within the check's noise.

The result is MatMulNBits's own layout, so the kernels, and the speed, are the same as the plain rounding's:
    B           uint8 [N, blocks, block·bits/8]   column n's K values, block by block, low nibble first at 4 bits
    scales      float [N, blocks], each an fp16 value (r1box's int4 kernel holds them so, as llama.cpp's Q4_0 does)
    zero_points uint8 [N, ⌈blocks/2⌉] at 4 bits (low nibble first), [N, blocks] at 8; w = scale · (q - zero_point)
"""

from __future__ import annotations

import numpy as np
import torch

# denominators (levels - 1) + δ for δ in -1 … +1: llama.cpp's range for make_qkx2_quants (rmin -1, rdelta 0.1)
_STEPS = torch.arange(-10, 11, dtype=torch.float32) / 10
_ROWS_PER_CHUNK = 1 << 16  # blocks per pass: a few tens of MB of temporaries at block 128

Fitted = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # MatMulNBits's (B, scales, zero_points), as above


def fit_blocks(weight: np.ndarray, bits: int, block: int, symmetric: bool = False) -> Fitted:
    """weight: [K, N] as the graph's MatMul takes it (x @ weight). Returns (B, scales, zero_points) as above;
    symmetric blocks have no zero points (the kernel's default, the middle level, is theirs)."""
    k, n = weight.shape
    blocks = -(-k // block)
    columns = torch.from_numpy(np.ascontiguousarray(weight.T, np.float32))
    if blocks * block != k:  # the kernel reads whole blocks; the padding multiplies nothing
        columns = torch.nn.functional.pad(columns, (0, blocks * block - k))
    rows = columns.reshape(n * blocks, block)
    q = torch.empty(rows.shape, dtype=torch.uint8)
    scales = torch.empty(rows.shape[0])
    zeros = torch.empty(rows.shape[0], dtype=torch.uint8)
    for lo in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        hi = min(lo + _ROWS_PER_CHUNK, rows.shape[0])
        q[lo:hi], scales[lo:hi], zeros[lo:hi] = search(rows[lo:hi], (1 << bits) - 1, symmetric)
    zeros = None if symmetric else zeros.reshape(n, blocks)
    return pack(q.reshape(n, blocks, block), scales.reshape(n, blocks), zeros, bits)


def pack(levels: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int) -> Fitted:
    """levels uint8 [N, blocks, block], scales [N, blocks], zero points uint8 [N, blocks] or None → the layout above."""
    q, scales = levels.numpy(), scales.numpy()
    zeros = None if zeros is None else zeros.numpy()
    if bits > 4:  # a byte a level: 6-bit levels are stored as 8-bit MatMulNBits's
        return q, scales, zeros
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    if zeros is not None:
        if zeros.shape[1] % 2:
            zeros = np.pad(zeros, ((0, 0), (0, 1)))
        zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
    return packed, scales, zeros


def search(x: torch.Tensor, top: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [rows, block] → (levels uint8 [rows, block], scale [rows], zero point uint8 [rows])."""
    if symmetric:  # the zero point is the middle level, (top + 1) / 2; the grid reaches it on either side
        middle = (top + 1) // 2
        span = x.abs().max(1).values * top / middle
        low = -span * middle / top
    else:
        low = x.min(1).values.clamp(max=0)  # a zero point in [0, top] puts 0 on the grid: the range holds it
        span = x.max(1).values.clamp(min=0) - low
    weights = x.abs() + x.pow(2).mean(1, keepdim=True).sqrt()
    best_err = torch.full((x.shape[0],), float("inf"))
    best_scale = torch.zeros(x.shape[0])
    best_zero = torch.zeros(x.shape[0])
    best_q = torch.zeros(x.shape, dtype=torch.uint8)
    live = span > 0  # a block of zeros stays scale 0, levels 0
    for step in _STEPS:
        scale = torch.where(live, span / (top + step), torch.ones_like(span))
        zero = torch.full_like(span, middle) if symmetric else (-low / scale).round().clamp(0, top)
        q = (x / scale[:, None] + zero[:, None]).round().clamp(0, top)
        d = q - zero[:, None]
        den = (weights * d * d).sum(1)
        fitted = torch.where(den > 0, (weights * x * d).sum(1) / den.clamp(min=1e-30), scale)
        fitted = fitted.half().float()  # r1box's int4 kernel holds scales in fp16: the error counted is the one served
        err = (weights * (x - fitted[:, None] * d).pow(2)).sum(1)
        better = live & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, fitted, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_q[better] = q[better].to(torch.uint8)
    return best_q, best_scale, best_zero.to(torch.uint8)

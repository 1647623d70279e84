"""GPTQ (export/gptq.py): its tensors are what onnxruntime's MatMulNBits multiplies, and on inputs like the ones it
was calibrated on (not the same rows) its products are closer to the fp32 ones than block-by-block rounding's."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.block_fit import fit_blocks
from export.gptq import gptq

K, N = 256, 48


def _inputs(rows: int, seed: int) -> torch.Tensor:
    """Correlated activations with a few loud channels, as a transformer's hidden states are."""
    mixing = torch.randn(K, K, generator=torch.Generator().manual_seed(0)) / K ** 0.5
    loud = torch.ones(K)
    loud[::37] = 8.0
    return torch.randn(rows, K, generator=torch.Generator().manual_seed(seed)) @ mixing * loud


def _weight() -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.05


def _matmulnbits(x: np.ndarray, packed, scales, zeros, bits: int, block: int) -> np.ndarray:
    inputs = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.astype(np.float32), "scales")]
    if zeros is not None:
        inputs.append(numpy_helper.from_array(zeros, "zero_points"))
    node = helper.make_node("MatMulNBits", ["A"] + [t.name for t in inputs], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=bits, block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], inputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": x})[0]


@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, False), (4, 128, False), (4, 64, True), (8, 32, False)])
def test_gptq_tensors_are_what_matmulnbits_multiplies(bits, block, symmetric):
    x = _inputs(512, seed=2)
    (packed, scales, zeros), dequantized = gptq(_weight(), x.T @ x * (2 / len(x)), bits, block, symmetric)
    assert (zeros is None) == symmetric
    probe = _inputs(8, seed=3).numpy()
    np.testing.assert_allclose(_matmulnbits(probe, packed, scales, zeros, bits, block), probe @ dequantized.numpy().T,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", [32, 128])
def test_gptq_beats_rounding_each_block_on_unseen_inputs(block):
    weight, x = _weight(), _inputs(1024, seed=4)
    (_, _, _), dequantized = gptq(weight, x.T @ x * (2 / len(x)), 4, block, False)
    rounded = _matmulnbits(  # block_fit takes the graph's [K, N] layout
        held_out := _inputs(256, seed=5).numpy(), *fit_blocks(weight.numpy().T, 4, block), 4, block)
    exact = held_out @ weight.numpy().T
    gptq_error = np.linalg.norm(held_out @ dequantized.numpy().T - exact)
    rounding_error = np.linalg.norm(rounded - exact)
    assert gptq_error < 0.8 * rounding_error, (gptq_error, rounding_error)


def test_silent_inputs_and_a_ragged_last_block():
    """An input channel that is always zero (its weights multiply nothing) and K not a multiple of the block."""
    weight = _weight()[:, :200]
    x = _inputs(512, seed=6)[:, :200]
    x[:, 7] = 0
    (packed, scales, zeros), dequantized = gptq(weight, x.T @ x * (2 / len(x)), 4, 64, False)
    assert packed.shape == (N, 4, 32) and scales.shape == (N, 4) and dequantized.shape == (N, 200)
    assert torch.isfinite(dequantized).all()
    assert dequantized[:, 7].abs().max() == 0

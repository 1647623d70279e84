"""Weight-only quantization with onnxruntime's MatMulNBits (and GatherBlockQuantized for the embedding table).

Defaults come from measurement (shared/MODELS.md, confirmed by our parity reports): block 32 with zero points
(asymmetric) keeps teacher-forced top-1 agreement near 0.97 on the 0.5B where symmetric drops to 0.85, at the
same decode speed. Quantizing the embedding Gather too keeps the 1.5B under 1.3 GB; fp32 embeddings alone are
0.93 GB there.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from appliance.errors import ExportError


@dataclass(frozen=True)
class QuantConfig:
    precision: str = "int4"  # "int4", "int8" or "fp32"
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4  # int8 activations in the matmul kernels on CPU; the fastest there
    quantize_embedding: bool = True

    @property
    def bits(self) -> int:
        return {"int4": 4, "int8": 8}[self.precision]

    @property
    def tag(self) -> str:
        """Short, stable name for cache keys: int4-b32-asym-emb."""
        if self.precision == "fp32":
            return "fp32"
        return (f"{self.precision}-b{self.block_size}-{'sym' if self.symmetric else 'asym'}"
                f"-acc{self.accuracy_level}{'-emb' if self.quantize_embedding else ''}")


def quantize(fp32_graph: Path, out_graph: Path, config: QuantConfig) -> dict:
    """Write the quantized graph to out_graph (external data beside it); return the manifest's `quantization`."""
    if config.precision == "fp32":
        raise ValueError("fp32 needs no quantization")
    if config.block_size < 16 or config.block_size & (config.block_size - 1):
        raise ExportError(f"block size {config.block_size} must be a power of two of at least 16.")
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)  # it warns that it raises the opset for int4, which is what we want
    op_types = ("MatMul", "Gather") if config.quantize_embedding else ("MatMul",)
    algo = DefaultWeightOnlyQuantConfig(
        block_size=config.block_size, is_symmetric=config.symmetric, accuracy_level=config.accuracy_level,
        op_types_to_quantize=op_types, quant_axes=(("MatMul", 0), ("Gather", 1)), bits=config.bits)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(fp32_graph)), bits=config.bits, block_size=config.block_size, is_symmetric=config.symmetric,
        accuracy_level=config.accuracy_level, algo_config=algo)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out_graph), use_external_data_format=True)
    ops = Counter(n.op_type for n in quantizer.model.model.graph.node)
    if ops["MatMulNBits"] == 0:
        raise ExportError("quantization produced no MatMulNBits node; the graph has no constant MatMul weights.")
    return {"method": "MatMulNBits", **asdict(config), "bits": config.bits,
            "nodes": {"MatMulNBits": ops["MatMulNBits"], "GatherBlockQuantized": ops["GatherBlockQuantized"],
                      "MatMul (activations)": ops["MatMul"]}}

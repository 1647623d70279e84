"""Weight-only quantization into onnxruntime's MatMulNBits (and GatherBlockQuantized for the embedding table).

Each MatMul's blocks are fitted by export/block_fit.py (a search of scale and zero point per block) and written in
MatMulNBits's layout here; onnxruntime's quantizer, plain rounding to nearest, does only the embedding table.
Defaults come from measurement (shared/MODELS.md, our parity reports, the top README): zero points (asymmetric) keep
top-1 agreement near 0.97 on the 0.5B where symmetric drops to 0.85, at the same decode speed; the block size and
the MatMuls kept at 8 (or 6) bits are each catalog model's recipe. Quantizing the embedding Gather too keeps the 1.5B
near 1 GB; fp32 embeddings alone are 0.93 GB.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
from onnx import helper

from appliance.errors import ExportError


@dataclass(frozen=True)
class QuantConfig:
    precision: str = "int4"  # "int4", "int8" or "fp32"
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4  # int8 activations in the matmul kernels on CPU; the fastest there
    quantize_embedding: bool = True
    # MatMuls kept at 8 bits, by name fragment ("lm_head", "qkv_proj", "down_proj"): the mixed recipe, in the
    # spirit of llama.cpp's Q4_K_M, for models whose int4 parity is too low (the catalog says which)
    int8_layers: tuple[str, ...] = ()
    # their levels: 8 bits, or 6 (fitted on 64 levels and stored in 8-bit MatMulNBits, which onnxruntime runs as it
    # is; r1box's int4 kernel reads them at 6 bits, 0.75 bytes a weight)
    int8_layers_bits: int = 8
    # levels chosen by GPTQ on the source model's own answers (export/gptq.py), not by rounding each block alone
    gptq: bool = True
    # a GGUF source's Q4_K blocks taken as they are (export/gguf_blocks.py), where the recipe is theirs: int4 with
    # zero points at block 32. A catalog model's choice (the 1.5B's), not the default: their float zero points are
    # served as they are by r1box's int4 kernel (x86 with AVX2) only, and rounded for onnxruntime's own (ARM) they
    # read below a fresh quantization (the 1.5B: 0.891 against 0.918; kept, on the kernel, 0.945)
    gguf_blocks: bool = False

    @property
    def bits(self) -> int:
        return {"int4": 4, "int8": 8}[self.precision]

    @property
    def keeps_gguf_blocks(self) -> bool:
        from export.gguf_blocks import BLOCK

        return self.gguf_blocks and self.precision == "int4" and self.block_size == BLOCK and not self.symmetric

    def bits_for(self, name: str) -> int:
        """The bits of one MatMul's levels, by its node or weight name: the precision's, or int8_layers_bits for an
        int8_layers match."""
        if self.bits == 8:
            return 8
        return self.int8_layers_bits if any(fragment in name for fragment in self.int8_layers) else 4

    @property
    def tag(self) -> str:
        """Short, stable name for cache keys: int4-b32-asym-gptq-acc4-emb."""
        if self.precision == "fp32":
            return "fp32"
        return (f"{self.precision}-b{self.block_size}-{'sym' if self.symmetric else 'asym'}"
                f"-{'gptq' if self.gptq else 'fit'}"
                f"-acc{self.accuracy_level}{'-emb' if self.quantize_embedding else ''}"
                f"{f'-i{self.int8_layers_bits}.' + '.'.join(sorted(self.int8_layers)) if self.int8_layers else ''}"
                f"{'-q4k' if self.keeps_gguf_blocks else ''}")


def quantize(model: onnx.ModelProto, out_graph: Path, config: QuantConfig, fitted: dict | None = None,
             carried: dict | None = None) -> dict:
    """Quantize the in-memory fp32 graph, save it to out_graph (external data beside it); return the manifest's
    `quantization` section. fitted: MatMulNBits tensors by weight name, made by GPTQ (export/gptq.py); the MatMuls
    it lacks are fitted here block by block. carried: a GGUF's own blocks by weight name (export/gguf_blocks.py),
    for MatMuls GPTQ did not make. fp32 just saves."""
    if config.precision == "fp32":
        _save(model, out_graph)
        return {"method": "none", "precision": "fp32"}
    if config.block_size < 16 or config.block_size & (config.block_size - 1):
        raise ExportError(f"block size {config.block_size} must be a power of two of at least 16.")
    fit = "GPTQ on the source's own answers, block scales by search (export/gptq.py)" if fitted else \
        "scale search per block (export/block_fit.py)"
    wide = _fit_matmuls(model, config, fitted or {}, carried or {})
    if config.quantize_embedding and config.bits == 4:  # GatherBlockQuantized takes 4 bits only
        model = _quantize_embedding(model, config)
    ops = Counter(n.op_type for n in model.graph.node)
    if ops["MatMulNBits"] == 0:
        raise ExportError("quantization produced no MatMulNBits node; the graph has no constant MatMul weights.")
    _save(model, out_graph)
    if carried:
        fit += f"; a GGUF's Q4_K blocks as they are in {len(carried)} MatMuls (export/gguf_blocks.py)"
    return {"method": "MatMulNBits", "fit": fit, **asdict(config), "gguf_blocks_kept": len(carried or {}),
            "bits": config.bits, "int8_nodes": len(wide),
            "nodes": {"MatMulNBits": ops["MatMulNBits"], "GatherBlockQuantized": ops["GatherBlockQuantized"],
                      "MatMul (activations)": ops["MatMul"]}}


def _fit_matmuls(model: onnx.ModelProto, config: QuantConfig, fitted: dict, carried: dict) -> list[str]:
    """Every MatMul with a constant weight becomes MatMulNBits, with GPTQ's tensors where `fitted` has them, else
    with blocks fitted by export/block_fit.py; returns the names of those kept at 8 bits."""
    from onnx import numpy_helper

    from export.block_fit import fit_blocks
    from export.gguf_blocks import stack
    from export.progress import count_bar

    graph = model.graph
    weights = {t.name: i for i, t in enumerate(graph.initializer)}
    matmuls = [i for i, node in enumerate(graph.node) if node.op_type == "MatMul" and node.input[1] in weights]
    wide, drop = [], set()
    for index in count_bar(matmuls, "MatMulNBits", "MatMul"):  # minutes for the 1.5B
        node = graph.node[index]
        bits = config.bits_for(node.name)
        if bits > 4 and config.bits == 4:
            wide.append(node.name)
        name = node.input[1]
        weight = graph.initializer[weights[name]]
        (k, n), dtype = weight.dims, helper.tensor_dtype_to_np_dtype(weight.data_type)
        if name in fitted:  # GPTQ's: the fp32 weight need not be read at all
            packed, scales, zeros = fitted[name]
            if scales.shape[0] != n:
                raise ExportError(f"GPTQ's {name} has {scales.shape[0]} columns, the graph's {n}.")
        elif name in carried:  # the GGUF's own blocks, and the rows of its other parts fitted here
            array, parts, row = numpy_helper.to_array(weight), [], 0
            for part in carried[name]:
                if isinstance(part, int):
                    part, row = fit_blocks(array[:, row:row + part], bits, config.block_size, config.symmetric), \
                        row + part
                else:
                    row += part[0].shape[0]
                parts.append(part)
            packed, scales, zeros = stack(parts)
        else:
            packed, scales, zeros = fit_blocks(numpy_helper.to_array(weight), bits, config.block_size,
                                               config.symmetric)
        scales = scales.astype(dtype)  # the kernel takes scales in the activations' type (fp16 on CUDA)
        if zeros is not None and zeros.dtype.kind == "f":  # a GGUF's offsets: float zero points, the same type
            zeros = zeros.astype(dtype)
        inputs = [node.input[0]]
        for suffix, array in (("_Q", packed), ("_scales", scales), ("_zero_points", zeros)):
            if array is not None:
                graph.initializer.append(numpy_helper.from_array(array, name + suffix))
                inputs.append(name + suffix)
        graph.node[index].CopyFrom(helper.make_node(
            "MatMulNBits", inputs, list(node.output),
            name=node.name, domain="com.microsoft", K=k, N=n, bits=4 if bits == 4 else 8,  # 6-bit levels in 8
            block_size=config.block_size, accuracy_level=config.accuracy_level))
        drop.add(name)
    if config.int8_layers and config.bits == 4 and not wide:
        raise ExportError(f"no MatMul matches --int8-layers {','.join(config.int8_layers)}; the graph's names "
                          "hold lm_head, qkv_proj, o_proj, gate_up_proj and down_proj.")
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return wide


def _quantize_embedding(model: onnx.ModelProto, config: QuantConfig) -> onnx.ModelProto:
    """The embedding table's Gather as GatherBlockQuantized, by onnxruntime's quantizer: a row is read per token,
    never multiplied, so plain rounding serves it."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # it warns that it raises the opset for int4 and lists every node; neither says anything we need
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    algo = DefaultWeightOnlyQuantConfig(
        block_size=config.block_size, is_symmetric=config.symmetric, accuracy_level=config.accuracy_level,
        op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),), bits=4)
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=config.block_size, is_symmetric=config.symmetric,
        accuracy_level=config.accuracy_level, algo_config=algo)
    quantizer.process()
    return quantizer.model.model


def _save(model: onnx.ModelProto, out_graph: Path) -> None:
    data = out_graph.with_name(out_graph.name + ".data")
    onnx.save_model(model, str(out_graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    # onnx creates the weights file for its owner alone (0600); an artifact is read by other users (the service's,
    # a container's), so it gets the graph's mode, which the umask made
    shutil.copymode(out_graph, data)

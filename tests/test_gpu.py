"""The CUDA path: the float16 artifact on onnxruntime-gpu gives the CPU's tokens. Skips without an NVIDIA GPU."""

import onnxruntime as ort
import pytest

from appliance.model.decoder import Decoder, open_decoder
from appliance.model.generate import generate
from appliance.model.manifest import load_manifest
from export.pipeline import export_model
from export.quantize import QuantConfig

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="needs onnxruntime-gpu and an NVIDIA GPU (just install-gpu)")


def test_cuda_decodes_like_the_cpu(tiny_hf_dir, tmp_path):
    artifact = export_model(str(tiny_hf_dir), tmp_path / "fp16", QuantConfig(), min_agreement=0.0,
                            dtype="float16")
    manifest = load_manifest(artifact)
    cuda, reason = open_decoder(manifest, "cuda")
    assert cuda.provider == "cuda" and reason is None
    prompt = list(range(1000, 1040))
    on_gpu = list(generate(cuda, prompt, 16, frozenset()))
    on_cpu = list(generate(Decoder(manifest, provider="cpu"), prompt, 16, frozenset()))
    assert sum(a == b for a, b in zip(on_gpu, on_cpu)) >= 12

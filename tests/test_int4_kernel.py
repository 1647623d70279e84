"""r1box's int4 kernel (appliance/model/int4_kernel.py): the same products as MatMulNBits, the same model answers.

Built for real (g++ against Debian's onnxruntime headers) and run inside onnxruntime beside MatMulNBits on the
same weights, by each of its paths the CPU can run (AVX512-VNNI where it has it, AVX2 always); skipped, with the
reason, on a CPU without AVX2."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.model import int4_kernel
from appliance.model.decoder import Decoder
from appliance.model.manifest import load_manifest
from appliance.model.tokenizer import ChatTokenizer

needs_kernel = pytest.mark.skipif(not int4_kernel.cpu_supports(), reason="this CPU lacks AVX2/FMA: MatMulNBits serves")


@pytest.fixture(scope="module")
def library():
    return int4_kernel.build()


@pytest.fixture(scope="module", params=["native", "avx2"])
def each_path(request):
    """The library as built, taking the best path this CPU has, and a build that takes the AVX2 path whatever the
    CPU has; on an AVX2 machine the two are the same path."""
    if request.param == "native":
        built = int4_kernel.build()
        assert int4_kernel.library_path(built) == int4_kernel.cpu_path()
    else:
        built = int4_kernel.build(("-DR1BOX_AVX2_ONLY",))
        assert int4_kernel.library_path(built) == "avx2"
    return built


def _session(op: str, inputs: list[np.ndarray], k: int, n: int, block: int, library=None, bits: int = 4
             ) -> ort.InferenceSession:
    names = ["B", "scales", "zero_points"][:len(inputs)]
    if op == "MatMulNBits":
        node = helper.make_node(op, ["A", *names], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=block, accuracy_level=4)
    else:
        node = helper.make_node(op, ["A", *names], ["Y"], domain=int4_kernel.DOMAIN, K=k, N=n, block_size=block,
                                bits=bits)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", "K"])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", "N"])],
                              [numpy_helper.from_array(x, name) for x, name in zip(inputs, names)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(node.domain, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@needs_kernel
@pytest.mark.parametrize("k,n,block,zero_points", [(256, 96, 32, True), (384, 160, 128, True), (512, 48, 64, False),
                                                   (1536, 2048, 128, True), (48, 32, 16, True)])
def test_products_equal_matmulnbits(each_path, k, n, block, zero_points):
    rng = np.random.default_rng(k + n)
    blocks = k // block
    b = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
    # fp16-exact, as r1box's export writes them: the kernel holds scales in fp16
    scales = rng.uniform(0.001, 0.02, n * blocks).astype(np.float16).astype(np.float32)
    zeros = rng.integers(0, 256, n * ((blocks + 1) // 2), dtype=np.uint8) if zero_points else None
    theirs = _session("MatMulNBits", [b, scales] + ([zeros] if zero_points else []), k, n, block)
    ours = _session(int4_kernel.OP, list(int4_kernel.pack(b, scales, zeros, n, k, block)), k, n, block, each_path)
    for rows in (1, 2, 3, 9, 16, 37):  # one stream, a few, full tiles of rows, and more than one with a remainder
        a = rng.standard_normal((rows, k)).astype(np.float32)
        a[:, 7] *= 40  # an outlier channel, as real hidden states have
        expected, got = theirs.run(None, {"A": a})[0], ours.run(None, {"A": a})[0]
        assert got.shape == (rows, n)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@needs_kernel
@pytest.mark.parametrize("k,n,block,zero_points", [(256, 96, 32, True), (1536, 2048, 128, True), (512, 48, 64, False)])
def test_six_bit_levels_of_an_8_bit_matmulnbits_equal_it(each_path, k, n, block, zero_points):
    """An 8-bit MatMulNBits whose levels are below 64 (a 6-bit output projection) is read at 6 bits: 0.75 bytes a
    weight instead of 1."""
    rng = np.random.default_rng(k + n + 6)
    blocks = k // block
    b = rng.integers(0, 64, (n, blocks, block), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, n * blocks).astype(np.float16).astype(np.float32)
    zeros = rng.integers(0, 64, n * blocks, dtype=np.uint8) if zero_points else None  # none: 128, onnxruntime's
    inputs = [b, scales] + ([zeros] if zero_points else [])
    theirs = _session("MatMulNBits", inputs, k, n, block, bits=8)
    weights, params = int4_kernel.pack(b, scales, zeros, n, k, block, bits=6)
    assert weights.nbytes == n * k * 3 // 4
    ours = _session(int4_kernel.OP, [weights, params], k, n, block, each_path, bits=6)
    for rows in (1, 3, 16, 37):
        a = rng.standard_normal((rows, k)).astype(np.float32)
        a[:, 7] *= 40
        expected, got = theirs.run(None, {"A": a})[0], ours.run(None, {"A": a})[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@needs_kernel
def test_wrong_shapes_are_refused(library):
    k, n, block = 64, 16, 32
    b = np.zeros((n, k // block, block // 2), np.uint8)
    ours = _session(int4_kernel.OP, list(int4_kernel.pack(b, np.ones(n * 2, np.float32), None, n, k, block)),
                    k, n, block, library)
    with pytest.raises(Exception, match="K = 64"):
        ours.run(None, {"A": np.zeros((1, 32), np.float32)})
    weights, params = int4_kernel.pack(b, np.ones(n * 2, np.float32), None, n, k, block)
    short = _session(int4_kernel.OP, [weights, params[:-1]], k, n, block, library)
    with pytest.raises(Exception, match="the scales and zero points must hold 64 elements"):
        short.run(None, {"A": np.zeros((1, k), np.float32)})


@needs_kernel
def test_tiny_model_logits_match(library, tiny_int4):
    manifest = load_manifest(tiny_int4)
    theirs, ours = Decoder(manifest, threads=2, int4=False), Decoder(manifest, threads=2, int4=True)
    assert theirs.int4_matmuls == 0 and ours.int4_matmuls == 2 * 4 + 1
    prompt = list(range(100, 140))
    a, b = theirs.new_cache(1, 128), ours.new_cache(1, 128)
    expected, got = theirs.prefill(a, 0, prompt), ours.prefill(b, 0, prompt)
    for token in (5, 17, 99):
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * np.abs(expected).max())
        expected, got = theirs.decode(a, 0, token), ours.decode(b, 0, token)


@needs_kernel
def test_a_six_bit_output_projection_is_exported_portable_and_read_at_six_bits(library, tiny_hf_dir, tmp_path):
    from export.pipeline import export_model
    from export.quantize import QuantConfig

    quant = QuantConfig(int8_layers=("lm_head",), int8_layers_bits=6, gptq=False)
    out = export_model(str(tiny_hf_dir), tmp_path / "six", quant, max_kl_divergence=math.inf)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    assert next(a.i for a in head.attribute if a.name == "bits") == 8  # onnxruntime runs it as it is anywhere
    levels = numpy_helper.to_array(next(t for t in graph.initializer if t.name == head.input[1]), str(out))
    assert levels.max() < 64 and levels.max() > 31
    manifest = load_manifest(out)
    theirs, ours = Decoder(manifest, threads=2, int4=False), Decoder(manifest, threads=2, int4=True)
    assert ours.int4_matmuls == 2 * 4 + 1  # lm_head among them, at 6 bits
    a, b = theirs.new_cache(1, 64), ours.new_cache(1, 64)
    expected, got = theirs.prefill(a, 0, list(range(100, 140))), ours.prefill(b, 0, list(range(100, 140)))
    for token in (5, 17):
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * np.abs(expected).max())
        expected, got = theirs.decode(a, 0, token), ours.decode(b, 0, token)


def test_without_the_library_matmulnbits_serves(tiny_int4, monkeypatch, tmp_path):
    monkeypatch.setenv("R1BOX_CACHE", str(tmp_path))
    monkeypatch.setattr(int4_kernel, "INSTALLED", tmp_path / "absent.so")
    decoder = Decoder(load_manifest(tiny_int4), threads=1)
    assert decoder.int4_matmuls == 0
    cache = decoder.new_cache(1, 64)
    assert decoder.prefill(cache, 0, [1, 2, 3]).shape == (decoder.vocab,)


@needs_kernel
def test_a_broken_library_leaves_matmulnbits_serving(tiny_int4, monkeypatch, tmp_path):
    monkeypatch.setenv("R1BOX_CACHE", str(tmp_path))
    int4_kernel.cache_library().parent.mkdir(parents=True)
    int4_kernel.cache_library().write_bytes(b"not a shared library")
    decoder = Decoder(load_manifest(tiny_int4), threads=1)
    assert decoder.int4_matmuls == 0
    assert decoder.prefill(decoder.new_cache(1, 64), 0, [1, 2, 3]).shape == (decoder.vocab,)


def test_cpu_flags_are_read_from_cpuinfo():
    assert int4_kernel.cpu_path("flags\t\t: fpu sse2 avx") is None
    assert int4_kernel.cpu_path("flags\t\t: fpu sse2 avx2") is None  # FMA too: the scales are applied with it
    assert int4_kernel.cpu_path("flags\t\t: fpu sse2 avx2 fma") is None  # and F16C: they are stored in fp16
    line = "flags\t\t: fpu sse2 avx2 fma f16c avx512f avx512bw avx512vl"
    assert int4_kernel.cpu_path(line) == "avx2"
    assert int4_kernel.cpu_path(line + " avx512_vnni") == "avx512-vnni"


@pytest.mark.slow
@needs_kernel
def test_real_model_answers_as_matmulnbits_does(library):
    """The 0.5B, teacher-forced on MatMulNBits's own greedy answer: the same top-1 wherever MatMulNBits leads by
    half a logit (a near tie flips under any change of arithmetic, onnxruntime's own graph optimizations included)."""
    from export.artifacts import cached_artifact

    manifest = load_manifest(cached_artifact("qwen2.5-coder-0.5b-instruct"))
    theirs, ours = Decoder(manifest, threads=2, int4=False), Decoder(manifest, threads=2, int4=True)
    assert ours.int4_matmuls > 0
    tokenizer = ChatTokenizer(manifest)
    prompt = tokenizer.encode(tokenizer.render([{"role": "user", "content": "How do I open a savings account?"}]))
    a, b = theirs.new_cache(1, 512), ours.new_cache(1, 512)
    expected, got = theirs.prefill(a, 0, prompt), ours.prefill(b, 0, prompt)
    sure = same = 0
    for _ in range(64):
        top2 = np.partition(expected, -2)[-2:]
        if top2[1] - top2[0] >= 0.5:
            sure += 1
            same += int(expected.argmax() == got.argmax())
        token = int(expected.argmax())
        expected, got = theirs.decode(a, 0, token), ours.decode(b, 0, token)
    assert sure >= 32 and same == sure, f"{same} of {sure} confident positions agree"

"""r1box's int4 MatMul for x86 CPUs (kernels/matmul_int4.cc), swapped in for MatMulNBits at load.

onnxruntime's MatMulNBits (int8 activations, accuracy level 4) unpacks each block of weights for one row of
activations at a time, so a batched decode step of 16 sequences costs almost 16 single steps: on two cores of this
project's EPYC it reaches 106 / 161 G multiply-adds/s at 1 / 16 rows. Our op does the same arithmetic (the same
int8 blocks of activations, whole-number dot products, the two scales after) with weights laid out for vpdpbusd:
each 32-bit lane is an output column, so one unpacked block serves every row and nothing is summed across lanes.
Its outputs equal MatMulNBits's to float rounding (about 1e-7 of the largest); a single row runs within 3 % of it.
On CPUs without AVX512-VNNI (AMD before Zen 4, Intel before Ice Lake) the same layout is read with AVX2's
vpmaddubsw and vpmaddwd, half a tile at a time; the library holds both paths and picks one at load.

A decode step reads every weight once, so its time is bytes: the layout holds each block's scales and zero points
in fp16 (one cache line a tile's block; 0.125 bytes a weight at block 32 instead of float's 0.25), and an 8-bit
MatMulNBits whose levels are all below 64 (the export's 6-bit output projection) is read at 6 bits, 0.75 bytes a
weight instead of 1: four bits beside the int4 nibbles and two more in a plane after them.

The artifact stays standard MatMulNBits (the CUDA provider and ARM boxes run it as it is): at load, on a CPU that
has the instructions and with the library built, each eligible MatMulNBits node becomes ai.r1box's MatMulInt4 and
its weights are repacked once into new buffers that onnxruntime uses in place (SessionOptions.add_initializer);
the original tensors are read one at a time and dropped, so the peak and the resident memory stay MatMulNBits's.

The library is built once per source (`just kernel`, or `python -m appliance.model.int4_kernel`) with g++ against
onnxruntime's C API headers: the PyPI wheels ship none, Debian's libonnxruntime-dev does (trixie's, fetched by
checksum). The C API is versioned and append-only, so a library built on 1.21's headers runs in later onnxruntimes.
The firmware image carries it at INSTALLED.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance.errors import ArtifactError, R1boxError

log = logging.getLogger(__name__)

DOMAIN = "ai.r1box"
OP = "MatMulInt4"
SOURCE = Path(__file__).with_name("kernels") / "matmul_int4.cc"
INSTALLED = Path("/usr/lib/r1box/libr1box_int4.so")
HEADERS_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
               "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
CPU_FLAGS = ("avx2", "fma", "f16c")  # the least the kernel needs; the AVX512-VNNI path is taken where the CPU has it
VNNI_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
# each path carries its own target attributes: the library itself loads on any x86-64
COMPILE = ("-O3", "-std=c++17", "-fPIC", "-shared")
LANES = 16  # output columns per tile: one zmm register of 32-bit sums


def cache_dir() -> Path:
    return Path(os.environ.get("R1BOX_CACHE") or Path.home() / ".cache" / "r1box") / "kernels"


def _key(defines: tuple[str, ...]) -> str:
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(COMPILE + defines).encode() + HEADERS_DEB[1].encode())
    return digest.hexdigest()[:16]


def cache_library(defines: tuple[str, ...] = ()) -> Path:
    return cache_dir() / f"libr1box_int4-{_key(defines)}.so"


def built_library() -> Path | None:
    """The library for this source: the cache's build, else the firmware image's copy."""
    for path in (cache_library(), INSTALLED):
        if path.is_file():
            return path
    return None


def cpu_path(cpuinfo: str | None = None) -> str | None:
    """Which of the kernel's paths this CPU runs: "avx512-vnni", "avx2", or None (not x86, or neither)."""
    if cpuinfo is None:
        if platform.machine() not in ("x86_64", "AMD64"):
            return None
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    if all(flag in flags for flag in VNNI_FLAGS):
        return "avx512-vnni"
    return "avx2" if all(flag in flags for flag in CPU_FLAGS) else None


def cpu_supports(cpuinfo: str | None = None) -> bool:
    return cpu_path(cpuinfo) is not None


def library_path(library: Path) -> str | None:
    """The path a built library takes on this CPU, as it says itself ("avx512-vnni", "avx2"; None for neither)."""
    chooser = ctypes.CDLL(str(library)).r1box_int4_isa
    chooser.restype = ctypes.c_char_p
    name = chooser()
    return name.decode() if name else None


def unavailable() -> str | None:
    """Why the decoder does not serve the kernel here, or None when it does."""
    if cpu_path() is None:
        return f"this CPU lacks {'/'.join(CPU_FLAGS)}"
    if built_library() is None:
        return "its library is not built (just kernel)"
    return None


def build(defines: tuple[str, ...] = ()) -> Path:
    """Compile the library into the cache (a no-op when this source is built); returns its path. defines: extra
    -D flags, for the tests' AVX2-only variant (-DR1BOX_AVX2_ONLY), which lets a VNNI machine check that path too."""
    target = cache_library(defines)
    if target.is_file():
        return target
    compiler = shutil.which("g++")
    if compiler is None:
        raise R1boxError("building the int4 kernel needs g++: apt-get install g++ (or `just kernel`, which does).")
    target.parent.mkdir(parents=True, exist_ok=True)
    headers = _headers()
    print(f"building the int4 kernel into {target}", file=sys.stderr)
    partial = target.with_suffix(".partial")
    done = subprocess.run([compiler, *COMPILE, *defines, f"-I{headers}", str(SOURCE), "-o", str(partial)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise R1boxError(f"g++ could not build {SOURCE.name}:\n{done.stderr[-2000:]}")
    os.replace(partial, target)
    return target


def _headers() -> Path:
    """onnxruntime's C/C++ API headers, from the pinned libonnxruntime-dev package (whatever a machine has
    installed, the library is then the same one the cache key names)."""
    include = cache_dir() / f"onnxruntime-headers-{HEADERS_DEB[1][:12]}"
    if (include / "onnxruntime_cxx_api.h").is_file():
        return include
    url, sha256 = HEADERS_DEB
    print(f"fetching onnxruntime's headers: {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            package = response.read()
    except OSError as e:
        raise R1boxError(f"cannot fetch {url} ({e}): the int4 kernel needs onnxruntime's headers; install "
                         "libonnxruntime-dev from Debian trixie or reach deb.debian.org.") from None
    if hashlib.sha256(package).hexdigest() != sha256:
        raise R1boxError(f"{url} does not match its checksum: refusing it.")
    with tempfile.TemporaryDirectory() as work:
        deb = Path(work) / "headers.deb"
        deb.write_bytes(package)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(work) / "root")], check=True)
        shutil.rmtree(include, ignore_errors=True)
        shutil.copytree(Path(work) / "root/usr/include/onnxruntime", include)
    return include


@dataclass
class Rewritten:
    """A graph whose eligible MatMulNBits read repacked weights; `arrays` must outlive the session."""

    model: bytes
    names: list[str] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    matmuls: int = 0
    rounded: int = 0  # MatMuls whose scales or zero points fp16 could not hold exactly


def eligible(attrs: dict, inputs: int, six_bit: bool = False) -> bool:
    """MatMulNBits nodes this op computes exactly as onnxruntime would: 4 bits (or, in an artifact whose wide layers
    are 6-bit, 8 bits whose levels are all below 64, which rewrite() checks: read at 6), int8 activations, whole
    blocks of a multiple of 16 along K (up to 256), tiles of 16 columns, zero points (whole or float) or none, no
    bias or group index."""
    k, n, block = attrs.get("K", 0), attrs.get("N", 0), attrs.get("block_size", 0)
    return (attrs.get("bits", 4) in ((4, 8) if six_bit else (4,)) and attrs.get("accuracy_level", 0) == 4
            and inputs in (3, 4)
            and 16 <= block <= 256 and block % 16 == 0 and k % block == 0 and n % LANES == 0 and n > 0)


def pack(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, n: int, k: int, block: int,
         bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits's tensors → MatMulInt4's, by the library's own packer (numpy's transposes took 5.5 s on the
    1.5B's 113 MatMuls at load, C takes a fraction): weights [N/16][K/block][block/8][64] (byte 4j+i of group g:
    column j's k = 8g+i low, 8g+4+i high; at 6 bits 32 bytes of top bits follow each group), and fp16 params
    [N/16][K/block][2][16], a block's 16 scales then its 16 zero points. bits 6 takes an 8-bit MatMulNBits whose
    levels are below 64. Scales that are not fp16 already (artifacts exported before r1box wrote them so) are
    rounded."""
    library = ctypes.CDLL(str(built_library()))
    blocks = k // block
    b = np.ascontiguousarray(b, np.uint8)
    # float zero points (one a block, not whole levels: a GGUF's Q4_K offsets), 4-bit ones two a byte, 8-bit ones
    # a byte each, or none
    float_zeros = zero_points is not None and zero_points.dtype == np.float32
    zero_size = n * (blocks if float_zeros or bits == 6 else (blocks + 1) // 2)
    if b.size != n * k // (1 if bits == 6 else 2) or scales.size != n * blocks or (
            zero_points is not None and zero_points.size != zero_size):
        raise ArtifactError(f"a MatMulNBits of N={n}, K={k}, block {block} has tensors of other sizes; export the "
                            "model again.")
    if zero_points is None:
        zeros = np.full(n * blocks, 8 if bits == 4 else 128, np.float16)  # MatMulNBits's defaults (4 and 8 bits)
    elif float_zeros or bits == 6:
        zeros = zero_points.astype(np.float16)
    else:
        nibbles = zero_points.reshape(n, -1)
        zeros = np.stack([nibbles & 15, nibbles >> 4], -1).reshape(n, -1)[:, :blocks].astype(np.float16)
    scales16 = np.ascontiguousarray(scales, np.float32).astype(np.float16)
    if not (np.isfinite(scales16).all() and np.isfinite(zeros).all()):
        raise ArtifactError(f"a MatMulNBits of N={n}, K={k} has scales or zero points beyond fp16's range")
    weights, params = np.empty(n * k * bits // 8, np.uint8), np.empty(2 * n * blocks, np.float16)
    pointer = lambda array: ctypes.c_void_p(array.ctypes.data)
    library.r1box_int4_pack(pointer(b), pointer(scales16), pointer(np.ascontiguousarray(zeros)), ctypes.c_int64(n),
                            ctypes.c_int64(k), ctypes.c_int64(block), ctypes.c_int64(bits), pointer(weights),
                            pointer(params))
    return weights, params


def fp16_exact(values: np.ndarray) -> bool:
    """Whether float values survive fp16 unchanged: the kernel's scales and zero points then equal the artifact's."""
    return bool(np.array_equal(values.astype(np.float16).astype(np.float32), values))


def rewrite(graph_path: Path, six_bit: bool = False) -> Rewritten:
    """The graph at graph_path with its eligible MatMulNBits as MatMulInt4, their weights repacked. six_bit: the
    artifact's 8-bit MatMulNBits hold 6-bit levels (its manifest says so); others' real 8-bit weights are not read."""
    import onnx
    from onnx import helper

    model = onnx.load(str(graph_path), load_external_data=False)
    graph = model.graph
    tensors = {t.name: t for t in graph.initializer}
    out = Rewritten(b"")
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not (node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
                and eligible(attrs, len(node.input), six_bit)
                and all(name in tensors for name in node.input[1:])
                and tensors[node.input[1]].data_location == onnx.TensorProto.EXTERNAL
                and (len(node.input) < 4 or tensors[node.input[3]].data_type in (onnx.TensorProto.UINT8,
                                                                                  onnx.TensorProto.FLOAT))):
            nodes.append(node)
            continue
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        b, scales, *zero_points = (_read(tensors[name], graph_path.parent) for name in node.input[1:])
        bits = 4 if attrs.get("bits", 4) == 4 else 6
        if bits == 6 and b.max() > 63:  # levels of a whole byte: onnxruntime's 8-bit kernel keeps them
            nodes.append(node)
            continue
        zeros = zero_points[0] if zero_points else None
        packed = pack(b, scales, zeros, n, k, block, bits)
        out.rounded += not (fp16_exact(scales) and (zeros is None or zeros.dtype != np.float32 or fp16_exact(zeros)))
        names = [f"{node.input[1]}.{suffix}" for suffix in ("int4x16", "params16")]
        for name, array in zip(names, packed):
            graph.initializer.append(_declared(name, array, tensors[node.input[1]]))
        out.names += names
        out.arrays += packed
        nodes.append(helper.make_node(OP, [node.input[0], *names], list(node.output), name=node.name, domain=DOMAIN,
                                      K=k, N=n, block_size=block, bits=bits))
        out.matmuls += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unread_initializers(graph)
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    out.model = model.SerializeToString()
    return out


def whole_zero_points(graph_path: Path) -> Rewritten:
    """The graph at graph_path with float zero points (a GGUF's Q4_K offsets, export/gguf_blocks.py) rounded to
    whole 4-bit levels, for where this kernel cannot serve: onnxruntime's CPU MatMulNBits takes float zero points
    only by dequantizing the whole matrix at every call (measured 34 ms against 0.45 for a 1536 × 8960 step). The
    weights then differ from the GGUF's by up to half a level's offset a block."""
    import onnx
    from onnx import helper

    model = onnx.load(str(graph_path), load_external_data=False)
    tensors = {t.name: t for t in model.graph.initializer}
    out = Rewritten(b"")
    for node in model.graph.node:
        if not (node.op_type == "MatMulNBits" and len(node.input) >= 4 and node.input[3] in tensors
                and tensors[node.input[3]].data_type == onnx.TensorProto.FLOAT):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits", 4) != 4:
            continue
        blocks = -(-attrs["K"] // attrs["block_size"])
        levels = np.clip(np.rint(_read(tensors[node.input[3]], graph_path.parent)), 0, 15).astype(np.uint8)
        levels = np.pad(levels.reshape(attrs["N"], blocks), ((0, 0), (0, blocks % 2)))
        nibbles = np.ascontiguousarray((levels[:, 0::2] | (levels[:, 1::2] << 4)).ravel())
        name = f"{node.input[3]}.whole"
        model.graph.initializer.append(_declared(name, nibbles, tensors[node.input[1]]))
        node.input[3] = name
        out.names.append(name)
        out.arrays.append(nibbles)
        out.matmuls += 1
    _drop_unread_initializers(model.graph)
    out.model = model.SerializeToString()
    return out


def _drop_unread_initializers(graph) -> None:
    """The declarations of tensors no node reads any more (the replaced originals), so onnxruntime looks for none."""
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _declared(name: str, array: np.ndarray, beside):
    """A TensorProto that names its data as external, in the file of `beside`: onnxruntime requires every
    initializer to be declared, add_initializer supplies the bytes, and the file is never read for it."""
    from onnx import TensorProto, helper

    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=[array.size])
    tensor.data_location = TensorProto.EXTERNAL
    location = next((e.value for e in beside.external_data if e.key == "location"), "")
    for key, value in (("location", location), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _read(tensor, folder: Path) -> np.ndarray:
    """An initializer's values, from its external file or the graph itself. Read, not mapped: mapped pages of the
    whole file would stay resident beside the repacked copies until the last tensor is done."""
    from onnx import helper, numpy_helper

    if tensor.data_location != tensor.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(info.get("length", 0)) // np.dtype(dtype).itemsize or int(np.prod(tensor.dims))
    return np.fromfile(folder / info["location"], dtype, count, offset=int(info.get("offset", 0)))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if platform.machine() not in ("x86_64", "AMD64"):
        print(f"the int4 kernel is for x86-64; on {platform.machine()} onnxruntime's MatMulNBits serves",
              file=sys.stderr)
        return
    try:
        print(build())
    except R1boxError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    if not cpu_supports():
        print(f"note: this CPU lacks {'/'.join(CPU_FLAGS)}; the library is for boxes that have them",
              file=sys.stderr)
    else:
        print(f"this CPU runs the kernel's {cpu_path()} path", file=sys.stderr)


if __name__ == "__main__":
    main()

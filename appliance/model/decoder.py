"""An ONNX Runtime session over an artifact's decoder graph, driven only by the manifest's names and shapes.

One call runs one step for a contiguous block of cache slots: a prefill chunk of one sequence, or one decode token
for each of several sequences. The KV stays in the cache's buffers (bound, never copied); only token ids, the
attention mask and the last position's logits cross the boundary.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnxruntime as ort

from appliance.errors import ArtifactError
from appliance.model import int4_kernel
from appliance.model.hugepages import collapse_anonymous_memory
from appliance.model.kv_cache import KvCache
from appliance.model.manifest import Manifest

log = logging.getLogger(__name__)

_NP = {"float32": np.float32, "float16": np.float16}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pick_provider(wanted: str = "auto") -> str:
    """'auto' takes CUDA when this onnxruntime build has it, else the CPU; 'cpu' and 'cuda' force one."""
    available = ort.get_available_providers()
    if wanted == "auto":
        return "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if wanted not in PROVIDERS:
        raise ArtifactError(f"unknown execution provider {wanted!r}; use auto, cpu or cuda.")
    if PROVIDERS[wanted] not in available:
        raise ArtifactError(f"this onnxruntime has no {PROVIDERS[wanted]} (it has {', '.join(available)}); "
                            "install onnxruntime-gpu for CUDA (just install-gpu) or use provider = \"cpu\".")
    return wanted


class Decoder:
    def __init__(self, manifest: Manifest, threads: int | None = None, provider: str = "cpu", huge_pages: bool = True,
                 int4: bool = True):
        if manifest.kv.kind != "gqa-shared":
            raise ArtifactError(f"{manifest.directory}: KV layout {manifest.kv.kind!r} is not the shared-buffer "
                                "layout this runtime drives. Export the model again with this version of r1box.")
        if provider == "cuda" and manifest.kv.dtype != "float16":
            raise ArtifactError(f"{manifest.directory}: a {manifest.kv.dtype} artifact; onnxruntime's CUDA attention "
                                "takes float16 only. Export it with --dtype float16 for the GPU.")
        self.manifest = manifest
        self.io, kv = manifest.io, manifest.kv
        self.layers = len(kv.past_key)
        self.kv_heads, self.head_dim = manifest.arch["kv_heads"], manifest.arch["head_dim"]
        self.vocab = manifest.arch["vocab"]
        self.kv_dtype = _NP[kv.dtype]
        self.kv_names = [pair for layer in range(self.layers) for pair in (
            (kv.past_key[layer], kv.present_key[layer]), (kv.past_value[layer], kv.present_value[layer]))]
        self.threads = threads or default_threads()
        try:
            # the kernel takes float32 activations: a float16 artifact on the CPU (CUDA's, fallen back) keeps
            # onnxruntime's MatMulNBits
            self.session = self._session(provider, int4 and provider == "cpu" and kv.dtype == "float32")
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ArtifactError(f"{manifest.graph_path}: onnxruntime cannot load the graph on {provider} ({e}). "
                                "Export the model again with this version of r1box.") from None
        self.provider = provider
        self.device = "cuda" if provider == "cuda" else "cpu"
        if huge_pages and provider == "cpu":
            collapse_anonymous_memory()  # the weights are in place now; the KV cache comes later and stays small

    def _session(self, provider: str, int4: bool) -> ort.InferenceSession:
        """The artifact's graph, or on a CPU that has the instructions its MatMulNBits as r1box's int4 kernel
        (appliance/model/int4_kernel.py)."""
        self.int4_matmuls, self.int4_path, self._int4_weights = 0, None, ()
        why_not = int4_kernel.unavailable() if int4 else None
        if int4 and not why_not:
            try:
                return self._int4_session(provider)
            except Exception as e:  # the kernel is a speed-up, never a reason not to serve
                log.warning("int4 kernel: not used (%s); onnxruntime's MatMulNBits serves", e)
        elif why_not:
            log.info("int4 kernel: not used (%s); onnxruntime's MatMulNBits serves", why_not)
        if provider == "cuda":
            _load_cuda_libraries()
        if provider == "cpu" and self.manifest.kept_gguf_blocks:
            rounded = int4_kernel.whole_zero_points(self.manifest.graph_path)
            log.warning("int4: %d MatMuls keep a GGUF's blocks, whose float zero points onnxruntime's CPU kernel "
                        "computes slowly; rounded to whole levels here, which reads below the artifact's parity "
                        "report: for this machine, export with --no-keep-gguf-blocks", rounded.matmuls)
            return self._rewritten_session(provider, rounded)
        return ort.InferenceSession(str(self.manifest.graph_path), self._options(), providers=[PROVIDERS[provider]])

    def _int4_session(self, provider: str) -> ort.InferenceSession:
        rewritten = int4_kernel.rewrite(self.manifest.graph_path, six_bit=self.manifest.six_bit_layers)
        library = int4_kernel.built_library()
        session = self._rewritten_session(provider, rewritten, library)
        self.int4_matmuls, self.int4_path = rewritten.matmuls, int4_kernel.library_path(library)
        log.info("int4 kernel: %d MatMuls on r1box's kernel (its %s path)", rewritten.matmuls, self.int4_path)
        if rewritten.rounded:
            log.warning("int4 kernel: %d MatMuls' scales rounded to fp16, the kernel's (the artifact predates "
                        "fp16-exact scales): its answers may differ from its parity report by near ties; export "
                        "it again", rewritten.rounded)
        return session

    def _rewritten_session(self, provider: str, rewritten: int4_kernel.Rewritten, library=None
                           ) -> ort.InferenceSession:
        """A graph rewritten at load; its new tensors stay referenced for the session's life."""
        options = self._options()
        if library:
            options.register_custom_ops_library(str(library))
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(self.manifest.graph_path.parent))
        values = [ort.OrtValue.ortvalue_from_numpy(array) for array in rewritten.arrays]
        for name, value in zip(rewritten.names, values):
            options.add_initializer(name, value)
        session = ort.InferenceSession(rewritten.model, options, providers=[PROVIDERS[provider]])
        self._int4_weights = (rewritten.arrays, values)
        return session

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return options

    def new_cache(self, slots: int, max_length: int) -> KvCache:
        max_length = min(max_length, self.manifest.arch["context"])
        return KvCache(self.layers, self.kv_heads, self.head_dim, slots, max_length, self.kv_dtype, self.device)

    def step(self, cache: KvCache, first: int, tokens: np.ndarray, new_lengths: np.ndarray) -> np.ndarray:
        """Run tokens [rows, S] for slots first..first+rows-1; new_lengths[r] is row r's length after this step.

        Row r's tokens land at positions new_lengths[r]-S … new_lengths[r]-1 of its slot. Returns the logits of
        each row's last position, [rows, vocab] float32. The cache's lengths are the caller's to advance: a batch
        may carry idle rows whose dummy token must not count.
        """
        rows, new = tokens.shape
        assert new_lengths.shape == (rows,) and int(new_lengths.max()) <= cache.max_length
        assert np.all(new_lengths - new >= 0)
        mask = (np.arange(int(new_lengths.max()))[None, :] < new_lengths[:, None]).astype(np.int64)
        binding = self._binding(cache, first, rows)
        binding.bind_cpu_input(self.io["input_ids"], np.ascontiguousarray(tokens, np.int64))
        binding.bind_cpu_input(self.io["attention_mask"], mask)
        logits = np.empty((rows, 1, self.vocab), self.kv_dtype)  # written by the run itself, no copy after
        binding.bind_output(self.io["logits"], "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits.reshape(rows, -1).astype(np.float32, copy=False)

    def _binding(self, cache: KvCache, first: int, rows: int) -> ort.IOBinding:
        """The KV buffers' bindings depend only on the cache and the row range: made once per range and kept on
        the cache, so they live exactly as long as the memory they point to."""
        key = (id(self.session), first, rows)
        if key not in cache.bindings:
            binding = self.session.io_binding()
            cache.bind(binding, self.kv_names, first, rows)
            cache.bindings[key] = binding
        return cache.bindings[key]

    def prefill(self, cache: KvCache, slot: int, tokens: list[int] | np.ndarray, chunk: int = 0) -> np.ndarray:
        """Append tokens to a slot (after whatever it holds), in chunks of `chunk` (0: at once); last logits [vocab]."""
        tokens = np.asarray(tokens, np.int64)
        assert tokens.size >= 1
        chunk = chunk or tokens.size
        for start in range(0, tokens.size, chunk):
            part = tokens[start:start + chunk]
            length = cache.lengths[slot] + part.size
            logits = self.step(cache, slot, part[None, :], np.array([length]))
            cache.lengths[slot] = length
        return logits[0]

    def decode(self, cache: KvCache, slot: int, token: int) -> np.ndarray:
        """One sequence's decode step: append the token it just chose; the logits for the next one [vocab]."""
        return self.prefill(cache, slot, [token])


def _load_cuda_libraries() -> None:
    """CUDA and cuDNN from the nvidia-* wheels beside onnxruntime-gpu (`onnxruntime-gpu[cuda,cudnn]`, what
    `just install-gpu` installs), which the dynamic loader does not search by itself; where they are not there,
    onnxruntime looks on the loader's own path as before."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def open_decoder(manifest: Manifest, provider: str = "auto", threads: int | None = None,
                 huge_pages: bool = True, int4: bool = True) -> tuple[Decoder, str | None]:
    """The decoder on the wanted provider; if CUDA will not start, the CPU one and the reason it had to be."""
    chosen = pick_provider(provider)
    try:
        return Decoder(manifest, threads, chosen, huge_pages, int4), None
    except ArtifactError as e:
        if chosen == "cpu":
            raise
        log.error("the CUDA provider did not start (%s); serving on the CPU instead", e)
        return Decoder(manifest, threads, "cpu", huge_pages, int4), f"CUDA did not start: {e}"[:300]

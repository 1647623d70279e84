"""An ONNX Runtime session over an artifact's decoder graph, driven only by the manifest's names and shapes."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnxruntime as ort

from appliance.errors import ArtifactError
from appliance.manifest import Manifest

log = logging.getLogger(__name__)

_NP = {"float32": np.float32, "float16": np.float16}


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OnnxDecoder:
    """One forward step: token ids plus the past KV in, logits plus the present KV out."""

    def __init__(self, manifest: Manifest, threads: int | None = None, providers: list[str] | None = None):
        self.manifest = manifest
        self.io, self.kv = manifest.io, manifest.kv
        self.layers = len(self.kv.past_key)
        self.kv_heads, self.head_dim = manifest.arch["kv_heads"], manifest.arch["head_dim"]
        self.kv_dtype = _NP[self.kv.dtype]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(manifest.graph_path), options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ArtifactError(f"{manifest.graph_path}: onnxruntime cannot load the graph ({e}). Export the "
                                "model again with this version of r1box.") from None
        self.provider = self.session.get_providers()[0]
        self.output_names = [self.io["logits"]] + [n for pair in zip(self.kv.present_key, self.kv.present_value)
                                                   for n in pair]

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        # [batch, kv_heads, 0, head_dim] for each layer's key and value, in present order
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, self.kv_dtype) for _ in range(2 * self.layers)]

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray], attention_mask: np.ndarray | None = None
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids: [B, T]; past: 2·layers arrays [B, kv_heads, P, head_dim] → logits [B, T, V], present (P+T)."""
        batch, new = input_ids.shape
        past_len = past[0].shape[2]
        assert all(p.shape == (batch, self.kv_heads, past_len, self.head_dim) for p in past)
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + new), np.int64)
        position_ids = np.cumsum(attention_mask, axis=1)[:, past_len:] - 1
        feeds = {self.io["input_ids"]: input_ids.astype(np.int64), self.io["attention_mask"]: attention_mask,
                 self.io["position_ids"]: np.maximum(position_ids, 0).astype(np.int64)}
        for layer in range(self.layers):
            feeds[self.kv.past_key[layer]] = past[2 * layer]
            feeds[self.kv.past_value[layer]] = past[2 * layer + 1]
        logits, *present = self.session.run(self.output_names, feeds)
        return logits, present

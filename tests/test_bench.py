"""`python -m appliance.bench.run` (what `just bench` runs) on the real 0.5B, r1box's side only (onnxruntime-genai's
anchor needs its own virtualenv and model build, which only `just bench` makes): it ends with the one JSON line of
the issue's shape, writes the same report beside its latency plot, and keeps no token ids in them. No figure is
judged here; the targets are judged by `just bench` itself."""

import json
import subprocess
import sys

import onnxruntime as ort
import pytest

from appliance.model import int4_kernel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifact():
    from export.artifacts import cached_artifact

    return cached_artifact("qwen2.5-coder-0.5b-instruct")


def test_bench_ends_with_the_json_report(artifact, tmp_path):
    run = subprocess.run([sys.executable, "-m", "appliance.bench.run", "--artifact", str(artifact), "--threads", "2",
                          "--runs", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["model"] == "qwen2.5-coder-0.5b-instruct" and report["provider"] == "cpu"
    assert report["threads"] == 2 and report["genai"] is None
    assert report["onnxruntime"] == ort.__version__ and report["gpu"] is None
    # the 0.5B's int4 MatMuls (o_proj, gate_up) run on r1box's kernel wherever it can run
    assert (report["int4_kernel_matmuls"] > 0) == (int4_kernel.unavailable() is None)
    assert report["int4_kernel_path"] == (int4_kernel.cpu_path() if report["int4_kernel_matmuls"] else None)
    r1 = report["r1box"]
    latency = {"ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "decode_tok_s"}
    assert latency <= set(r1["c1"]) and all(r1["c1"][k] > 0 for k in latency)
    for n in ("c4", "c16"):
        assert r1[n]["throughput_tok_s"] > 0 and r1[n]["ttft_ms_p99"] >= r1[n]["ttft_ms_p50"] > 0
        assert 0 <= r1[n]["identical_rows"] <= int(n[1:])
    assert r1["prefix_reuse"]["ttft_ms_cold"] > 0 and r1["prefix_reuse"]["ttft_ms_warm"] > 0
    assert r1["prompts"]["short"]["prompt_tokens"] < 64 <= 512 <= r1["prompts"]["long"]["prompt_tokens"]
    assert 0 < r1["peak_rss_mb"] < 24 * 1024
    assert set(report["ratios"]) == {"throughput_c16_vs_c1", "end_to_end_c16_vs_c1", "prefix_warm_vs_cold"}
    assert "generated_ids" not in run.stdout
    saved = json.loads((tmp_path / "bench-qwen2.5-coder-0.5b-instruct.json").read_text())
    assert saved == report
    plot = (tmp_path / "latency-qwen2.5-coder-0.5b-instruct.svg").read_text()
    assert plot.startswith("<svg") or plot.startswith("<?xml")
    table = run.stdout.splitlines()[:-1]  # the readable table, then the plot's path, before the JSON line
    assert f"c16 aggregate decode tok/s{r1['c16']['throughput_tok_s']:>12}" in "\n".join(table)
    assert table[-1] == f"plot: {tmp_path / 'latency-qwen2.5-coder-0.5b-instruct.svg'}"


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_without_onnxruntime_gpu_says_how_to_get_it(tmp_path):
    run = subprocess.run([sys.executable, "-m", "appliance.bench.run", "--artifact", str(tmp_path), "--provider",
                          "cuda"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "no CUDAExecutionProvider" in run.stderr and "just install-gpu" in run.stderr

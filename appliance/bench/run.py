"""`just bench`: r1box's engine against onnxruntime-genai and llama.cpp on the same model, prompts, threads and
machine.

Both sides get the same token ids (made here by the artifact's tokenizer and chat template), greedy decoding, 128 new
tokens with end-of-sequence ignored, a warm-up first. r1box is measured at concurrency 1, 4 and 16 (aggregate
tokens/s, time to first token and inter-token latency), on a second conversation turn with and without prefix reuse,
and for peak resident memory; onnxruntime-genai runs in its own virtualenv (anchor.py), llama.cpp as its own
server on the GGUF the artifact was exported from (llama.py). The last line printed is one JSON document; a plot of
latency against concurrency is saved beside it. Single-stream decode, the figure the sides are judged on, is then
measured again with the sides taking turns (ROUNDS times each, on the short prompt), and each side's median over all
its runs is reported: this machine drifts by 10 % and more over minutes, so one sitting each would measure the
drift as much as the engines. Each ratio "vs_best" divides r1box's figure by the better of the two peers'.

    python -m appliance.bench.run --artifact DIR [--anchor-python PY --anchor-model DIR] [--llama-bin DIR --gguf F]
                                  [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from appliance.bench import llama as llama_cpp
from appliance.bench.figures import decode_rate, decode_throughput, pct, peak_rss_mb, record
from appliance.config import EngineConfig
from appliance.errors import ArtifactError
from appliance.model.decoder import Decoder, default_threads, pick_provider
from appliance.model.engine import PREFILL_CHUNK, Engine, Finish
from appliance.model.manifest import load_manifest
from appliance.model.sampling import SamplingParams
from appliance.model.tokenizer import ChatTokenizer

NEW_TOKENS = 128
CONCURRENCY = (1, 4, 16)
ROUNDS = 3  # turns each side takes at single-stream decode after the main sittings
_TEXT = ("A branch office of a bank answers its customers on WeChat. They ask about opening hours, lost cards, "
         "transfers abroad, interest rates and the documents a loan needs. ")


def make_conversations(tok: ChatTokenizer) -> dict[str, list[dict]]:
    """Two first turns: about 32 and about 512 prompt tokens once rendered."""
    body = ""
    while len(tok.encode(tok.render([{"role": "user", "content": body + "Summarize."}]))) < 512:
        body += _TEXT
    return {"short": [{"role": "user", "content": "Write a Python function that adds two numbers."}],
            "long": [{"role": "user", "content": body + "Summarize."}]}


async def _one(engine: Engine, prompt: list[int], params: SamplingParams) -> dict:
    start = time.perf_counter()
    stamps, tokens, finish = [], [], None
    async for item in engine.generate(prompt, params):
        if isinstance(item, Finish):
            finish = item
            break
        stamps.append(time.perf_counter())
        tokens.append(item)
    return record(start, stamps, tokens, reused=finish.reused_tokens)


async def measure_r1box(decoder: Decoder, tok: ChatTokenizer, conversations: dict[str, list[dict]], runs: int,
                        prefill_chunk: int = EngineConfig.prefill_chunk) -> dict:
    prompts = {name: tok.encode(tok.render(messages)) for name, messages in conversations.items()}
    params = SamplingParams(max_tokens=NEW_TOKENS)
    # stop ids empty: every run makes exactly NEW_TOKENS, as genai's masked end-of-sequence does. The cache is the
    # service's own (4096 positions a slot, the default KV budget): memory follows the tokens held, not its size.
    engine = Engine(decoder, EngineConfig(max_batch=16, max_waiting=64, prefix_cache_mb=0, prefill_chunk=prefill_chunk),
                    stop_ids=frozenset())
    engine.start()
    out: dict = {"prompts": {}}
    try:
        for name, ids in prompts.items():
            await _one(engine, ids, SamplingParams(max_tokens=16))  # warm-up
            results = [await _one(engine, ids, params) for _ in range(runs)]
            decode = [decode_rate(r) for r in results]
            out["prompts"][name] = {
                "prompt_tokens": len(ids), "ttft_ms_p50": pct([r["ttft"] * 1000 for r in results], 50),
                "ttft_ms_p99": pct([r["ttft"] * 1000 for r in results], 99),
                "itl_ms_p50": pct([t * 1000 for r in results for t in r["itl"]], 50),
                "itl_ms_p99": pct([t * 1000 for r in results for t in r["itl"]], 99),
                "decode_tok_s": round(float(np.median(decode)), 2), "decode_runs": [round(d, 2) for d in decode],
                "generated_ids": results[0]["tokens"]}
            print(f"  r1box {name}: {out['prompts'][name]['ttft_ms_p50']} ms to first token, "
                  f"{out['prompts'][name]['decode_tok_s']} tokens/s", file=sys.stderr, flush=True)
        for n in CONCURRENCY:
            await asyncio.gather(*(_one(engine, prompts["short"], SamplingParams(max_tokens=8)) for _ in range(n)))
            results = await asyncio.gather(*(_one(engine, prompts["short"], params) for _ in range(n)))
            wall = max(r["end"] for r in results) - min(r["start"] for r in results)
            out[f"c{n}"] = {
                "throughput_tok_s": round(decode_throughput(results), 2),
                "end_to_end_tok_s": round(n * NEW_TOKENS / wall, 2),  # prefill of all n prompts included
                "ttft_ms_p50": pct([r["ttft"] * 1000 for r in results], 50),
                "ttft_ms_p99": pct([r["ttft"] * 1000 for r in results], 99),
                "itl_ms_p50": pct([t * 1000 for r in results for t in r["itl"]], 50),
                "itl_ms_p99": pct([t * 1000 for r in results for t in r["itl"]], 99),
                "identical_rows": sum(r["tokens"] == out["prompts"]["short"]["generated_ids"] for r in results)}
            print(f"  r1box c{n}: {out[f'c{n}']['throughput_tok_s']} tokens/s aggregate decode, "
                  f"{out[f'c{n}']['end_to_end_tok_s']} end to end", file=sys.stderr, flush=True)
        # concurrency 1 is the short prompt alone: its repeated runs give the steadier latency figures
        out["c1"].update({k: out["prompts"]["short"][k] for k in ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50",
                                                                  "itl_ms_p99", "decode_tok_s")})
    finally:
        engine.stop()
    out["prefix_reuse"] = await _second_turn(decoder, tok, conversations["long"], prefill_chunk)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


async def decode_again(decoder: Decoder, prompt: list[int], runs: int) -> list[float]:
    """r1box's single-stream decode once more, in its turn after genai's: the two sides then share the machine's
    state (clocks, caches, a neighbour's load) instead of r1box always going first."""
    engine = Engine(decoder, EngineConfig(max_batch=1, max_length=len(prompt) + NEW_TOKENS, prefix_cache_mb=0),
                    stop_ids=frozenset())
    engine.start()
    try:
        await _one(engine, prompt, SamplingParams(max_tokens=16))
        results = [await _one(engine, prompt, SamplingParams(max_tokens=NEW_TOKENS)) for _ in range(runs)]
    finally:
        engine.stop()
    return [decode_rate(r) for r in results]


async def _second_turn(decoder: Decoder, tok: ChatTokenizer, first_turn: list[dict], prefill_chunk: int) -> dict:
    """A follow-up question after the long turn: time to first token with the first turn's KV reused, and without."""
    result = {}
    for label, budget in (("cold", 0), ("warm", 256)):
        engine = Engine(decoder, EngineConfig(max_batch=1, max_length=1024, prefix_cache_mb=budget,
                                              prefill_chunk=prefill_chunk),
                        stop_ids=frozenset())
        engine.start()
        try:
            answer = await _one(engine, tok.encode(tok.render(first_turn)), SamplingParams(max_tokens=24))
            second_turn = first_turn + [{"role": "assistant", "content": tok.decode(answer["tokens"])},
                                        {"role": "user", "content": "And which documents does a loan need?"}]
            turn2 = await _one(engine, tok.encode(tok.render(second_turn)), SamplingParams(max_tokens=8))
        finally:
            engine.stop()
        result[f"ttft_ms_{label}"] = round(turn2["ttft"] * 1000, 2)
        result[f"reused_tokens_{label}"] = turn2["reused"]
    return result


def measure_genai(python: str, model: str, prompts: dict[str, list[int]], threads: int, runs: int,
                  huge_pages: bool = False, single: bool = False) -> dict:
    """genai's figures from its own process. huge_pages: glibc's malloc asks for transparent huge pages for it, the
    nearest genai gets to what r1box does for its weights. Its batch runs are skipped then, and when single."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    anchor = Path(__file__).with_name("anchor.py")
    command = [python, str(anchor), "--model", model, "--prompts", f.name, "--new-tokens", str(NEW_TOKENS),
               "--threads", str(threads), "--runs", str(runs)]
    if not (huge_pages or single):
        command += ["--batch", ",".join(map(str, CONCURRENCY)), "--batch-prompt", "short"]
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1") if huge_pages else None
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False, env=env)
    os.unlink(f.name)
    if proc.returncode != 0:
        raise SystemExit(f"bench: the onnxruntime-genai anchor failed (exit {proc.returncode}); see above.")
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    short = raw["prompts"]["short"]
    out = {"version": raw["version"], "prompts": raw["prompts"],
           "c1": {k: short[k] for k in ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99")}
           | {"decode_tok_s": short["decode_tokens_per_s"]}, "peak_rss_mb": raw["peak_rss_mb"]}
    for n, r in raw.get("batch", {}).get("results", {}).items():
        if "error" not in r:
            figures = {"throughput_tok_s": r["aggregate_decode_tokens_per_s"], "batch_ttft_ms": r["ttft_ms"]}
            out.setdefault(f"c{n}", {}).update(figures)
    return out


def ratios(r1: dict, genai: dict | None, llama: dict | None = None) -> dict:
    out = {"throughput_c16_vs_c1": round(r1["c16"]["throughput_tok_s"] / r1["c1"]["throughput_tok_s"], 2),
           "end_to_end_c16_vs_c1": round(r1["c16"]["end_to_end_tok_s"] / r1["c1"]["end_to_end_tok_s"], 2),
           "prefix_warm_vs_cold": round(r1["prefix_reuse"]["ttft_ms_warm"] / r1["prefix_reuse"]["ttft_ms_cold"], 3)}
    if genai:
        out["decode_c1_vs_genai"] = round(r1["c1"]["decode_tok_s"] / genai["c1"]["decode_tok_s"], 3)
        if "huge_pages" in genai:
            out["decode_c1_vs_genai_huge_pages"] = round(
                r1["c1"]["decode_tok_s"] / genai["huge_pages"]["c1"]["decode_tok_s"], 3)
        out["ttft_c1_vs_genai"] = round(r1["c1"]["ttft_ms_p50"] / genai["c1"]["ttft_ms_p50"], 3)
        out["ttft_long_vs_genai"] = round(r1["prompts"]["long"]["ttft_ms_p50"] / genai["prompts"]["long"]["ttft_ms"], 3)
        same = [_common_prefix(r1["prompts"][n]["generated_ids"], genai["prompts"][n].get("generated_ids", []))
                for n in r1["prompts"]]
        out["greedy_same_first_tokens"] = {n: min(s, 32) for n, s in zip(r1["prompts"], same)}
    if llama:
        out["decode_c1_vs_llama"] = round(r1["c1"]["decode_tok_s"] / llama["c1"]["decode_tok_s"], 3)
        out["greedy_same_first_tokens_llama"] = {
            n: min(_common_prefix(r1["prompts"][n]["generated_ids"], llama["prompts"][n]["generated_ids"]), 32)
            for n in r1["prompts"]}
    peers = [side for side in (genai, llama) if side]
    if peers:  # each figure against the better of the peers on it
        out["decode_c1_vs_best"] = round(r1["c1"]["decode_tok_s"] / max(p["c1"]["decode_tok_s"] for p in peers), 3)
        out["ttft_c1_vs_best"] = round(r1["c1"]["ttft_ms_p50"] / min(p["c1"]["ttft_ms_p50"] for p in peers), 3)
        out["ttft_long_vs_best"] = round(r1["prompts"]["long"]["ttft_ms_p50"] / min(
            p["prompts"]["long"].get("ttft_ms_p50") or p["prompts"]["long"]["ttft_ms"] for p in peers), 3)
        c16 = [p["c16"]["throughput_tok_s"] for p in peers if "throughput_tok_s" in p.get("c16", {})]
        if c16:
            out["throughput_c16_vs_best"] = round(r1["c16"]["throughput_tok_s"] / max(c16), 3)
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def table(report: dict) -> str:
    r1, genai, llama = report["r1box"], report.get("genai") or {}, report.get("llama_cpp") or {}
    lines = [f"{'':<26}{'r1box':>12}{'genai':>12}{'llama.cpp':>12}"]

    def row(label, ours, theirs=None, llamas=None):
        lines.append(f"{label:<26}{ours:>12}{'' if theirs is None else theirs:>12}{'' if llamas is None else llamas:>12}")

    for name in r1["prompts"]:
        p, g, l = r1["prompts"][name], genai.get("prompts", {}).get(name, {}), llama.get("prompts", {}).get(name, {})
        row(f"{name} ({p['prompt_tokens']} tok) TTFT ms", p["ttft_ms_p50"], g.get("ttft_ms_p50"), l.get("ttft_ms_p50"))
        row(f"{name} decode tok/s", p["decode_tok_s"], g.get("decode_tokens_per_s"), l.get("decode_tok_s"))
    for n in CONCURRENCY:
        row(f"c{n} aggregate decode tok/s", r1[f"c{n}"]["throughput_tok_s"],
            genai.get(f"c{n}", {}).get("throughput_tok_s"), llama.get(f"c{n}", {}).get("throughput_tok_s"))
        row(f"c{n} end to end tok/s", r1[f"c{n}"]["end_to_end_tok_s"])
        row(f"c{n} TTFT p99 ms", r1[f"c{n}"]["ttft_ms_p99"], genai.get(f"c{n}", {}).get("batch_ttft_ms"),
            llama.get(f"c{n}", {}).get("ttft_ms_p99"))
    row("2nd turn TTFT cold ms", r1["prefix_reuse"]["ttft_ms_cold"])
    row("2nd turn TTFT warm ms", r1["prefix_reuse"]["ttft_ms_warm"])
    row("peak RSS MB", r1["peak_rss_mb"], genai.get("peak_rss_mb"), llama.get("peak_rss_mb"))
    if "huge_pages" in genai:
        row("decode tok/s, genai+THP", "", genai["huge_pages"]["c1"]["decode_tok_s"])
    lines += [f"{k}: {v}" for k, v in report["ratios"].items()]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Latency (TTFT p99 and inter-token p50) against concurrency, as a small self-contained SVG."""
    r1 = report["r1box"]
    series = {"TTFT p99 (ms)": [r1[f"c{n}"]["ttft_ms_p99"] for n in CONCURRENCY],
              "inter-token p50 (ms)": [r1[f"c{n}"]["itl_ms_p50"] for n in CONCURRENCY]}
    w, h, pad = 480, 300, 50
    top = max(max(v) for v in series.values()) * 1.1 or 1
    xs = [pad + i * (w - 2 * pad) / (len(CONCURRENCY) - 1) for i in range(len(CONCURRENCY))]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             'font-size="11">', f'<text x="{pad}" y="20">r1box latency vs concurrency — {report["model"]}</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>']
    for x, n in zip(xs, CONCURRENCY):
        parts.append(f'<text x="{x - 8}" y="{h - pad + 16}">c{n}</text>')
    for (label, values), colour, dy in zip(series.items(), ("#c0392b", "#2471a3"), (0, 14)):
        points = " ".join(f"{x:.0f},{h - pad - v / top * (h - 2 * pad):.0f}" for x, v in zip(xs, values))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{w - pad - 150}" y="{pad + dy}" fill="{colour}">{label}</text>')
        for x, v in zip(xs, values):
            parts.append(f'<text x="{x + 4}" y="{h - pad - v / top * (h - 2 * pad) - 4:.0f}">{v:.0f}</text>')
    path.write_text("\n".join(parts + ["</svg>"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="r1box-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--anchor-python", help="python of the onnxruntime-genai virtualenv")
    ap.add_argument("--anchor-model", help="onnxruntime-genai model directory built from the same weights")
    ap.add_argument("--llama-bin", help="folder of llama.cpp's binaries (llama_setup.sh)")
    ap.add_argument("--gguf", help="the GGUF file the artifact was exported from, for llama.cpp")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--provider", choices=["cpu", "cuda", "auto"], default="cpu",
                    help="r1box's execution provider (cuda: onnxruntime-gpu and a float16 artifact)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk,
                    help="prompt tokens a pass, as [engine] prefill_chunk (0: the provider's)")
    ap.add_argument("--out", default="bench-results", help="directory for the JSON and the plot")
    args = ap.parse_args(argv)
    try:
        provider = pick_provider(args.provider)
    except ArtifactError as e:
        raise SystemExit(f"bench: {e}") from None
    manifest = load_manifest(args.artifact)
    tok = ChatTokenizer(manifest)
    conversations = make_conversations(tok)
    prompts = {name: tok.encode(tok.render(messages)) for name, messages in conversations.items()}
    decoder = Decoder(manifest, threads=args.threads, provider=provider)
    print(f"bench: {manifest.name} on {decoder.provider}, {args.threads} threads, prompts "
          f"{ {k: len(v) for k, v in prompts.items()} } tokens, {NEW_TOKENS} new tokens", file=sys.stderr)
    r1 = asyncio.run(measure_r1box(decoder, tok, conversations, args.runs, args.prefill_chunk))
    genai = llama = None
    if args.anchor_python and args.anchor_model:
        print("bench: onnxruntime-genai …", file=sys.stderr, flush=True)
        genai = measure_genai(args.anchor_python, args.anchor_model, prompts, args.threads, args.runs)
        print("bench: onnxruntime-genai with glibc's huge pages …", file=sys.stderr, flush=True)
        hp = measure_genai(args.anchor_python, args.anchor_model, prompts, args.threads, args.runs, huge_pages=True)
        genai["huge_pages"] = {"c1": hp["c1"], "peak_rss_mb": hp["peak_rss_mb"]}
    if args.llama_bin and args.gguf:
        print("bench: llama.cpp …", file=sys.stderr, flush=True)
        llama = llama_cpp.measure(Path(args.llama_bin), Path(args.gguf), prompts, args.threads, args.runs, NEW_TOKENS,
                                  CONCURRENCY)
    if genai or llama:
        take_turns(args, decoder, prompts["short"], r1, genai, llama)
    report = {"model": manifest.name, "provider": decoder.provider, "onnxruntime": ort.__version__,
              "gpu": _gpu_name() if decoder.provider == "cuda" else None, "threads": args.threads,
              "prefill_chunk": args.prefill_chunk or PREFILL_CHUNK[decoder.device],
              "cpu": _cpuinfo("model name"), "cpu_flags": _cpuinfo("flags"), "machine": platform.machine(),
              "quantization": manifest.raw["quantization"].get("tag")
              or {k: manifest.raw["quantization"].get(k)
                  for k in ("bits", "block_size", "int8_layers", "int8_layers_bits", "gguf_blocks_kept")},
              "int4_kernel_matmuls": decoder.int4_matmuls, "int4_kernel_path": decoder.int4_path,
              "r1box": r1, "genai": genai, "llama_cpp": llama}
    report["ratios"] = ratios(r1, genai, llama)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(report, out / f"latency-{manifest.name}.svg")
    for side in (r1, genai or {}, llama or {}):
        for p in side.get("prompts", {}).values():
            p.pop("generated_ids", None)
    (out / f"bench-{manifest.name}.json").write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"plot: {out / f'latency-{manifest.name}.svg'}")
    print(json.dumps(report))
    return 0


def take_turns(args, decoder: Decoder, prompt: list[int], r1: dict, genai: dict | None, llama: dict | None) -> None:
    """Single-stream decode once more, ROUNDS turns of each side, and each side's median over all its runs."""
    runs = {"r1box": r1["prompts"]["short"]["decode_runs"]}
    if genai:
        runs["genai"] = genai["prompts"]["short"]["decode_runs"]
    if llama:
        runs["llama.cpp"] = llama["prompts"]["short"]["decode_runs"]
    for turn in range(ROUNDS):
        print(f"bench: single-stream decode, turn {turn + 1} of {ROUNDS} …", file=sys.stderr, flush=True)
        if genai:
            runs["genai"] += measure_genai(args.anchor_python, args.anchor_model, {"short": prompt}, args.threads,
                                           2, single=True)["prompts"]["short"]["decode_runs"]
        if llama:
            runs["llama.cpp"] += [round(d, 2) for d in llama_cpp.decode_runs(
                Path(args.llama_bin), Path(args.gguf), prompt, args.threads, 2, NEW_TOKENS)]
        runs["r1box"] += [round(d, 2) for d in asyncio.run(decode_again(decoder, prompt, 2))]
    median = {side: round(float(np.median(values)), 2) for side, values in runs.items()}
    r1["prompts"]["short"]["decode_tok_s"] = r1["c1"]["decode_tok_s"] = median["r1box"]
    if genai:
        genai["prompts"]["short"]["decode_tokens_per_s"] = genai["c1"]["decode_tok_s"] = median["genai"]
    if llama:
        llama["prompts"]["short"]["decode_tok_s"] = llama["c1"]["decode_tok_s"] = median["llama.cpp"]
    print("  single-stream decode, median of every run: " + ", ".join(
        f"{side} {median[side]} tokens/s ({len(values)} runs)" for side, values in runs.items()), file=sys.stderr,
        flush=True)


def _gpu_name() -> str:
    """The GPU and its driver, as nvidia-smi names them."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpuinfo(field: str) -> str:
    """A field of /proc/cpuinfo's first processor: "model name", or "flags" (which vector instructions, AVX2,
    AVX-512, VNNI, AMX, the engines could use: what lscpu shows)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(field))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())

"""The anchor side of the speed benchmark: onnxruntime-genai on the same model, prompts and thread count as r1box.

It runs in its own virtualenv (made by anchor_setup.sh), so it uses only the standard library, numpy and
onnxruntime_genai — nothing of r1box.

    python anchor.py --model GENAI_MODEL_DIR --prompts PROMPTS.json --new-tokens 128 --threads 2 [--batch 1,4,16]

PROMPTS.json is {"name": [token ids], ...}, made by r1box's tokenizer, so both engines see the same ids. For each
prompt: one warm-up, then a greedy run that measures time to first token (prefill plus picking the first token) and
decode speed over the remaining new tokens. End of sequence is masked with min_length, so every run makes exactly
--new-tokens tokens (the JSON says so per run). With --batch, N copies of the shortest prompt (or --batch-prompt) run
in one generator batch, and the aggregate decode throughput is reported. One JSON object goes to stdout; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import onnxruntime_genai as og


def log(msg: str) -> None:
    print(f"bench anchor: {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """This process's resident high-water mark. Not getrusage: a child forked from a big parent inherits its
    maximum."""
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_model(model_dir: str, threads: int) -> tuple[og.Model, str, dict]:
    """Open the model with the decoder's intra-op thread count set to `threads` (genai's default ran on one thread on
    these machines). Prefer Config.overlay, which leaves the model directory alone; without it, edit
    genai_config.json in place (the original is kept once as genai_config.json.orig)."""
    session_options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    with open(os.path.join(model_dir, "genai_config.json")) as f:
        genai_config = json.load(f)
    if hasattr(og, "Config") and hasattr(og.Config, "overlay"):
        config = og.Config(model_dir)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session_options}}}))
        return og.Model(config), "Config.overlay", genai_config
    path = os.path.join(model_dir, "genai_config.json")
    if not os.path.exists(path + ".orig"):
        with open(path + ".orig", "w") as f:
            json.dump(genai_config, f, indent=4)
    genai_config["model"]["decoder"].setdefault("session_options", {}).update(session_options)
    with open(path, "w") as f:
        json.dump(genai_config, f, indent=4)
    return og.Model(model_dir), "genai_config.json", genai_config


def eos_ids(genai_config: dict) -> set[int]:
    eos = genai_config.get("model", {}).get("eos_token_id", [])
    return set(eos if isinstance(eos, list) else [eos])


def generate(model: og.Model, ids: np.ndarray, new_tokens: int, batch: int = 1) -> dict:
    """One greedy run of `batch` copies of `ids`. Times: append_tokens runs the prompt through the model and the
    first generate_next_token only picks from those logits, so time to first token = both; every later
    generate_next_token runs one decode step for the whole batch."""
    n_prompt = int(ids.shape[0])
    params = og.GeneratorParams(model)
    options = dict(do_sample=False, max_length=n_prompt + new_tokens, min_length=n_prompt + new_tokens)
    if batch > 1:
        options["batch_size"] = batch
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    feed = np.ascontiguousarray(np.tile(ids, (batch, 1))) if batch > 1 else ids
    t0 = time.perf_counter()
    generator.append_tokens(feed)
    generator.generate_next_token()
    t1 = time.perf_counter()
    steps, stamps = 1, [t1]
    while not generator.is_done() and steps < new_tokens:
        generator.generate_next_token()
        stamps.append(time.perf_counter())
        steps += 1
    t2 = time.perf_counter()
    rows = [np.asarray(generator.get_sequence(b))[n_prompt:].tolist() for b in range(batch)]
    del generator
    return {"ttft_s": t1 - t0, "decode_s": t2 - t1, "steps": steps, "rows": rows, "itl_s": np.diff(stamps).tolist()}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="onnxruntime-genai anchor for r1box's benchmark")
    ap.add_argument("--model", required=True, help="a model directory made by onnxruntime-genai's builder")
    ap.add_argument("--prompts", required=True, help='JSON object {"name": [token ids], ...}')
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="", help="comma-separated batch sizes, e.g. 1,4,16")
    ap.add_argument("--batch-prompt", default=None, help="prompt to batch (default: the shortest)")
    ap.add_argument("--runs", type=int, default=3, help="measured runs per prompt (median and p99 reported)")
    ap.add_argument("--warmup-tokens", type=int, default=16, help="new tokens in each warm-up run")
    ap.add_argument("--no-ids", action="store_true", help="leave the generated ids out of the JSON")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (one for the first token, one or more for decode)")
    try:
        args.batch_sizes = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batch must be comma-separated integers, not {args.batch!r}")
    if any(b < 1 for b in args.batch_sizes):
        ap.error("batch sizes must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with open(args.prompts) as f:
        prompts = {name: np.asarray(ids, dtype=np.int32) for name, ids in json.load(f).items()}
    if not prompts or any(p.ndim != 1 or p.size == 0 for p in prompts.values()):
        raise SystemExit("bench anchor: PROMPTS.json must map names to non-empty lists of token ids")

    t = time.perf_counter()
    model, threads_via, genai_config = load_model(args.model, args.threads)
    load_s = time.perf_counter() - t
    log(f"onnxruntime-genai {og.__version__}, model {args.model} loaded in {load_s:.1f} s, "
        f"{args.threads} threads via {threads_via}")
    context = int(genai_config["model"].get("context_length", 0)) or None
    eos = eos_ids(genai_config)

    out = {
        "engine": "onnxruntime-genai",
        "version": og.__version__,
        "model": os.path.abspath(args.model),
        "model_type": genai_config["model"].get("type"),
        "threads": args.threads,
        "threads_set_via": threads_via,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "new_tokens": args.new_tokens,
        "sampling": "greedy",
        "eos": "masked with min_length until new_tokens are made",
        "load_s": round(load_s, 3),
        "prompts": {},
    }
    single_rows = {}
    for name, ids in prompts.items():
        if context and ids.size + args.new_tokens > context:
            raise SystemExit(f"bench anchor: prompt {name} ({ids.size} tokens) + new tokens exceeds the context")
        log(f"{name}: {ids.size} prompt tokens: warm-up")
        generate(model, ids, min(args.warmup_tokens, args.new_tokens))
        log(f"{name}: measuring ({args.runs} runs)")
        runs = sorted((generate(model, ids, args.new_tokens) for _ in range(args.runs)), key=lambda r: r["ttft_s"])
        r = runs[len(runs) // 2]
        ttfts = [x["ttft_s"] * 1000 for x in runs]
        itls = [t * 1000 for x in runs for t in x["itl_s"]]
        made = len(r["rows"][0])
        decode_tps = (r["steps"] - 1) / r["decode_s"] if r["decode_s"] > 0 else None
        decode_runs = [round((x["steps"] - 1) / x["decode_s"], 2) for x in runs if x["decode_s"] > 0]
        entry = {
            "prompt_tokens": int(ids.size),
            "ttft_ms": round(r["ttft_s"] * 1000, 2),
            "ttft_ms_p50": round(float(np.percentile(ttfts, 50)), 2),
            "ttft_ms_p99": round(float(np.percentile(ttfts, 99)), 2),
            "itl_ms_p50": round(float(np.percentile(itls, 50)), 2),
            "itl_ms_p99": round(float(np.percentile(itls, 99)), 2),
            "prefill_tokens_per_s": round(ids.size / r["ttft_s"], 2),
            "new_tokens": made,
            "decode_tokens": r["steps"] - 1,
            "decode_s": round(r["decode_s"], 4),
            "decode_tokens_per_s": round(decode_tps, 2) if decode_tps else None,
            "decode_runs": decode_runs,
            "total_s": round(r["ttft_s"] + r["decode_s"], 4),
            "eos_in_output": any(t in eos for t in r["rows"][0]),
        }
        if not args.no_ids:
            entry["generated_ids"] = r["rows"][0]
        single_rows[name] = r["rows"][0]
        out["prompts"][name] = entry
        log(f"{name}: ttft {entry['ttft_ms']:.1f} ms, decode {entry['decode_tokens_per_s']} tokens/s "
            f"({made} new tokens)")

    if args.batch_sizes:
        bname = args.batch_prompt or min(prompts, key=lambda n: prompts[n].size)
        if bname not in prompts:
            raise SystemExit(f"bench anchor: no prompt named {bname!r} for --batch-prompt")
        ids = prompts[bname]
        batch = {
            "prompt": bname,
            "prompt_tokens": int(ids.size),
            "how": ("one og.Generator with search option batch_size=N, append_tokens of an [N, prompt] array "
                    "(N copies of the prompt, so no padding); static batch, every row decodes each step"),
            "results": {},
        }
        for n in args.batch_sizes:
            try:
                log(f"batch {n}: warm-up")
                generate(model, ids, min(args.warmup_tokens, args.new_tokens), batch=n)
                log(f"batch {n}: measuring")
                r = generate(model, ids, args.new_tokens, batch=n)
            except Exception as e:  # report what genai refused, and go on with the other sizes
                batch["results"][str(n)] = {"error": f"{type(e).__name__}: {e}"}
                log(f"batch {n}: failed: {e}")
                continue
            agg = n * (r["steps"] - 1) / r["decode_s"] if r["decode_s"] > 0 else None
            res = {
                "ttft_ms": round(r["ttft_s"] * 1000, 2),
                "decode_steps": r["steps"] - 1,
                "decode_s": round(r["decode_s"], 4),
                "aggregate_decode_tokens_per_s": round(agg, 2) if agg else None,
                "per_sequence_decode_tokens_per_s": round(agg / n, 2) if agg else None,
                "new_tokens_per_row": [len(row) for row in r["rows"]],
                # greedy rows of identical prompts should equal the single run of that prompt
                "rows_match_single": sum(row == single_rows[bname] for row in r["rows"]),
            }
            batch["results"][str(n)] = res
            log(f"batch {n}: aggregate decode {res['aggregate_decode_tokens_per_s']} tokens/s, "
                f"{res['rows_match_single']}/{n} rows match the single run")
        batch["supported"] = any("error" not in v for v in batch["results"].values())
        out["batch"] = batch

    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

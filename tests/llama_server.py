"""llama.cpp's own HTTP server (`llama-server`, prebuilt in the `xllamacpp` wheel) as a real backend for tests: a
child process that loads a GGUF, listens on a free port with an API key, and is stopped with SIGTERM.

xllamacpp.Server(params) blocks until the model is loaded and the port listens, then serves from its own threads;
its destructor can hang joining them, so the child leaves with os._exit on SIGTERM or when its parent goes away
(its stdin closes). One thread by default: a test shares the machine. The wheel needs libgomp1 from Debian."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

CHILD = r"""
import json, os, signal, sys, threading
config = json.loads(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
threading.Thread(target=lambda: (sys.stdin.buffer.read(), os._exit(0)), daemon=True).start()
import xllamacpp
p = xllamacpp.CommonParams()
p.model.path = config["gguf"]
p.hostnames = ["127.0.0.1"]
p.port = 0
p.n_ctx = config["n_ctx"]
p.n_parallel = config["n_parallel"]
p.cpuparams.n_threads = p.cpuparams_batch.n_threads = config["threads"]
p.warmup = False
p.api_keys = [config["api_key"]]
p.model_alias = {config["alias"]}
p.use_jinja = True
p.reasoning_format = xllamacpp.common_reasoning_format.COMMON_REASONING_FORMAT_DEEPSEEK
try:
    server = xllamacpp.Server(p)
except Exception as e:
    print("FAILED", repr(e), flush=True)
    os._exit(1)
print("READY", server.listening_address, flush=True)
threading.Event().wait()
"""


class LlamaServer:
    def __init__(self, gguf: Path, api_key: str, alias: str, threads: int = 1, n_ctx: int = 4096,
                 n_parallel: int = 2, log: Path | None = None):
        self.config = {"gguf": str(gguf), "api_key": api_key, "alias": alias, "threads": threads, "n_ctx": n_ctx,
                       "n_parallel": n_parallel}
        self.log = log
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, wait_s: float = 180) -> "LlamaServer":
        # OpenMP's spinning threads collapse to a few tokens a second when another process holds a core
        env = dict(os.environ, OMP_NUM_THREADS=str(self.config["threads"]), OMP_WAIT_POLICY="passive")
        stderr = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(self.config)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(wait_s)
        said = line[0].strip() if line else ""
        if not said.startswith("READY "):
            self.stop()
            raise RuntimeError(f"llama-server did not start: {said or 'no answer'} (log: {self.log})")
        self.url = said.split(" ", 1)[1].rstrip("/")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

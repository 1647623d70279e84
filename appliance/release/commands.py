"""`r1box release` and `r1box eval`: a release started, watched and ended from the box's shell, and a model scored
on the evaluation set. The release commands change the store; the running service follows within seconds."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from appliance.errors import R1boxError
from appliance.store.audit import command_actor


def _config(args):
    from appliance.config import load_config

    return load_config(args.config, secrets=False)


def _store_call(config, fn, *args):
    from appliance.store.database import Store

    store = Store(config.store.file, config.store.keys)
    store.open()
    try:
        return store.call(fn, *args)
    finally:
        store.close()


def _show(release) -> None:
    if release is None:
        print("no release yet")
        return
    figures = release.figures or {}
    print(json.dumps({"release": release.id, "candidate": release.candidate, "url": release.url,
                      "artifact": release.artifact, "phase": release.phase, "shadow_share": release.shadow_share,
                      "ab_share": release.ab_share, "auto": release.auto, "decision": figures.get("action"),
                      "reason": figures.get("reason"), "proposed": figures.get("proposed"),
                      "live": figures.get("live"), "candidate_figures": figures.get("candidate")},
                     ensure_ascii=False, indent=2))


def target_of(config, target: str, name: str | None) -> tuple[str, str, str]:
    """(label, url, artifact) of a release's candidate: an artifact directory (brought onto the box's data disk),
    or a backend's URL."""
    from appliance.release import records
    from appliance.release.candidate import bring_in, check_artifact

    if target.startswith(("http://", "https://")):
        return name or target.split("://", 1)[1].rstrip("/"), target.rstrip("/"), ""
    if not Path(target).is_dir():
        raise R1boxError(f"{target}: neither an artifact directory nor an http(s):// backend URL")
    model = check_artifact(target)
    target = str(bring_in(target, config.store.file.parent))
    port = config.release.candidate_port
    serving = _store_call(config, records.promoted)
    if serving and serving.artifact and serving.url.endswith(f":{port}"):  # the promoted candidate has that port
        port += 1
    return name or f"candidate-{model}", f"http://127.0.0.1:{port}", str(Path(target).resolve())


def cmd_release_start(args) -> None:
    from appliance.release import records

    config = _config(args)
    label, url, artifact = target_of(config, args.target, args.name)
    labels = {b.label for b in config.backends}
    if label in labels:
        raise R1boxError(f"{label} is already the name of a backend; give the candidate another with --name")
    shadow = config.release.shadow_share if args.shadow_share is None else args.shadow_share
    ab = config.release.ab_share if args.ab_share is None else args.ab_share
    auto = config.release.auto if args.auto is None else args.auto == "on"
    _show(_store_call(config, records.start, label, url, args.key_env or "", artifact, shadow, ab, auto,
                      command_actor()))


def cmd_release_status(args) -> None:
    from appliance.release import records

    _show(_store_call(_config(args), records.latest))


def cmd_release_change(args) -> None:
    from appliance.release import records

    config = _config(args)
    running = _store_call(config, records.active)
    if running is None:
        raise records.ReleaseError("no release is running (r1box release status)")
    to = {"promote": "promoted", "rollback": "rolled_back", "stop": "stopped", "ab": "ab"}[args.release_command]
    _show(_store_call(config, records.change_phase, running.id, to, command_actor(), running.figures))


def cmd_eval(args) -> None:
    """Score a backend URL, or an artifact served for the occasion by its own `r1box model` on a free port."""
    from appliance.config import BackendConfig
    from appliance.release import evaluate

    config = _config(args)
    profile = args.profile or config.release.eval_profile
    items = evaluate.load_items(tuple(args.items or ()) or config.release.eval_sets, args.limit, not profile)
    scores: dict[str, list[dict]] = {}
    for target in args.targets:
        process, url, key_env = None, target.rstrip("/"), args.key_env or ""
        if not target.startswith(("http://", "https://")):
            from appliance.release.candidate import check_artifact

            check_artifact(target)
            process = _serve_artifact(target, args.config)
            url, key_env = process.url, "R1BOX_EVAL_KEY"
        try:
            backend_config = BackendConfig(url=url, key_env=key_env, key=os.environ.get(key_env, "") if key_env else "",
                                           first_token_timeout_s=600, timeout_s=1800)
            name = target if process is None else Path(target).name  # an artifact by its directory's name
            scores[name] = asyncio.run(_score(backend_config, items, args.max_tokens, args.parallel, profile, name))
        finally:
            if process:
                process.stop()
    print(evaluate.table(scores))
    if args.out:
        Path(args.out).write_text(json.dumps({"items": len(items), "scores": scores}, ensure_ascii=False, indent=1))
        print(f"written: {args.out}", file=sys.stderr)


async def _score(backend_config, items, max_tokens: int, parallel: int, profile: str, name: str) -> list[dict]:
    import aiohttp

    from appliance.backends.client import Backend
    from appliance.release import evaluate

    def progress(done: int, total: int) -> None:
        print(f"\r{name}: {done}/{total} items", end="" if done < total else "\n", file=sys.stderr, flush=True)

    async with aiohttp.ClientSession() as session:
        return await evaluate.run(Backend(backend_config, session), items, max_tokens, parallel, profile,
                                  progress=progress)


class _ArtifactServer:
    def __init__(self, process: subprocess.Popen, url: str):
        self.process, self.url = process, url

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _serve_artifact(artifact: str, config_file: str | None) -> _ArtifactServer:
    from appliance.ops import health

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = os.urandom(16).hex()
    os.environ["R1BOX_EVAL_KEY"] = key
    env = dict(os.environ, R1BOX_MODEL_KEY=key)
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "model", "--artifact", artifact, "--host",
                                "127.0.0.1", "--port", str(port), *(["--config", config_file] if config_file else [])],
                               env=env, stdout=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    print(f"starting r1box model for {artifact}", file=sys.stderr)
    while health.probe(url, 1) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise R1boxError(f"r1box model for {artifact} did not start (exit {process.poll()}); see its log above")
        time.sleep(0.5)
    return _ArtifactServer(process, url)


def add_parsers(sub) -> None:
    p = sub.add_parser("release", help="gray release of a candidate model: shadow, A/B, promotion or rollback")
    release = p.add_subparsers(dest="release_command", required=True)
    p = release.add_parser("start", help="start a release of an artifact directory or a backend URL")
    p.add_argument("target", help="an exported artifact directory, or http(s)://host:port of a backend")
    p.add_argument("--name", help="the candidate's name in pages and metrics")
    p.add_argument("--key-env", help="for a backend URL: the environment variable of serve that holds its key")
    p.add_argument("--shadow-share", type=float, help="overrides [release] shadow_share")
    p.add_argument("--ab-share", type=float, help="overrides [release] ab_share")
    p.add_argument("--auto", choices=["on", "off"], help="act on the rule (on) or only propose (off)")
    p.set_defaults(func=cmd_release_start)
    for name, helptext in (("status", "the release and its figures"),
                           ("ab", "move a release in shadow on to A/B now"),
                           ("promote", "make the candidate the serving model now"),
                           ("rollback", "take the candidate away: it was worse"), ("stop", "end the release")):
        p = release.add_parser(name, help=helptext)
        p.set_defaults(func=cmd_release_status if name == "status" else cmd_release_change)
    for p in release.choices.values():
        p.add_argument("--config", help="the box's TOML configuration (the database's path, [release])")

    p = sub.add_parser("eval", help="score artifacts or backends on the evaluation set; prints a table")
    p.add_argument("targets", nargs="+", help="artifact directories and/or http(s):// backend URLs")
    p.add_argument("--config", help="TOML configuration ([release] eval_sets; the model's engine settings)")
    p.add_argument("--key-env", help="for backend URLs: the environment variable that holds their key")
    p.add_argument("--items", action="append", help="a JSONL file of the branch's own items, scored beside the "
                   "shipped set (or instead of it, with --profile)")
    p.add_argument("--profile", help="the branch's own fact sheet as the system prompt; then only --items count")
    p.add_argument("--limit", type=int, default=0, help="score this many items, spread over the categories")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--parallel", type=int, default=4, help="questions in flight at once")
    p.add_argument("--out", help="write the per-item results as JSON here")
    p.set_defaults(func=cmd_eval)


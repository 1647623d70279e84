"""`r1box ha`: the pair from the box's shell. `pair` makes the keys two boxes share (once, on one of them), `run` is
one box of the pair (the r1box-ha unit), `status` says what this box is now, `config` prints what the node writes
for keepalived and litestream, for a box whose keepalived is run another way."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from appliance.errors import HaError


def _config(args, secrets: bool = False):
    from appliance.config import load_config

    config = load_config(args.config, secrets=secrets)
    if not config.ha.enabled:
        raise HaError(f"{args.config or 'the configuration'}: [ha] enabled is false; set it, with address, peer "
                      "and virtual_address, on both boxes.")
    return config


def cmd_ha_pair(args) -> None:
    from appliance.ha.pairing import PairFiles, pair
    from appliance.store.database import Store

    config = _config(args)
    files = pair(PairFiles.of(config.ha, config.store.file))
    store = Store(config.store.file, config.store.keys)  # the store's keys are made with it, and shared
    store.open()
    store.close()
    print("the pair's keys are made. Copy these files to the same paths on the peer (the CONFIG drive, or scp),\n"
          "with the store's key file, which both boxes must share:")
    for path in [*files, config.store.keys]:
        print(f"  {path}")


def cmd_ha_run(args) -> None:
    from appliance.ha.node import Node
    from appliance.ops.logs import setup_logging

    setup_logging(args.log_format)
    config = _config(args, secrets=True)
    asyncio.run(Node(config, Path(args.config)).run())


def cmd_ha_status(args) -> None:
    from appliance.ha.node import read_role

    print(json.dumps(read_role(_config(args)), ensure_ascii=False, indent=2))


def cmd_ha_config(args) -> None:
    from appliance.ha import keepalived
    from appliance.ha.node import state_dir
    from appliance.ha.pairing import PairFiles

    config = _config(args)
    files = PairFiles.of(config.ha, config.store.file)
    files.check()
    ha = asyncio.run(keepalived.with_interface(config.ha, wait_s=0))
    print(keepalived.render(ha, state_dir(config), files.auth_pass()))


def add_parsers(sub) -> None:
    p = sub.add_parser("ha", help="hot standby of two boxes: keepalived, the store carried by litestream")
    ha = p.add_subparsers(dest="ha_command", required=True)
    for name, func, helptext in (
            ("pair", cmd_ha_pair, "make the keys the two boxes share (once, on one box)"),
            ("run", cmd_ha_run, "run this box's side of the pair (keepalived, sshd, serve while active)"),
            ("status", cmd_ha_status, "this box's role, epoch and last takeover, as JSON"),
            ("config", cmd_ha_config, "print the keepalived.conf the node writes")):
        p = ha.add_parser(name, help=helptext)
        p.add_argument("--config", required=True, help="the box's TOML configuration, with [ha]")
        if name == "run":
            p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
        p.set_defaults(func=func)

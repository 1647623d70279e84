"""The store's commands: backup, restore, keys rotate, purge, purge-user. Each opens the database the service's
configuration names (beside a running service: WAL and a busy timeout let both work), does one act, and leaves one
audit row naming the person who ran it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from appliance.errors import R1boxError
from appliance.store.audit import command_actor


def _config(args):
    from appliance.config import load_config

    return load_config(args.config)


def _opened(config):
    from appliance.store.database import Store

    store = Store(config.store.file, config.store.keys)
    store.open()
    return store


def _print(result: dict) -> None:
    print(json.dumps(result, ensure_ascii=False))


def cmd_backup(args) -> None:
    from appliance.store.backup import backup

    store = _opened(_config(args))
    try:
        _print(backup(store, Path(args.out), command_actor()))
    finally:
        store.close()


def cmd_restore(args) -> None:
    from appliance.store.backup import restore

    config = _config(args)
    _print(restore(Path(args.backup), config.store.file, config.store.keys, command_actor(), force=args.force))


def cmd_keys_rotate(args) -> None:
    from appliance.store.rotation import rotate

    store = _opened(_config(args))
    try:
        _print(store.call(rotate, store.vault, command_actor()))
    finally:
        store.close()


def cmd_purge(args) -> None:
    from appliance.store.retention import purge_expired

    config = _config(args)
    store = _opened(config)
    try:
        _print(store.call(purge_expired, config.store.conversation_days, config.store.audit_days, command_actor()))
    finally:
        store.close()


def cmd_purge_user(args) -> None:
    from appliance.store.retention import purge_user

    config = _config(args)
    accounts = [a for a in (config.wechat.app_id, config.wecom.corp_id) if a]
    account = args.account or (accounts[0] if len(accounts) == 1 else None)
    if not account:
        raise R1boxError("give --account: the AppID or CorpID the user wrote to"
                         + (f" (configured: {', '.join(accounts)})" if accounts else ""))
    store = _opened(config)
    try:
        user_hash = store.vault.user_hash(account, args.user)
        _print({"user": user_hash, **store.call(purge_user, account, user_hash, command_actor(), "request")})
    finally:
        store.close()


def add_parsers(sub) -> None:
    def parser(name: str, helptext: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", help="the service's TOML configuration (database and key file paths)")
        p.set_defaults(func=func)
        return p

    p = parser("backup", "copy the live database into an encrypted backup file", cmd_backup)
    p.add_argument("out", help="the backup file to write")
    p = parser("restore", "put an encrypted backup in place of the database (the service stopped)", cmd_restore)
    p.add_argument("backup", help="a file written by r1box backup")
    p.add_argument("--force", action="store_true", help="replace an existing database (it is moved aside)")

    keys = sub.add_parser("keys", help="the encryption keys of the database").add_subparsers(dest="keys_command",
                                                                                              required=True)
    p = keys.add_parser("rotate", help="add a key and re-seal every row under it (the service may keep running)")
    p.add_argument("--config", help="the service's TOML configuration (database and key file paths)")
    p.set_defaults(func=cmd_keys_rotate)

    parser("purge", "purge what is past its retention now (the service does it daily)", cmd_purge)
    p = parser("purge-user", "delete everything stored of one WeChat user (their right to deletion)",
               cmd_purge_user)
    p.add_argument("user", help="the user's OpenID (WeCom: UserID)")
    p.add_argument("--account", help="the AppID or CorpID; default: the one configured account")

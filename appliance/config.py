"""The one configuration path: a TOML file, then command-line flags, into frozen dataclasses.

The environment carries only secrets and paths (R1BOX_API_KEYS, R1BOX_CACHE). An unknown key, a wrong type or a
bad value is refused with the key's name, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from appliance.dialog.engine import DialogConfig
from appliance.engine import EngineConfig
from appliance.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    artifact: str = ""  # an exported artifact directory; empty: `name` from the cache, exported on first use
    name: str = "qwen2.5-coder-0.5b-instruct"
    provider: str = "auto"  # auto, cpu or cuda
    threads: int = 0  # 0: every core this process may use

    def __post_init__(self):
        if self.provider not in ("auto", "cpu", "cuda"):
            raise ValueError("provider must be auto, cpu or cuda")
        if self.threads < 0:
            raise ValueError("threads must be 0 (all) or positive")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_kb: int = 256
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # from R1BOX_API_KEYS only, never the file

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class WeChatConfig:
    """The Official Account. Its Token and EncodingAESKey are secrets: R1BOX_WECHAT_TOKEN, R1BOX_WECHAT_AES_KEY
    (and R1BOX_WECHAT_PREVIOUS_AES_KEY during a key rotation)."""

    app_id: str = ""  # empty: no /wechat endpoint
    path: str = "/wechat"
    deadline_s: float = 4.5  # the platform gives 5 s; the reply must be on the wire before
    timestamp_window_s: int = 300  # 0 turns the freshness check off
    delivery: str = "pull"  # late answers: "push" (customer-service API, verified accounts) or "pull"
    api_base_url: str = "https://api.weixin.qq.com"  # or a fixed-IP proxy (error 40164)
    stable_token: bool = True
    token: str = field(default="", repr=False)
    aes_key: str = field(default="", repr=False)
    previous_aes_key: str = field(default="", repr=False)
    app_secret: str = field(default="", repr=False)  # R1BOX_WECHAT_APP_SECRET, needed for push

    def __post_init__(self):
        if self.delivery not in ("push", "pull"):
            raise ValueError("delivery must be push or pull")
        if not 0.5 <= self.deadline_s <= 4.8:
            raise ValueError("deadline_s must be between 0.5 and 4.8 seconds")
        if self.timestamp_window_s < 0:
            raise ValueError("timestamp_window_s must be 0 (off) or positive")


@dataclass(frozen=True)
class WeComConfig:
    """A WeCom self-built app. Secrets: R1BOX_WECOM_TOKEN, R1BOX_WECOM_AES_KEY (R1BOX_WECOM_PREVIOUS_AES_KEY)."""

    corp_id: str = ""  # empty: no /wecom endpoint
    agent_id: str = ""
    path: str = "/wecom"
    api_base_url: str = "https://qyapi.weixin.qq.com"
    token: str = field(default="", repr=False)
    aes_key: str = field(default="", repr=False)
    previous_aes_key: str = field(default="", repr=False)
    app_secret: str = field(default="", repr=False)  # R1BOX_WECOM_APP_SECRET: late answers are pushed with it


@dataclass(frozen=True)
class StoreConfig:
    path: str = ""  # empty: $R1BOX_DATA/r1box.db, else ~/.local/share/r1box/r1box.db

    @property
    def file(self) -> Path:
        if self.path:
            return Path(self.path).expanduser()
        return Path(os.environ.get("R1BOX_DATA") or Path.home() / ".local/share/r1box") / "r1box.db"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    server: ServerConfig = ServerConfig()
    wechat: WeChatConfig = WeChatConfig()
    wecom: WeComConfig = WeComConfig()
    dialog: DialogConfig = DialogConfig()
    store: StoreConfig = StoreConfig()


_SECTIONS = {"model": ModelConfig, "engine": EngineConfig, "server": ServerConfig, "wechat": WeChatConfig,
             "wecom": WeComConfig, "dialog": DialogConfig, "store": StoreConfig}
_FROM_ENV_ONLY = {"api_keys", "token", "aes_key", "previous_aes_key", "app_secret"}
_SECRETS = {"wechat": "R1BOX_WECHAT", "wecom": "R1BOX_WECOM"}


def load_config(path: str | Path | None = None, overrides: dict[str, dict] | None = None) -> Config:
    """Read the TOML file (None: defaults only), apply flag overrides ({"server": {"port": 9000}}), validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such configuration file; copy appliance/config.example.toml and edit it.") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e}); fix the line it names.") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror}).") from None
    where = str(path) if path else "defaults"
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"{where}: unknown section [{sorted(unknown)[0]}]; known: {', '.join(_SECTIONS)}.")
    sections = {}
    for name, cls in _SECTIONS.items():
        table = dict(raw.get(name, {}))
        table.update({k: v for k, v in (overrides or {}).get(name, {}).items() if v is not None})
        sections[name] = _build(cls, table, f"{where} [{name}]")
    keys = tuple(k.strip() for k in os.environ.get("R1BOX_API_KEYS", "").split(",") if k.strip())
    server = dataclasses.replace(sections["server"], api_keys=keys)
    if not server.loopback and not server.api_keys:
        raise ConfigError(f"{where} [server]: host {server.host} is reachable from other machines, so the API "
                          "needs keys: set R1BOX_API_KEYS=key1,key2 in the service's environment, or bind 127.0.0.1.")
    for name, prefix in _SECRETS.items():
        sections[name] = _with_secrets(sections[name], prefix, f"{where} [{name}]")
    return Config(**{**sections, "server": server})


def _with_secrets(section, prefix: str, where: str):
    enabled = bool(getattr(section, "app_id", "") or getattr(section, "corp_id", ""))
    secrets = {key: os.environ.get(f"{prefix}_{key.upper()}", "").strip()
               for key in ("token", "aes_key", "previous_aes_key", "app_secret")}
    if not enabled:
        return section
    if not secrets["token"]:
        raise ConfigError(f"{where} is enabled but {prefix}_TOKEN is not set; put the Token from the platform's "
                          "server configuration page in the service's environment.")
    for key in ("aes_key", "previous_aes_key"):
        if secrets[key] and len(secrets[key]) != 43:
            raise ConfigError(f"{prefix}_{key.upper()} must be the 43-character EncodingAESKey.")
    if getattr(section, "delivery", "") == "push" and not secrets["app_secret"]:
        raise ConfigError(f"{where}: delivery = \"push\" needs {prefix}_APP_SECRET for the customer-service API.")
    if prefix == "R1BOX_WECOM" and not secrets["aes_key"]:
        raise ConfigError(f"{where}: WeCom callbacks are always encrypted; set {prefix}_AES_KEY.")
    return dataclasses.replace(section, **secrets)


def _build(cls, table: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _FROM_ENV_ONLY}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(fields)}.")
        expected = type(getattr(cls(), key))
        if expected is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
            table[key] = value = tuple(value)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            table[key] = value = float(value)
        if type(value) is not expected:
            raise ConfigError(f"{where}: {key} must be a {expected.__name__}, not {value!r}.")
    try:
        return cls(**table)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}.") from None

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
class Config:
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    server: ServerConfig = ServerConfig()


_SECTIONS = {"model": ModelConfig, "engine": EngineConfig, "server": ServerConfig}
_FROM_ENV_ONLY = {"api_keys"}


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
    return Config(sections["model"], sections["engine"], server)


def _build(cls, table: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _FROM_ENV_ONLY}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(fields)}.")
        expected = type(getattr(cls(), key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            table[key] = value = float(value)
        if type(value) is not expected:
            raise ConfigError(f"{where}: {key} must be a {expected.__name__}, not {value!r}.")
    try:
        return cls(**table)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}.") from None

"""The one configuration path: a TOML file, then command-line flags, into frozen dataclasses. Every section's
dataclass lives here, but for those a feature owns ([release] and [ha], in their folders' settings.py), and no module
of the path imports a model runtime, so reading the configuration stays cheap (the health check reads it every few
seconds).

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

from appliance.errors import ConfigError
from appliance.ha.settings import HaConfig
from appliance.release.settings import ReleaseConfig


def is_loopback(host: str | None) -> bool:
    """Whether an address (a listener's or a peer's) is this machine's loopback, IPv4 seen through IPv6 included."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@dataclass(frozen=True)
class ModelConfig:
    artifact: str = ""  # an exported artifact directory; empty: `name` from the cache, exported on first use
    name: str = "qwen2.5-coder-0.5b-instruct"
    provider: str = "auto"  # auto, cpu or cuda
    threads: int = 0  # 0: every core this process may use
    huge_pages: bool = True  # back the weights with transparent huge pages on the CPU (appliance/model/hugepages.py)
    int4_kernel: bool = True  # r1box's int4 MatMul on x86 CPUs with AVX2 (appliance/model/int4_kernel.py)

    def __post_init__(self):
        if self.provider not in ("auto", "cpu", "cuda"):
            raise ValueError("provider must be auto, cpu or cuda")
        if self.threads < 0:
            raise ValueError("threads must be 0 (all) or positive")


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # running sequences = cache slots
    max_waiting: int = 64  # beyond this a request is refused as busy
    max_length: int = 4096  # prompt + answer, per sequence
    # memory for the running sequences' KV: each is admitted with room for its prompt and its whole answer, and waits
    # while that room is taken (slots × max_length is address space on the CPU; only cached positions take memory)
    kv_cache_mb: int = 1024
    # prompt tokens per pass, between two decode steps of the running streams; 0: the provider's (engine.PREFILL_CHUNK)
    prefill_chunk: int = 0
    prefix_cache_mb: int = 256
    think_budget: int = 1024  # reasoning tokens before </think> is forced; 0: no limit

    def __post_init__(self):
        if not 1 <= self.max_batch <= 64:
            raise ValueError("max_batch must be between 1 and 64")
        if self.max_waiting < 0 or self.max_length < 16 or self.prefill_chunk < 0 or self.prefix_cache_mb < 0:
            raise ValueError("max_waiting ≥ 0, max_length ≥ 16, prefill_chunk ≥ 0, prefix_cache_mb ≥ 0")
        if self.kv_cache_mb < 1:
            raise ValueError("kv_cache_mb must be at least 1")


@dataclass(frozen=True)
class DialogConfig:
    system_prompt: str = "你是本网点的智能助理，请用简洁、礼貌的中文回答客户的问题。"
    memory_turns: int = 5  # earlier user/assistant pairs kept in the prompt
    memory_minutes: int = 30  # older turns are forgotten
    memory_tokens: int = 1500  # and the oldest go first when the kept turns exceed this many tokens
    max_tokens: int = 1024
    rate_per_minute: int = 10  # questions per user per minute; more get rate_limited_reply
    rate_limited_reply: str = "您发送得太快了，请稍等一分钟再问。"
    blocked_reply: str = "抱歉，这个问题我无法回答。"
    help_text: str = "直接发送问题即可。发送“#清除记忆”开始新的对话，回答较长时发送“继续”查看后续。"
    welcome: str = "您好，欢迎关注！我是本网点的智能助理，有问题请直接发消息给我。"
    reset_reply: str = "好的，之前的对话已清除。"
    word_lists: tuple[str, ...] = ()
    # while no model backend answers: the operators' frequently asked questions, answered from the store
    answer_cache: bool = True
    answer_cache_similarity: float = 0.6  # how close a question must be to an entry (appliance/dialog/answer_cache.py)
    answer_cache_note: str = "（智能助理暂时无法连线，以上是预先审核的常见问题答复；其他问题会在恢复后回答。）"

    def __post_init__(self):
        if min(self.memory_turns, self.memory_minutes, self.memory_tokens, self.rate_per_minute) < 0 \
                or self.max_tokens < 1:
            raise ValueError("memory_turns, memory_minutes, memory_tokens, rate_per_minute ≥ 0 and max_tokens ≥ 1")
        if not 0 < self.answer_cache_similarity <= 1:
            raise ValueError("answer_cache_similarity must be above 0 and at most 1")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_kb: int = 256
    # auto: TLS 1.3 when listening beyond loopback; on: always; off: plain HTTP (WeChat callbacks behind the
    # office's reverse proxy; for [model_server], the API then answers this machine only: appliance/model/api.py)
    tls: str = "auto"

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
        if self.tls not in ("auto", "on", "off"):
            raise ValueError('tls must be "auto", "on" or "off"')

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def speaks_tls(self) -> bool:
        return self.tls == "on" or (self.tls == "auto" and not self.loopback)

    @property
    def scheme(self) -> str:
        return "https" if self.speaks_tls else "http"

    @property
    def own_address(self) -> str:
        """Where this machine reaches the listener: loopback when it listens on every address."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    @property
    def own_url(self) -> str:
        """The listener as this machine reaches it, in the scheme it speaks (https://127.0.0.1:8080)."""
        host = self.own_address
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{self.port}"


@dataclass(frozen=True)
class ModelServerConfig(ServerConfig):
    """Where `r1box model` serves the OpenAI-compatible API, /healthz and /metrics. Loopback by default: the box's
    own `r1box serve` is its one caller. Its keys: R1BOX_MODEL_KEY (shared with the box's serve) and R1BOX_API_KEYS
    (other callers: a second box, HQ)."""

    port: int = 8081
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # from the environment only, never the file


@dataclass(frozen=True)
class BackendConfig:
    """One model backend of `r1box serve`: anything that speaks OpenAI's chat completions with server-sent events
    (another r1box, vLLM, llama.cpp's llama-server, Ollama, SGLang). Tried in order of priority (then of the list);
    among backends of one priority, new questions are shared by weight."""

    url: str  # the base URL: http://127.0.0.1:8081 (the /v1/... paths are added)
    name: str = ""  # for logs, metrics and pages; empty: the URL's host and port
    key_env: str = ""  # the environment variable holding its bearer key; empty: no key
    model: str = ""  # the model name to ask for; a backend that answers with another one is failed over
    priority: int = 0
    weight: int = 1
    max_concurrent: int = 8  # questions in flight to this backend; more go to the next one
    connect_timeout_s: float = 3.0
    # a hang is silence: first_token_timeout_s before the backend says anything (engines that are silent while
    # they prefill a long prompt), idle_timeout_s between two lines once it has (r1box sends a comment every 5 s
    # while it prefills), timeout_s for the whole answer
    idle_timeout_s: float = 30.0
    first_token_timeout_s: float = 300.0
    timeout_s: float = 900.0
    verify_tls: bool = True  # False: a box's self-signed certificate (prefer an https URL with a pinned CA)
    key: str = field(default="", repr=False)  # read from key_env, never from the file

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, not {self.url!r}")
        if self.weight < 1 or self.max_concurrent < 1:
            raise ValueError("weight and max_concurrent must be at least 1")
        if min(self.connect_timeout_s, self.idle_timeout_s, self.first_token_timeout_s, self.timeout_s) <= 0:
            raise ValueError("connect_timeout_s, idle_timeout_s, first_token_timeout_s and timeout_s must be "
                             "positive")

    @property
    def label(self) -> str:
        return self.name or self.url.split("://", 1)[1].rstrip("/")


@dataclass(frozen=True)
class WeChatConfig:
    """The Official Account. Its secrets may sit here or come from the environment, which wins:
    R1BOX_WECHAT_TOKEN, R1BOX_WECHAT_ENCODING_AES_KEY, R1BOX_WECHAT_PREVIOUS_ENCODING_AES_KEY (during a key
    rotation), R1BOX_WECHAT_APP_SECRET."""

    app_id: str = ""  # empty: no /wechat endpoint
    mode: str = "safe"  # the account's message encryption: plain, compat or safe
    path: str = "/wechat"
    deadline_s: float = 4.5  # the platform gives 5 s; the reply must be on the wire before
    replay_window_s: int = 300  # requests this far from now are refused; 0 turns the check off
    delivery: str = "pull"  # late answers: "push" (customer-service API, verified accounts) or "pull"
    api_base_url: str = "https://api.weixin.qq.com"  # or a fixed-IP proxy (error 40164)
    stable_token: bool = True
    system_prompt: str = ""  # this account's; empty: [dialog] system_prompt
    token: str = field(default="", repr=False)
    encoding_aes_key: str = field(default="", repr=False)
    previous_encoding_aes_key: str = field(default="", repr=False)
    app_secret: str = field(default="", repr=False)  # needed for push

    def __post_init__(self):
        if self.mode not in ("plain", "compat", "safe"):
            raise ValueError("mode must be plain, compat or safe")
        if self.delivery not in ("push", "pull"):
            raise ValueError("delivery must be push or pull")
        if not 0.5 <= self.deadline_s <= 4.8:
            raise ValueError("deadline_s must be between 0.5 and 4.8 seconds")
        if self.replay_window_s < 0:
            raise ValueError("replay_window_s must be 0 (off) or positive")


@dataclass(frozen=True)
class WeComConfig:
    """A WeCom self-built app; always encrypted. Secrets here or from R1BOX_WECOM_TOKEN,
    R1BOX_WECOM_ENCODING_AES_KEY, R1BOX_WECOM_PREVIOUS_ENCODING_AES_KEY, R1BOX_WECOM_CORP_SECRET."""

    corp_id: str = ""  # empty: no /wecom endpoint
    agent_id: str = ""
    path: str = "/wecom"
    replay_window_s: int = 300
    api_base_url: str = "https://qyapi.weixin.qq.com"
    system_prompt: str = ""  # this app's; empty: [dialog] system_prompt
    token: str = field(default="", repr=False)
    encoding_aes_key: str = field(default="", repr=False)
    previous_encoding_aes_key: str = field(default="", repr=False)
    corp_secret: str = field(default="", repr=False)  # with it, late answers are pushed (message/send)

    def __post_init__(self):
        if self.replay_window_s < 0:
            raise ValueError("replay_window_s must be 0 (off) or positive")


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"  # Prometheus scrapes /metrics here; keep it off the office network unless needed
    port: int = 9464


@dataclass(frozen=True)
class AdminConfig:
    """The admin pages, on their own TLS 1.3 listener."""

    host: str = "127.0.0.1"
    port: int = 8443
    cert: str = ""  # PEM certificate chain and its key; both empty: a self-signed pair made beside the database
    key: str = ""
    session_minutes: int = 480  # a login lasts this long
    utc_offset_hours: int = 8  # the office's time zone, for the dashboard's days and hours

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert and key go together: set both, or neither for a self-signed certificate")
        if not 5 <= self.session_minutes <= 7 * 24 * 60:
            raise ValueError("session_minutes must be between 5 and 10080")
        if not -12 <= self.utc_offset_hours <= 14:
            raise ValueError("utc_offset_hours must be between -12 and 14")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


@dataclass(frozen=True)
class StoreConfig:
    path: str = ""  # empty: $R1BOX_DATA/r1box.db, else ~/.local/share/r1box/r1box.db
    key_file: str = ""  # the encryption keys, apart from the database; empty: r1box.keys beside it
    conversation_days: int = 30  # messages, answers and dialog turns are purged after this
    audit_days: int = 180  # the audit log, after this
    retention_interval_h: float = 24.0  # how often the service purges

    def __post_init__(self):
        if min(self.conversation_days, self.audit_days) < 1:
            raise ValueError("conversation_days and audit_days must be at least 1")
        if self.retention_interval_h <= 0:
            raise ValueError("retention_interval_h must be positive")

    @property
    def file(self) -> Path:
        if self.path:
            return Path(self.path).expanduser()
        return Path(os.environ.get("R1BOX_DATA") or Path.home() / ".local/share/r1box") / "r1box.db"

    @property
    def keys(self) -> Path:
        return Path(self.key_file).expanduser() if self.key_file else self.file.with_suffix(".keys")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    model_server: ModelServerConfig = ModelServerConfig()
    backends: tuple[BackendConfig, ...] = ()  # empty: the box's own `r1box model` at [model_server]
    server: ServerConfig = ServerConfig()
    wechat: WeChatConfig = WeChatConfig()
    wecom: WeComConfig = WeComConfig()
    dialog: DialogConfig = DialogConfig()
    store: StoreConfig = StoreConfig()
    metrics: MetricsConfig = MetricsConfig()
    admin: AdminConfig = AdminConfig()
    release: ReleaseConfig = ReleaseConfig()
    ha: HaConfig = HaConfig()


_SECTIONS = {"model": ModelConfig, "engine": EngineConfig, "model_server": ModelServerConfig, "server": ServerConfig,
             "wechat": WeChatConfig, "wecom": WeComConfig, "dialog": DialogConfig, "store": StoreConfig,
             "metrics": MetricsConfig, "admin": AdminConfig, "release": ReleaseConfig,
             "ha": HaConfig}
_FROM_ENV_ONLY = {"api_keys"}
_SECRETS = {"wechat": ("R1BOX_WECHAT", ("token", "encoding_aes_key", "previous_encoding_aes_key", "app_secret")),
            "wecom": ("R1BOX_WECOM", ("token", "encoding_aes_key", "previous_encoding_aes_key", "corp_secret"))}


def load_config(path: str | Path | None = None, overrides: dict[str, dict] | None = None, *,
                secrets: bool = True, service: str = "") -> Config:
    """Read the TOML file (None: defaults only), apply flag overrides ({"server": {"port": 9000}}), validate.
    secrets=False, for a tool that only asks where the service is (a health check, outside the service's
    environment): the secrets the service needs are neither read nor required. service="model" or "serve": only
    what that process needs (the model process never reads the WeChat secrets; serve needs no model API keys)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such configuration file; copy appliance/config.example.toml and edit "
                              "it.") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e}); fix the line it names.") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror}).") from None
    where = str(path) if path else "defaults"
    unknown = set(raw) - set(_SECTIONS) - {"backends"}
    if unknown:
        raise ConfigError(f"{where}: unknown section [{sorted(unknown)[0]}]; known: {', '.join(_SECTIONS)}, "
                          "[[backends]].")
    sections = {}
    for name, cls in _SECTIONS.items():
        table = dict(raw.get(name, {}))
        table.update({k: v for k, v in (overrides or {}).get(name, {}).items() if v is not None})
        sections[name] = _build(cls, table, f"{where} [{name}]")
    backends = _backends(raw.get("backends", []), sections["model_server"], where, secrets and service != "model")
    if not secrets:
        return Config(**sections, backends=backends)
    keys = tuple(k.strip() for k in ",".join(os.environ.get(v, "") for v in ("R1BOX_MODEL_KEY", "R1BOX_API_KEYS"))
                 .split(",") if k.strip())
    model_server = dataclasses.replace(sections["model_server"], api_keys=keys if service != "serve" else ())
    if service != "serve" and not model_server.loopback and not model_server.api_keys:
        raise ConfigError(f"{where} [model_server]: host {model_server.host} is reachable from other machines, so "
                          "the model API needs keys: set R1BOX_API_KEYS=key1,key2 in its environment, or bind "
                          "127.0.0.1.")
    if service != "model":
        for name, (prefix, keys) in _SECRETS.items():
            sections[name] = _with_secrets(sections[name], prefix, keys, f"{where} [{name}]")
    return Config(**{**sections, "model_server": model_server}, backends=backends)


def _backends(tables, model_server: ModelServerConfig, where: str, secrets: bool) -> tuple[BackendConfig, ...]:
    """[[backends]] as written, each with its key from the environment; none written: the box's own model."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{where}: backends must be an array of tables: [[backends]] with url = \"...\".")
    if not tables:
        tables = [{"name": "local", "url": model_server.own_url, "key_env": "R1BOX_MODEL_KEY",
                   "verify_tls": not model_server.speaks_tls}]
    out = []
    for i, table in enumerate(tables, 1):
        table, here = dict(table), f"{where} [[backends]] #{i}"
        if not isinstance(table.get("url"), str):
            raise ConfigError(f"{here}: url is required (the backend's base URL, http://host:port).")
        if "key" in table:
            raise ConfigError(f"{here}: a key never sits in the file; name the environment variable that holds it "
                              "with key_env.")
        table.setdefault("priority", i - 1)
        backend = _build(BackendConfig, table, here, BackendConfig(url="http://example"))
        if secrets and backend.key_env:
            backend = dataclasses.replace(backend, key=os.environ.get(backend.key_env, "").split(",")[0].strip())
        out.append(backend)
    names = [b.label for b in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where} [[backends]]: two backends named {max(names, key=names.count)!r}; give each a "
                          "name.")
    return tuple(out)


def _with_secrets(section, prefix: str, keys: tuple[str, ...], where: str):
    """Secrets from the environment override the file's; then what an enabled account needs is checked."""
    found = {k: os.environ[f"{prefix}_{k.upper()}"].strip() for k in keys if os.environ.get(f"{prefix}_{k.upper()}")}
    section = dataclasses.replace(section, **found)
    if not (getattr(section, "app_id", "") or getattr(section, "corp_id", "")):
        return section
    if not section.token:
        raise ConfigError(f"{where}: token is required (the Token of the platform's server configuration page; "
                          f"or {prefix}_TOKEN in the environment).")
    for key in ("encoding_aes_key", "previous_encoding_aes_key"):
        value = getattr(section, key)
        if value and len(value) != 43:
            raise ConfigError(f"{where}: {key} must be the 43-character EncodingAESKey.")
    encrypted = getattr(section, "mode", "safe") != "plain"
    if encrypted and not section.encoding_aes_key:
        raise ConfigError(f"{where}: encoding_aes_key is required for encrypted messages (or "
                          f"{prefix}_ENCODING_AES_KEY in the environment).")
    if getattr(section, "delivery", "") == "push" and not section.app_secret:
        raise ConfigError(f"{where}: delivery = \"push\" needs app_secret (or {prefix}_APP_SECRET) for the "
                          "customer-service API.")
    return section


def _build(cls, table: dict, where: str, example=None):
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _FROM_ENV_ONLY}
    example = example or cls()
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(fields)}.")
        expected = type(getattr(example, key))
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

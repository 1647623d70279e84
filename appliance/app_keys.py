"""The typed keys of the aiohttp application: what lives on the app, in one place."""

from aiohttp import web

from appliance.backends.pool import Backends
from appliance.config import Config, ServerConfig
from appliance.model.chat import ChatService
from appliance.ops.metrics import Metrics
from appliance.release.manager import ReleaseManager
from appliance.store.database import Store
from appliance.wechat.service import WeChatService

CONFIG = web.AppKey("config", Config)
LISTENER = web.AppKey("listener", ServerConfig)  # where this process listens: [server] or [model_server]
CHAT = web.AppKey("chat", ChatService)  # `r1box model`'s tokenizer and engine, ready once startup has run
API_KEYS = web.AppKey("api_keys", tuple)  # the model API's bearer keys ([model_server]); none: loopback only
BACKENDS = web.AppKey("backends", Backends)  # serve's model backends, probed in the background
STARTED = web.AppKey("started", float)  # when the application was made (time.time())
STORE = web.AppKey("store", Store)  # the SQLite database, opened on its own thread
CONFIG_FILE = web.AppKey("config_file", str)  # the TOML file serve was started with ("" for defaults)
RELEASE = web.AppKey("release", ReleaseManager)  # the gray release a WeChat-serving box follows
WECHAT = web.AppKey("wechat", WeChatService)  # present when an Official Account or WeCom app is configured
METRICS = web.AppKey("metrics", Metrics)  # the Prometheus registry, served on its own listener
METRICS_PORT = web.AppKey("metrics_port", int)  # the port actually bound (the config may say 0: any free one)
ADMIN_PORT = web.AppKey("admin_port", int)  # the admin listener's port actually bound

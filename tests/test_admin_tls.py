"""TLS on the real service: the admin listener (started by the app like the metrics one) speaks TLS 1.3 only,
with a self-signed certificate made at first start whose logged fingerprint is the one served, or the configured
certificate; the service port speaks TLS 1.3 when bound beyond loopback, or plain HTTP when told to ([server]
tls = "off", for callbacks behind a reverse proxy), and then its API answers this machine only. The first admin
comes from the CLI, with the password on stdin."""

import asyncio
import getpass
import hashlib
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import time

import aiohttp
import pytest

from appliance.admin.tls import fingerprint, make_self_signed
from appliance.app import create_app
from appliance.app_keys import ADMIN_PORT
from appliance.config import load_config
from appliance.errors import ConfigError
from appliance.model.server import create_model_app
from tests.conftest import free_port, write_config

PASSWORD = "a first admin password"


def _handshake(port: int, cafile, **versions) -> tuple[str, bytes]:
    context = ssl.create_default_context(cafile=str(cafile))
    for key, value in versions.items():
        setattr(context, key, value)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.version(), tls.getpeercert(binary_form=True)


def _colons(digest: str) -> str:
    return ":".join(digest.upper()[i:i + 2] for i in range(0, len(digest), 2))


async def test_admin_listener_is_tls13_only_with_the_logged_self_signed_certificate(start_box, tiny_fp32,
                                                                                  tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config = load_config(write_config(tmp_path, tiny_fp32))
    client = await start_box(config)
    port, cert = client.app[ADMIN_PORT], tmp_path / "admin-tls" / "cert.pem"
    assert port and cert.exists() and oct((tmp_path / "admin-tls" / "key.pem").stat().st_mode & 0o777) == "0o600"
    version, served = await asyncio.to_thread(_handshake, port, cert)
    assert version == "TLSv1.3"
    logged = [r for r in caplog.records if getattr(r, "tls_fingerprint", None)]
    assert logged and logged[0].tls_fingerprint == _colons(hashlib.sha256(served).hexdigest())
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(_handshake, port, cert, maximum_version=ssl.TLSVersion.TLSv1_2)
    async with aiohttp.ClientSession() as http:  # plain HTTP gets no page
        with pytest.raises(aiohttp.ClientError):
            await http.get(f"http://127.0.0.1:{port}/login")
        resp = await http.get(f"https://127.0.0.1:{port}/login", ssl=ssl.create_default_context(cafile=str(cert)))
        assert resp.status == 200 and resp.headers["Strict-Transport-Security"].startswith("max-age=")


async def test_a_configured_certificate_is_used_and_a_bad_one_named(start_box, tiny_fp32, tmp_path):
    own_cert, own_key = make_self_signed(tmp_path / "own")
    path = write_config(tmp_path, tiny_fp32, f'[admin]\ncert = "{own_cert}"\nkey = "{own_key}"\n')
    text = path.read_text().replace("[admin]\nport = 0\n", "")  # one [admin] table: the test's, with port 0
    path.write_text(text.replace(f'key = "{own_key}"\n', f'key = "{own_key}"\nport = 0\n'))
    client = await start_box(load_config(path))
    _, served = await asyncio.to_thread(_handshake, client.app[ADMIN_PORT], own_cert)
    assert _colons(hashlib.sha256(served).hexdigest()) == fingerprint(own_cert)
    assert not (tmp_path / "admin-tls").exists()
    (tmp_path / "own" / "cert.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"\[admin\] cert"):
        async with await start_box(load_config(path)):
            pass


def test_first_admin_from_the_cli_with_the_password_on_stdin(tmp_path):
    config = tmp_path / "r1box.toml"
    config.write_text(f'[store]\npath = "{tmp_path / "r1box.db"}"\n')
    cli = [sys.executable, "-m", "appliance.cli", "admin", "add-user"]
    console = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")}  # at the box, not over SSH
    done = subprocess.run(cli + ["root", "--role", "admin", "--config", str(config)], input=PASSWORD + "\n",
                          capture_output=True, text=True, timeout=60, env=console)
    assert done.returncode == 0 and "added root (admin)" in done.stdout and PASSWORD not in done.stdout + done.stderr
    short = subprocess.run(cli + ["other", "--role", "admin", "--config", str(config)], input="short\n",
                           capture_output=True, text=True, timeout=60)
    assert short.returncode != 0 and "at least 10 characters" in short.stderr
    from appliance.admin import auth
    from appliance.store.database import open_database

    db = open_database(tmp_path / "r1box.db")
    assert auth.login(db, "root", PASSWORD, 5) is not None and auth.login(db, "other", "short", 5) is None
    rows = [(r["operation"], r["user_id"], r["ip_address"]) for r in db["audit_log"].rows]
    assert rows == [("user_added", f"cli:{getpass.getuser()}", "local")]


def test_both_services_beyond_loopback_speak_tls13(tiny_fp32, tmp_path):
    """r1box model and r1box serve on every address: TLS 1.3 only, serve reaching its model over it."""
    port, model_port = free_port(), free_port()
    config = write_config(tmp_path, tiny_fp32, f'[server]\nhost = "0.0.0.0"\nport = {port}\n'
                          f'[model_server]\nhost = "0.0.0.0"\nport = {model_port}\n')
    env = dict(os.environ, R1BOX_API_KEYS="tls-test-key", R1BOX_MODEL_KEY="tls-model-key")
    model = subprocess.Popen([sys.executable, "-m", "appliance.cli", "model", "--config", str(config)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    serve = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(config)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cert = tmp_path / "admin-tls" / "cert.pem"
    try:
        for listener in (port, model_port):
            for _ in range(300):
                try:
                    version, _ = _handshake(listener, cert)
                    break
                except (OSError, ssl.SSLError):
                    assert model.poll() is None and serve.poll() is None, (model.poll() and model.stdout.read(),
                                                                           serve.poll() and serve.stdout.read())
                    time.sleep(0.2)
            assert version == "TLSv1.3"
            with pytest.raises(ssl.SSLError):
                _handshake(listener, cert, maximum_version=ssl.TLSVersion.TLSv1_2)
        outside = {k: v for k, v in env.items() if not k.endswith("_KEY") and k != "R1BOX_API_KEYS"}  # a shell
        for which in (["--model"], []):  # serve is ok once its next probe (every second) finds the model up
            deadline = time.monotonic() + 60
            while True:
                checked = subprocess.run([sys.executable, "-m", "appliance.cli", "health", "--config", str(config),
                                          "--wait", "60", *which], env=outside, capture_output=True, text=True,
                                         timeout=90)
                assert checked.returncode == 0, checked.stderr  # asked over TLS
                if '"status": "ok"' in checked.stdout or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert '"status": "ok"' in checked.stdout, checked.stdout
        backends = json.loads(checked.stdout)["backends"]
        assert backends[0]["url"] == f"https://127.0.0.1:{model_port}" and backends[0]["state"] in ("up", "trial")
    finally:
        for process in (serve, model):
            process.terminate()
            process.wait(timeout=30)


def _this_machines_lan_address() -> str:
    """The address other machines reach this one by: the source of the default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))
        return probe.getsockname()[0]


async def test_tls_off_serves_plain_http_and_the_model_api_to_this_machine_only(aiohttp_client, tiny_fp32,
                                                                                  tmp_path, monkeypatch):
    monkeypatch.setenv("R1BOX_API_KEYS", "plain-test-key")
    config = load_config(write_config(tmp_path, tiny_fp32, '[server]\nhost = "0.0.0.0"\ntls = "off"\n'
                                      '[model_server]\nhost = "0.0.0.0"\ntls = "off"\n'))
    assert config.server.scheme == "http" and not config.server.speaks_tls
    model = await aiohttp_client(create_model_app(config), server_kwargs={"host": "0.0.0.0"})
    serve = await aiohttp_client(create_app(config), server_kwargs={"host": "0.0.0.0"})
    lan, key = _this_machines_lan_address(), {"Authorization": "Bearer plain-test-key"}
    assert not lan.startswith("127."), lan
    async with aiohttp.ClientSession() as elsewhere:  # a peer on the office network, as the reverse proxy is
        assert (await elsewhere.get(f"http://{lan}:{serve.port}/healthz")).status == 200  # callbacks' listener
        assert (await elsewhere.get(f"http://{lan}:{model.port}/healthz")).status == 200
        for path in ("/v1/models", "/metrics"):
            refused = await elsewhere.get(f"http://{lan}:{model.port}{path}", headers=key)
            assert refused.status == 403 and 'tls = \\"auto\\"' in await refused.text()
    assert (await model.get("/v1/models")).status == 401  # this machine: the key is still asked for
    assert (await model.get("/v1/models", headers=key)).status == 200


@pytest.mark.parametrize("host, tls, scheme", [("127.0.0.1", "auto", "http"), ("0.0.0.0", "auto", "https"),
                                               ("127.0.0.1", "on", "https"), ("::", "off", "http")])
def test_where_the_service_port_speaks_tls(tmp_path, monkeypatch, host, tls, scheme):
    monkeypatch.setenv("R1BOX_API_KEYS", "k")
    path = tmp_path / "r1box.toml"
    path.write_text(f'[server]\nhost = "{host}"\ntls = "{tls}"\n')
    assert load_config(path).server.scheme == scheme


@pytest.mark.parametrize("peer, loopback", [("127.0.0.1", True), ("127.5.0.1", True), ("::1", True),
                                            ("::ffff:127.0.0.1", True), ("localhost", True), ("10.1.2.3", False),
                                            ("::ffff:10.1.2.3", False), ("", False), (None, False)])
def test_peers_on_this_machine(peer, loopback):
    from appliance.config import is_loopback

    assert is_loopback(peer) is loopback

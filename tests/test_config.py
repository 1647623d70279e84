"""The configuration path: TOML and flags into frozen dataclasses, with every mistake named."""

import dataclasses

import pytest

from appliance.config import load_config
from appliance.errors import ConfigError


def _write(tmp_path, text):
    path = tmp_path / "r1box.toml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    config = load_config(_write(tmp_path, "[engine]\nmax_batch = 4\n[server]\nport = 9000\n"),
                         {"server": {"port": 9100, "host": None}})
    assert config.engine.max_batch == 4 and config.server.port == 9100 and config.server.host == "127.0.0.1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1


@pytest.mark.parametrize("text, fragment", [
    ("[engine\nmax_batch = 4", "not valid TOML"),
    ("[wechat_typo]\n", "unknown section [wechat_typo]"),
    ("[engine]\nmax_btach = 4\n", "unknown key 'max_btach'"),
    ("[engine]\nmax_batch = \"four\"\n", "max_batch must be a int"),
    ("[engine]\nmax_batch = 0\n", "max_batch must be between 1 and 64"),
    ("[model]\nprovider = \"tpu\"\n", "provider must be auto, cpu or cuda"),
    ("[server]\napi_keys = [\"in-the-file\"]\n", "unknown key 'api_keys'"),
    ("[server]\ntls = true\n", "tls must be a str"),
    ("[server]\ntls = \"tls1.2\"\n", 'tls must be "auto", "on" or "off"'),
    ("[ha]\nenabled = true\n", "[ha]: address is required when enabled"),
    ("[ha]\nenabled = true\naddress = \"10.0.0.1\"\npeer = \"box-b\"\nvirtual_address = \"10.0.0.50/24\"\n",
     "address, peer and virtual_address must be addresses"),
    ("[ha]\nenabled = true\naddress = \"10.0.0.1\"\npeer = \"10.0.0.2\"\nvirtual_address = \"10.0.0.50\"\n",
     "virtual_address needs its prefix length"),
])
def test_mistakes_are_named(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(_write(tmp_path, text))
    assert fragment in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml")


def test_a_wide_model_api_needs_keys_from_the_environment(tmp_path, monkeypatch):
    path = _write(tmp_path, '[model_server]\nhost = "0.0.0.0"\n')
    monkeypatch.delenv("R1BOX_API_KEYS", raising=False)
    monkeypatch.delenv("R1BOX_MODEL_KEY", raising=False)
    with pytest.raises(ConfigError, match="R1BOX_API_KEYS"):
        load_config(path)
    assert load_config(path, secrets=False).model_server.host == "0.0.0.0"  # a health check asks where it listens
    assert load_config(path, service="serve").model_server.api_keys == ()  # serve only calls it
    monkeypatch.setenv("R1BOX_API_KEYS", "secret-1")
    monkeypatch.setenv("R1BOX_MODEL_KEY", "inner-1")
    config = load_config(path)
    assert config.model_server.api_keys == ("inner-1", "secret-1") and "secret-1" not in repr(config)
    assert config.backends[0].key == "inner-1" and "inner-1" not in repr(config)  # the local backend's
    assert load_config(path, secrets=False).model_server.api_keys == ()  # not even read
    assert load_config(_write(tmp_path, '[server]\nhost = "0.0.0.0"\n'), service="serve").server.host == "0.0.0.0"


def test_backends_default_to_the_box_own_model(tmp_path):
    (local,) = load_config(_write(tmp_path, '[model_server]\nport = 9001\n')).backends
    assert (local.name, local.url, local.key_env, local.priority) == ("local", "http://127.0.0.1:9001",
                                                                     "R1BOX_MODEL_KEY", 0)
    (tls,) = load_config(_write(tmp_path, '[model_server]\ntls = "on"\n')).backends
    assert tls.url == "https://127.0.0.1:8081" and not tls.verify_tls  # its own self-signed certificate


def test_backends_as_written_with_keys_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HQ_KEY", "hq-secret")
    config = load_config(_write(tmp_path, '[[backends]]\nurl = "http://127.0.0.1:8081"\n'
                                '[[backends]]\nname = "hq"\nurl = "https://hq.example:8000"\nkey_env = "HQ_KEY"\n'
                                'model = "deepseek-r1-distill-qwen-32b"\ntimeout_s = 60\nmax_concurrent = 32\n'))
    first, hq = config.backends
    assert first.label == "127.0.0.1:8081" and first.priority == 0 and first.key == ""
    assert (hq.label, hq.priority, hq.key, hq.timeout_s, hq.max_concurrent) == ("hq", 1, "hq-secret", 60.0, 32)
    assert "hq-secret" not in repr(config)


@pytest.mark.parametrize("text, fragment", [
    ('backends = "http://x"\n', "backends must be an array of tables"),
    ('[[backends]]\nname = "a"\n', "url is required"),
    ('[[backends]]\nurl = "ftp://x"\n', "url must start with http:// or https://"),
    ('[[backends]]\nurl = "http://x"\nkey = "in-the-file"\n', "name the environment variable"),
    ('[[backends]]\nurl = "http://x"\nweight = 0\n', "weight and max_concurrent must be at least 1"),
    ('[[backends]]\nurl = "http://x"\ntimeout = 5\n', "unknown key 'timeout'"),
    ('[[backends]]\nurl = "http://x"\n[[backends]]\nurl = "http://x"\n', "two backends named 'x'"),
])
def test_backend_mistakes_are_named(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    assert fragment in str(err.value) and "[[backends]]" in str(err.value)


def test_the_example_file_is_the_defaults():
    from pathlib import Path

    import appliance

    assert load_config(Path(appliance.__file__).parent / "config.example.toml") == load_config(None)


def test_wechat_secrets_from_the_file_or_the_environment(tmp_path, monkeypatch):
    for key in ("TOKEN", "ENCODING_AES_KEY", "APP_SECRET"):
        monkeypatch.delenv(f"R1BOX_WECHAT_{key}", raising=False)
    with pytest.raises(ConfigError, match="token is required"):
        load_config(_write(tmp_path, '[wechat]\napp_id = "wx1"\nmode = "plain"\n'))
    with pytest.raises(ConfigError, match="encoding_aes_key is required"):
        load_config(_write(tmp_path, '[wechat]\napp_id = "wx1"\ntoken = "t"\n'))
    with pytest.raises(ConfigError, match="43-character"):
        load_config(_write(tmp_path, '[wechat]\napp_id = "wx1"\ntoken = "t"\nencoding_aes_key = "short"\n'))
    with pytest.raises(ConfigError, match="needs app_secret"):
        load_config(_write(tmp_path, '[wechat]\napp_id = "wx1"\ntoken = "t"\nmode = "plain"\ndelivery = "push"\n'))
    monkeypatch.setenv("R1BOX_WECHAT_TOKEN", "from-env")
    config = load_config(_write(tmp_path, '[wechat]\napp_id = "wx1"\ntoken = "from-file"\nmode = "plain"\n'))
    assert config.wechat.token == "from-env" and "from-env" not in repr(config)

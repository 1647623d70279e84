"""What the node writes for the tools it runs, checked by those tools: keepalived's own configuration test, litestream
reading its configuration, sshd's extended test mode; and the pair's keys made once, never over existing ones."""

import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.errors import HaError
from appliance.ha import keepalived, replication
from appliance.ha.pairing import PairFiles, pair, sshd_config

pytestmark = pytest.mark.skipif(not shutil.which("keepalived"), reason="`just test` installs keepalived first")


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "r1box.toml"
    path.write_text(f'[store]\npath = "{tmp_path / "data" / "r1box.db"}"\n'
                    '[ha]\nenabled = true\nnode = "box-a"\ninterface = "eth0"\naddress = "192.168.1.11"\npeer = "192.168.1.12"\n'
                    'virtual_address = "192.168.1.50/24"\npriority = 150\nssh_port = 2222\n')
    return load_config(path, secrets=False)


def test_keepalived_accepts_its_configuration(config, tmp_path):
    files = PairFiles.of(config.ha, config.store.file)
    pair(files)
    conf = keepalived.write(config.ha, tmp_path / "ha", files.auth_pass())
    text = conf.read_text()
    assert "nopreempt" in text and "unicast_peer {\n        192.168.1.12" in text and "priority 150" in text
    result = subprocess.run(["keepalived", "--config-test", f"--use-file={conf}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert keepalived.parse('INSTANCE "r1box" MASTER 150\n') == "MASTER"
    assert keepalived.parse('INSTANCE "other" MASTER 150\n') is None
    assert keepalived.parse('INSTANCE "r1box" MASTER_PRIORITY 40\n') is None


def test_an_empty_interface_is_the_one_holding_the_address():
    # what the node does when [ha] interface is left empty (the image: the LAN port's name is the machine's)
    assert keepalived.interface_holding("127.0.0.1") == "lo"
    assert keepalived.interface_holding("192.0.2.77") is None


def test_litestream_and_sshd_accept_theirs(config, tmp_path):
    files = PairFiles.of(config.ha, config.store.file)
    pair(files)
    yml = tmp_path / "litestream.yml"
    yml.write_text(replication.render(config.store.file, config.ha, 7, tmp_path / "ls.sock", files.key,
                                      files.host_public()))
    result = subprocess.run([replication.litestream_binary(), "databases", "-config", str(yml)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "sftp" in result.stdout, result.stderr
    assert "path: " + str(config.store.file.parent / "replica" / "epoch-000007") in yml.read_text()
    (tmp_path / "ha").mkdir()
    conf = sshd_config(config.ha, tmp_path / "ha", files)
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    Path("/run/sshd").mkdir(exist_ok=True)
    result = subprocess.run([sshd, "-T", "-f", str(conf)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "forcecommand internal-sftp" in result.stdout and "passwordauthentication no" in result.stdout


def test_the_pair_keys_are_made_once(config):
    files = PairFiles.of(config.ha, config.store.file)
    made = pair(files)
    assert all(p.exists() for p in made) and oct(files.key.stat().st_mode)[-3:] == "600"
    assert files.host_public().startswith("ssh-ed25519 ")
    with pytest.raises(HaError, match="is paired"):
        pair(files)
    files.key.unlink()
    with pytest.raises(HaError, match="r1box ha pair"):
        files.check()

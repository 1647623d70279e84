"""The runtime refuses an artifact whose manifest or files do not match, naming the file and what to do."""

import json
import shutil

import pytest

from appliance.errors import ArtifactError
from appliance.model.manifest import load_manifest


@pytest.fixture
def artifact(tiny_int4, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(tiny_int4, copy)
    return copy


def test_a_good_artifact_loads(artifact):
    manifest = load_manifest(artifact)
    assert manifest.graph_path == artifact / "model.onnx"
    assert manifest.kv.past_key[0] == "past_key_values.0.key"


def test_changed_file_is_refused(artifact):
    data = bytearray((artifact / "tokenizer.json").read_bytes())
    data[100] ^= 0x20
    (artifact / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"tokenizer.json does not match its sha256.*Export it again"):
        load_manifest(artifact)


def test_truncated_weights_are_refused(artifact):
    weights = artifact / "model.onnx.data"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"model.onnx.data has 1000 bytes"):
        load_manifest(artifact)


def test_missing_file_is_refused(artifact):
    (artifact / "chat_template.jinja").unlink()
    with pytest.raises(ArtifactError, match="chat_template.jinja is listed in the manifest but missing"):
        load_manifest(artifact)


def test_corrupt_manifest(artifact):
    (artifact / "manifest.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_manifest(artifact)


def test_wrong_format_version(artifact):
    raw = json.loads((artifact / "manifest.json").read_text())
    raw["format_version"] = 99
    (artifact / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="version 99"):
        load_manifest(artifact)


def test_no_manifest(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_manifest(tmp_path)

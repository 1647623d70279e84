# r1box: the front door. `just` lists the recipes.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv"
python := venv / "bin" / "python"

# list the recipes
default:
    @just --list

# install everything, fetch and export the default model (once), and chat with it
chat *ARGS: install
    {{venv}}/bin/r1box chat {{ARGS}}

# install everything and run the whole test suite (the real 0.5B model included)
test *ARGS: install
    {{python}} -m pytest {{ARGS}}

# fast tests only: the tiny random model, no 0.5 GB download
test-fast *ARGS: install
    {{python}} -m pytest -m "not slow" {{ARGS}}

# export a model (catalog name, HF directory or .gguf) into an artifact directory
export SOURCE OUT *FLAGS: install
    {{venv}}/bin/r1box export {{SOURCE}} --out {{OUT}} {{FLAGS}}

# the runtime, the export stage and the test tools in .venv (a no-op when pyproject.toml has not changed)
install:
    #!/usr/bin/env bash
    set -euo pipefail
    stamp="{{venv}}/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
    [ -f "$stamp" ] && exit 0
    [ -x "{{python}}" ] || python3 -m venv "{{venv}}"
    echo "installing r1box with the export stage into {{venv}} (first time: a few minutes)" >&2
    "{{python}}" -m pip install --quiet --upgrade pip
    "{{python}}" -m pip install --quiet --editable ".[export,dev]"
    rm -f "{{venv}}"/.installed-* && touch "$stamp"

# swap the CPU onnxruntime for onnxruntime-gpu on an NVIDIA box (CUDA 12/13 libraries must be present)
install-gpu: install
    {{python}} -m pip uninstall --yes onnxruntime
    {{python}} -m pip install --quiet onnxruntime-gpu ".[gpu]"

#!/usr/bin/env bash
# The anchor side of the benchmark: a separate virtualenv with onnxruntime-genai (and its model builder), and an int4
# CPU model built with that builder from a GGUF file.
#
#   anchor_setup.sh                           # only make the venv
#   anchor_setup.sh GGUF_PATH OUT_DIR [EP]    # make the venv, then build OUT_DIR (skipped if it is already built)
#
# EP is the execution provider the model is built for: cpu (the default) or cuda (float16 activations, for
# onnxruntime-genai-cuda on an NVIDIA box; the build itself runs on the CPU).
#
# The venv lives at ${R1BOX_CACHE:-$HOME/.cache/r1box}/genai-venv and is kept apart from r1box's own dependencies
# (the builder wants transformers >= 5; r1box's export extra pins transformers < 4.58). Its python is printed last.
#
# Why not `-i file.gguf`: onnxruntime-genai's builder reads a GGUF only when it is float16/float32 (it copies the raw
# tensor bytes, so Q4_K/Q5_0/Q8_0 blocks would come through as garbage), and it still takes the config and the
# tokenizer from the hub (-m NAME), which is not reachable here. So the GGUF is first dequantized into a Hugging Face
# directory with transformers (`from_pretrained(..., gguf_file=...)`), and the builder reads that directory.
set -euo pipefail

CACHE="${R1BOX_CACHE:-$HOME/.cache/r1box}"
VENV="$CACHE/genai-venv"
PY="${PYTHON:-python3}"
# torch is pinned: this exact version resolves to the local CPU build; an unpinned torch pulls a multi-GB CUDA build.
REQS=(onnxruntime-genai "transformers>=5" "torch==2.13.0" "gguf>=0.10" "accelerate>=1.0" "onnx>=1.17" onnx-ir
      numpy safetensors)
STAMP="$VENV/.r1box-stamp"
WANT="v1 ${REQS[*]}"

log() { echo "anchor_setup: $*" >&2; }

if [[ ! -x "$VENV/bin/python" || ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
    log "creating $VENV"
    t0=$SECONDS
    mkdir -p "$CACHE"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q --upgrade "${REQS[@]}"
    "$VENV/bin/python" -c "import onnxruntime_genai, transformers, torch, gguf, accelerate, onnx" >/dev/null
    echo "$WANT" >"$STAMP"
    log "venv ready in $((SECONDS - t0)) s (onnxruntime-genai $("$VENV/bin/python" -c \
        'import onnxruntime_genai as og; print(og.__version__)'))"
else
    log "venv up to date: $VENV"
fi

if [[ $# -eq 0 ]]; then
    echo "$VENV/bin/python"
    exit 0
fi
if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: $0 [GGUF_PATH OUT_DIR [cpu|cuda]]" >&2
    exit 2
fi
EP="${3:-cpu}"
[[ "$EP" == cpu || "$EP" == cuda ]] || { echo "anchor_setup: EP must be cpu or cuda, not $EP" >&2; exit 2; }

GGUF="$(realpath "$1")"
OUT="$(realpath -m "$2")"
[[ -f "$GGUF" ]] || { echo "anchor_setup: no such GGUF file: $GGUF" >&2; exit 2; }
if [[ -f "$OUT/genai_config.json" ]]; then
    log "already built: $OUT"
    echo "$VENV/bin/python"
    exit 0
fi

PARENT="$(dirname "$OUT")"
mkdir -p "$PARENT"
WORK="$(mktemp -d "$PARENT/.genai-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

log "dequantizing $GGUF into a Hugging Face directory ($WORK/hf)"
t0=$SECONDS
"$VENV/bin/python" - "$GGUF" "$WORK/hf" <<'EOF'
import os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = sys.argv[1], sys.argv[2]
d, f = os.path.dirname(gguf), os.path.basename(gguf)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
# transformers 5 refuses to save a model "quantized with gguf"; and a config that still names the gguf quantization
# makes the builder try (and fail) to load it as a pre-quantized model. The weights are plain float32 by now.
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tok.save_pretrained(out)
EOF
log "dequantized in $((SECONDS - t0)) s"

log "building int4 model for $EP"
t0=$SECONDS
# The builder logs every tensor it quantizes and saves: keep that in a file, and show its tail only on failure.
if ! "$VENV/bin/python" -m onnxruntime_genai.models.builder -i "$WORK/hf" -o "$WORK/out" -p int4 -e "$EP" \
        -c "$WORK/cache" >"$WORK/builder.log" 2>&1 || [[ ! -f "$WORK/out/genai_config.json" ]]; then
    tr '\r' '\n' <"$WORK/builder.log" | tail -n 30 >&2
    echo "anchor_setup: the model builder failed" >&2
    exit 1
fi
rm -rf "$WORK/hf"
log "built in $((SECONDS - t0)) s"

# Move into place with genai_config.json last, so an interrupted move is not taken as a finished build.
mkdir -p "$OUT"
find "$WORK/out" -mindepth 1 -maxdepth 1 ! -name genai_config.json -exec mv -f -t "$OUT" {} +
mv -f "$WORK/out/genai_config.json" "$OUT/"
log "model at $OUT"
echo "$VENV/bin/python"

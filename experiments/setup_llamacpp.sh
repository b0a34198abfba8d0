#!/usr/bin/env bash
# Set up llama.cpp as a CPU benchmark peer for bild-jax (not part of CI).
#
# llama.cpp is taken from the sdist of llama-cpp-python on PyPI, which vendors
# a full llama.cpp tree in vendor/llama.cpp (no network access besides package
# registries is needed). Three steps, each re-runnable on its own:
#
#   fetch    pip-download the pinned sdist and unpack it into $LLAMACPP_DIR
#   build    CMake-build the CPU-only binaries llama-completion and
#            llama-speculative-simple into $LLAMACPP_DIR/build/bin
#   convert  convert the bundled HF Llama checkpoints to GGUF (f32 and bf16)
#            into $LLAMACPP_DIR/gguf/{large,small,small-aligned}-{f32,bf16}.gguf
#
# Usage:  experiments/setup_llamacpp.sh [fetch] [build] [convert]
#         (no argument = all three steps; the build takes ~10 min on 2 cores)
# Env:    LLAMACPP_DIR (default /work/llamacpp), JOBS (default 2), PYTHON.
#
# Tokenizer workaround: convert_hf_to_gguf.py identifies BPE pre-tokenizers by
# a hash of the tokenizer's output on a fixed text and refuses unknown hashes.
# The bundled tokenizer is a GPT-2 style byte-level BPE (ByteLevel
# pre-tokenizer, GPT-2 regex), so the convert step runs the vendored converter
# through a small inline wrapper that monkeypatches
# conversion.base.TextModel.get_vocab_base_pre to return "gpt-2" (llama.cpp's
# GPT-2 pre-tokenizer) and then runs convert_hf_to_gguf.py as __main__ (runpy);
# the vendored files are not edited. The GGUFs get add_bos_token = false from
# the tokenizer config, so llama.cpp adds no BOS.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36   # newest llama-cpp-python sdist when pinned
LLAMACPP_DIR=${LLAMACPP_DIR:-/work/llamacpp}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLED=$REPO_ROOT/bild_jax/bundled
SRC_DIR=$LLAMACPP_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION
LLAMA_SRC=$SRC_DIR/vendor/llama.cpp
BUILD_DIR=$LLAMACPP_DIR/build
GGUF_DIR=$LLAMACPP_DIR/gguf
MODELS=(large small small-aligned)
TARGETS=(llama-completion llama-speculative-simple)

log() { echo "[setup_llamacpp] $*" >&2; }

fetch() {
    if [[ -f $LLAMA_SRC/CMakeLists.txt ]]; then
        log "source already unpacked: $LLAMA_SRC"
        return
    fi
    mkdir -p "$LLAMACPP_DIR"
    local sdist=$LLAMACPP_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz
    if [[ ! -f $sdist ]]; then
        "$PYTHON" -m pip download --no-deps --no-binary :all: \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$LLAMACPP_DIR"
    fi
    tar -xzf "$sdist" -C "$LLAMACPP_DIR"
    log "unpacked $SRC_DIR"
}

ensure_toolchain() {
    if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null || ! command -v make >/dev/null; then
        log "installing cmake and build-essential"
        apt-get update
        apt-get install -y cmake build-essential
    fi
}

build() {
    ensure_toolchain
    # LLAMA_CURL is deprecated in this llama.cpp version (it only warns); it is
    # passed anyway so that older pins never try to link libcurl.
    cmake -S "$LLAMA_SRC" -B "$BUILD_DIR" \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_SERVER=OFF
    cmake --build "$BUILD_DIR" --config Release -j "$JOBS" --target "${TARGETS[@]}"
    for target in "${TARGETS[@]}"; do
        [[ -x $BUILD_DIR/bin/$target ]] || { log "missing $BUILD_DIR/bin/$target"; exit 1; }
    done
    log "binaries in $BUILD_DIR/bin"
}

ensure_converter_deps() {
    # gguf must match the vendored converter, so install it from gguf-py.
    "$PYTHON" -m pip install --quiet "$LLAMA_SRC/gguf-py"
    # The converter imports these for SentencePiece-based vocabularies.
    "$PYTHON" -c "import sentencepiece, google.protobuf" 2>/dev/null \
        || "$PYTHON" -m pip install --quiet sentencepiece protobuf
}

convert_one() {  # convert_one MODEL_DIR OUTFILE OUTTYPE
    (cd "$LLAMA_SRC" && "$PYTHON" - "$@" <<'PY'
"""Run convert_hf_to_gguf.py with the BPE pre-tokenizer forced to "gpt-2"."""
import runpy
import sys

sys.path.insert(0, ".")
import conversion.base

model_dir, outfile, outtype = sys.argv[1:]
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", outfile, "--outtype", outtype]
runpy.run_path("convert_hf_to_gguf.py", run_name="__main__")
PY
    )
}

convert() {
    ensure_converter_deps
    mkdir -p "$GGUF_DIR"
    for model in "${MODELS[@]}"; do
        for outtype in f32 bf16; do
            local out=$GGUF_DIR/$model-$outtype.gguf
            log "converting $model -> $out"
            convert_one "$BUNDLED/$model" "$out" "$outtype"
        done
    done
    ls -l "$GGUF_DIR" >&2
}

steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(fetch build convert)
for step in "${steps[@]}"; do
    case $step in
        fetch) fetch ;;
        build) fetch; build ;;
        convert) fetch; convert ;;
        *) log "unknown step: $step (expected fetch, build or convert)"; exit 2 ;;
    esac
done

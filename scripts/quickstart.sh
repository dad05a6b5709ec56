#!/usr/bin/env bash
# Fresh machine -> fine-tuned SmolLM2 with before/after answers (about 3-5 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
lorafit quickstart "$@"

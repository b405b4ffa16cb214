#!/usr/bin/env bash
# Set up (if needed) and run the main job on the offline default model, Gemma-3-270m:
# predict, causal-trace a fact, ROME-edit it, undo the edit.   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
bash scripts/setup.sh .venv 3
.venv/bin/python scripts/demo.py "$@"

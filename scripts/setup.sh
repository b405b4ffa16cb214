#!/usr/bin/env bash
# Set up a virtual environment for romelens on a fresh machine.
#   bash scripts/setup.sh [VENV] [TL]
# VENV defaults to .venv; TL is the TransformerLens major version, 3 (HookedTransformer,
# the default) or 4 (TransformerBridge).
# torch is installed first and pinned to 2.13.0, a CPU wheel that our machines hold on
# disk, so that nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
tl="${2:-3}"
case "$tl" in
  3) tl_spec="transformer-lens==3.9.0"; extras="dev,sae,ray" ;;  # sae-lens 6.x needs TransformerLens < 4
  4) tl_spec="transformer-lens>=4,<5"; extras="dev,ray" ;;
  *) echo "TL must be 3 or 4, got '$tl'" >&2; exit 2 ;;
esac
py="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip -q --disable-pip-version-check)
"${pip[@]}" install torch==2.13.0 2> >(grep -v "is ignored: it is neither" >&2)
"${pip[@]}" install -e ".[$extras]" "$tl_spec" 2> >(grep -v "is ignored: it is neither\|BuildBackendWarning\|!!\|\*\*\*\|^ *$" >&2)
"$venv/bin/python" -c "import torch, transformer_lens, importlib.metadata as m; print('venv', '$venv', 'torch', torch.__version__, 'transformer-lens', m.version('transformer-lens'))"

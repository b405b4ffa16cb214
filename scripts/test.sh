#!/usr/bin/env bash
# Set up and run the whole test suite, once per supported TransformerLens major version:
#   bash scripts/test.sh            # 3.x (HookedTransformer) then 4.x (TransformerBridge)
#   ROMELENS_TL="4" bash scripts/test.sh -k prompts   # one version; extra args go to pytest
# The Gemma integration tests compare the two versions' next-token distributions through
# $ROMELENS_PARITY_DIR. A pytest run that collects no tests counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export ROMELENS_PARITY_DIR="${ROMELENS_PARITY_DIR:-$(mktemp -d)}"
# The offline-figure and PNG tests need a Chrome or Chromium binary (they skip, visibly,
# without one). Install Debian's chromium once when missing and we may (root, apt-get).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null && { [ -z "$sudo" ] || sudo -n true 2>/dev/null; }; then
    echo "== installing chromium (figure tests)"
    { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation; } \
      >/tmp/romelens-chromium-apt.log 2>&1 \
      || echo "chromium install failed (see /tmp/romelens-chromium-apt.log): the browser tests will skip"
  else
    echo "no chromium and no apt-get as root: the browser tests will skip"
  fi
fi
status=0
for tl in ${ROMELENS_TL:-3 4}; do
  venv=".venv"; [ "$tl" = 4 ] && venv=".venv-tl4"
  echo "== TransformerLens $tl.x in $venv"
  bash scripts/setup.sh "$venv" "$tl" || { echo "setup failed for TL $tl"; exit 1; }
  start=$(date +%s)
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
  rc=$?
  echo "== TransformerLens $tl.x: pytest exit $rc in $(( $(date +%s) - start )) s"
  if [ "$rc" = 5 ]; then echo "pytest collected no tests: failing"; rc=1; fi
  [ "$rc" = 0 ] || status=1
done
exit $status

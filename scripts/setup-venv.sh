#!/usr/bin/env bash
# Creates (or refreshes) the pinned Python venv at $OM_VENV (default: <repo>/.venv).
# Idempotent: does nothing when the venv already matches scripts/requirements.txt.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${OM_VENV:-$root/.venv}"
req="$root/scripts/requirements.txt"
stamp="$venv/.om-worker-requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup-venv: $venv is up to date"
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r "$req"
# The kernelspec the executor resolves by default ("python3") lives in the venv.
"$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "$want" > "$stamp"
echo "setup-venv: $venv ready"

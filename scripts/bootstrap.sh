#!/usr/bin/env bash
# Creates .venv and installs the package (with its dev extra) when missing or when
# pyproject.toml changed since the last install; quick when everything is there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.gex-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating $venv" >&2
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[bootstrap] installing torch, torchvision and gather-excite[dev] into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # The pair this machine serves from disk (see DEVELOPERS.md); elsewhere PyPI has it.
  if ! "$venv/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    if [ "$(uname -m)" = "aarch64" ]; then
      "$venv/bin/python" -m pip install --quiet torch==2.9.1 torchvision==0.24.1
    else
      "$venv/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
    fi
  fi
  "$venv/bin/python" -m pip install --quiet -e "$root[dev]"
  echo "$want" > "$stamp"
fi

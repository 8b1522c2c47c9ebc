#!/usr/bin/env bash
# Refresh requirements.lock: the whole CPU install (Python 3.11, torch 2.13.0 CPU) at one version each.
# Usage, from the repository root: tools/lock.sh   (a throwaway venv; about a minute)
# torch stays out of the lock on purpose: its CPU and CUDA builds are different files of one version, so README and
# .ci/run install it first, by version (pip-compile lists it under "unsafe"). deepspeed builds against that torch,
# hence --no-build-isolation. Upgrade a package: tools/lock.sh --upgrade-package NAME (or --upgrade for all).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip 2>/dev/null
"$venv/bin/python" -m pip install -q torch==2.13.0 pip-tools==7.7.0 2>/dev/null
CUSTOM_COMPILE_COMMAND="tools/lock.sh" "$venv/bin/pip-compile" -q --no-build-isolation --strip-extras --unsafe-package torch --no-emit-index-url \
  --no-emit-find-links -o requirements.lock "$@" \
  requirements.txt requirements-dev.txt 2>"$venv/log" || { cat "$venv/log" >&2; exit 1; }
echo "requirements.lock: $(grep -c '^[A-Za-z0-9_.-]*==' requirements.lock) pins"

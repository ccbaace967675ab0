#!/usr/bin/env bash
# Idempotent environment set-up: creates ./.venv (or $MUSICLM_VENV) with the pinned stack and installs this
# repository into it in editable mode. Optional first argument: extras, comma-separated (test,tpu,convert,beam).
#   bash launch/setup_env.sh                 # core only
#   bash launch/setup_env.sh test,convert,tpu
# Safe to run again: an existing venv is reused and pip only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MUSICLM_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup_env.sh: musiclm_jax pins need Python 3.11; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24" "setuptools>=70"
SPEC="."
if [ -n "$EXTRAS" ]; then SPEC=".[$EXTRAS]"; fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$SPEC"
if [[ ",$EXTRAS," == *",beam,"* ]]; then
  # apache-beam declares protobuf<7; the pinned stack needs protobuf 7 (sentencepiece's generated code refuses an
  # older runtime) and Beam runs on it. So Beam goes in without its own pins; the `beam` extra pins the rest.
  BEAM_PIN="$("$VENV/bin/python" -c 'import ast; t = ast.parse(open("setup.py").read()); print(next(n.value.value for n in t.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "APACHE_BEAM"))')"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$BEAM_PIN"
fi
echo "setup_env.sh: $VENV ready (extras: ${EXTRAS:-none})"

#!/usr/bin/env bash
# The real tools some tests check pipe's files with, installed from the package registries into
# target/test-tools (a Python virtual environment). Run once before `cargo test`; running it
# again changes nothing when they are there.
#   - tensorboard: its event reader reads back the event files a train stage writes;
#   - jsonschema, PyYAML: validate pipelines against `pipe schema`;
#   - mlflow: a real tracking server (sqlite backend, on 127.0.0.1) that train stages log to;
#   - chromium (Debian's package, system-wide): the headless browser report.html is drawn in.
set -euo pipefail
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  install=(apt-get install -y -q --no-install-recommends chromium)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null
  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
    sudo apt-get update -q >/dev/null && sudo DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null
  else
    echo "tests/setup.sh: a headless chromium is required (Debian/Ubuntu: apt install chromium)" >&2
    exit 1
  fi
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/target/test-tools"
REQUIREMENTS="$ROOT/tests/requirements-tools.txt"
STAMP="$VENV/.installed"
if [ -f "$STAMP" ] && cmp -s "$STAMP" "$REQUIREMENTS"; then
  exit 0
fi
command -v python3 >/dev/null || { echo "tests/setup.sh: python3 is required (apt install python3 python3-venv)" >&2; exit 1; }
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
cp "$REQUIREMENTS" "$STAMP"
echo "tests/setup.sh: test tools ready in $VENV"

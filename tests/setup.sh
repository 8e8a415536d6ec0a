#!/usr/bin/env bash
# The real tools some tests check pipe's files with, installed from the package registries into
# target/test-tools (a Python virtual environment). Run once before `cargo test`; running it
# again changes nothing when they are there.
#   - tensorboard: its event reader reads back the event files a train stage writes;
#   - jsonschema, PyYAML: validate pipelines against `pipe schema`;
#   - mlflow: a real tracking server (sqlite backend, on 127.0.0.1) that train stages log to;
#   - chromium (Debian's package, system-wide): the headless browser report.html is drawn in;
#   - slurm-wlm and munge (Debian's packages): a real Slurm cluster, started by
#     tests/slurm-cluster.sh in target/slurm, that the Slurm executor's tests submit to;
#   - gguf (llama.cpp's Python package): its reader reads exported GGUF files;
#   - node-llama-cpp (npm, in target/test-tools/node): llama.cpp's prebuilt CPU build, which
#     loads exported GGUF files and generates with them (needs Node.js 20 or later).
set -euo pipefail
# Debian packages, system-wide: chromium, and Slurm (slurm-wlm, munge) for tests/slurm.rs.
packages=()
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || packages+=(chromium)
PATH="$PATH:/usr/sbin"
command -v slurmctld >/dev/null && command -v munged >/dev/null || packages+=(slurm-wlm munge)
if [ ${#packages[@]} -gt 0 ]; then
  install=(apt-get install -y -q --no-install-recommends "${packages[@]}")
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null
  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
    sudo apt-get update -q >/dev/null && sudo DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null
  else
    echo "tests/setup.sh: these Debian packages are required: ${packages[*]} (apt install ${packages[*]})" >&2
    exit 1
  fi
fi
# A two-node Slurm cluster private to this checkout (target/slurm, 127.0.0.1).
bash "$(dirname "$0")/slurm-cluster.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/target/test-tools"
REQUIREMENTS="$ROOT/tests/requirements-tools.txt"
STAMP="$VENV/.installed"
NODE_TOOLS="$VENV/node"
NODE_PACKAGES="node-llama-cpp@3.22.1 @node-llama-cpp/linux-x64@3.22.1"
if ! [ -f "$NODE_TOOLS/.installed" ] || [ "$(cat "$NODE_TOOLS/.installed")" != "$NODE_PACKAGES" ]; then
  node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
  if [ "$node_major" -lt 20 ] || ! command -v npm >/dev/null; then
    echo "tests/setup.sh: Node.js 20 or later, with npm, is required (llama.cpp's node-llama-cpp runs on it)" >&2
    exit 1
  fi
  # The prebuilt CPU binaries only: the optional CUDA and Vulkan builds are 600 MB more.
  # shellcheck disable=SC2086
  npm install --prefix "$NODE_TOOLS" --no-audit --no-fund --omit=optional --loglevel=error $NODE_PACKAGES
  echo "$NODE_PACKAGES" > "$NODE_TOOLS/.installed"
fi
if [ -f "$STAMP" ] && cmp -s "$STAMP" "$REQUIREMENTS"; then
  exit 0
fi
command -v python3 >/dev/null || { echo "tests/setup.sh: python3 is required (apt install python3 python3-venv)" >&2; exit 1; }
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
cp "$REQUIREMENTS" "$STAMP"
echo "tests/setup.sh: test tools ready in $VENV"

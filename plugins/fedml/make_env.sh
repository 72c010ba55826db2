#!/usr/bin/env bash
# Build the FedML environment .venv-fedml at the repository root (never touches .venv):
#   Python 3.11 venv <- plugins/fedml/requirements-fedml.txt (our stack + FedML's pins and imports)
#                    <- fedml==0.9.6 --no-deps <- fedpgp-ray (-e .) and fedpgp-fedml (-e plugins/fedml), --no-deps
# Idempotent: a stamp records the hash of every input; with an unchanged stamp nothing is run.
#   VENV=path (default .venv-fedml), PYTHON=python3.11, FORCE=1 rebuilds from scratch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
VENV="${VENV:-.venv-fedml}"
PYTHON="${PYTHON:-$(command -v python3.11 || true)}"
PLUGIN=plugins/fedml
STAMP="$VENV/.fedml-env-stamp"
FEDML_VERSION=0.9.6

if [ -z "$PYTHON" ]; then
    echo "make_env.sh: python3.11 not found (FedML 0.9.6 does not install on Python 3.12: wandb 0.13.2 -> pathtools imports 'imp')" >&2
    exit 1
fi
case "$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" in
    3.11) ;;
    *) echo "make_env.sh: $PYTHON is not Python 3.11 (set PYTHON=python3.11)" >&2; exit 1 ;;
esac

inputs_hash() {
    cat "$PLUGIN/make_env.sh" "$PLUGIN/requirements-fedml.txt" requirements.txt requirements-test.txt setup.py "$PLUGIN/pyproject.toml" \
        | sha256sum | cut -d' ' -f1
}
WANT="$(inputs_hash) fedml==$FEDML_VERSION"

if [ "${FORCE:-0}" = 1 ]; then
    rm -rf "$VENV"
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
    echo "$VENV is up to date"
    exit 0
fi

start=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -r "$PLUGIN/requirements-fedml.txt"
"${PIP[@]}" install -q --no-deps "fedml==$FEDML_VERSION"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e . -e "$PLUGIN"

# The environment must import what the plugin uses, beside the stack it shares with the main venv.
HOME="$(mktemp -d)" "$VENV/bin/python" - <<'EOF'
import warnings
warnings.simplefilter("ignore")
import google.protobuf, mlflow, numpy, open_clip, ray, torch
import fedml, fedml.cross_silo, fedml.simulation.simulator
from fedml.core.distributed.communication.grpc import grpc_comm_manager
import fedpgp_fedml, fedpgp_ray
from fedpgp_fedml import FedPGPClientTrainer, FedPGPServerAggregator
print(f"fedml {fedml.__version__}, torch {torch.__version__}, numpy {numpy.__version__}, "
      f"protobuf {google.protobuf.__version__}, mlflow {mlflow.__version__}, ray {ray.__version__}")
EOF

echo "$WANT" > "$STAMP"
echo "$VENV built in $(( $(date +%s) - start ))s"

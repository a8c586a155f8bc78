#!/usr/bin/env bash
# Runs the interop suite with Debian's python3 (the one python3-libnbd belongs to).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/interop "$@"

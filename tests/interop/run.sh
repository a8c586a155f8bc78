#!/usr/bin/env bash
# Runs the interop suite with Debian's python3 (the one python3-libnbd belongs to).
#   tests/interop/run.sh                 the whole suite
#   tests/interop/run.sh FILE -k NAME    a subset (any pytest arguments)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$#" -eq 0 ]; then set -- tests/interop; fi
exec /usr/bin/python3 -m pytest -q -p no:cacheprovider "$@"

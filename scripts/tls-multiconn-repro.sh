#!/usr/bin/env bash
# Checks for a fixed bug (docs/reliability.md, "Fixed ... the TLS stall"):
# nbdcopy over TLS stalled for ever against bexd on a tmpfs image, about 1
# copy in 3 with two connections. Prints how many of TRIES copies stall. Usage:
#   scripts/tls-multiconn-repro.sh [BEXD] [TRIES] [CONNECTIONS]
set -euo pipefail
BIN=${1:-target/release/bexd}; TRIES=${2:-4}; CONNS=${3:-2}
work=$(mktemp -d); img=/dev/shm/bexd-tls-repro-$$.img
pid=
trap 'kill $pid 2>/dev/null || true; rm -rf "$work" "$img"' EXIT
cd "$(dirname "$0")/.."
read -r server_dir client_home < <(python3 -c "
import os, sys
sys.path.insert(0, 'bench')
from tlscerts import make_tls_dirs
t = make_tls_dirs()
print(t.server_dir, os.path.dirname(os.path.dirname(t.client_dir)))")
dd if=/dev/urandom of="$img" bs=1M count=2048 status=none
port=$((30000 + RANDOM % 5000))
"$BIN" --blockdev driver=file,node-name=f0,filename="$img" \
  --object tls-creds-x509,id=tls0,dir="$server_dir",endpoint=server,verify-peer=off \
  --nbd-server addr.type=inet,addr.host=127.0.0.1,addr.port=$port,tls-creds=tls0 \
  --export type=nbd,id=e,node-name=f0,name=f & pid=$!
sleep 0.5
hung=0
for _ in $(seq 1 "$TRIES"); do
  HOME="$client_home" timeout 30 nbdcopy --connections="$CONNS" "nbds://127.0.0.1:$port/f" null: || hung=$((hung + 1))
done
echo "$hung of $TRIES copies with $CONNS connections stalled"

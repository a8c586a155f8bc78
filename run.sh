#!/usr/bin/env bash
# Builds bexd and serves a disk image over NBD with a QMP monitor.
#   ./run.sh [IMAGE]     (default: ./demo.img, created as a 1 GiB sparse file)
# Stop it with Ctrl-C (SIGINT): in-flight requests finish, data is flushed, exit 0.
set -euo pipefail
cd "$(dirname "$0")"
image="${1:-demo.img}"
port="${BEXD_PORT:-10809}"
qmp="${BEXD_QMP:-$PWD/bexd-qmp.sock}"

cargo build --release --bin bexd
[ -e "$image" ] || truncate -s 1G "$image"

cat <<TXT
Serving $image on nbd://127.0.0.1:$port/disk0 with QMP on $qmp
  qemu-img info nbd://127.0.0.1:$port/disk0
  nbdinfo nbd://127.0.0.1:$port/disk0
  qemu-io -f raw -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' nbd://127.0.0.1:$port/disk0
  QMP: python3 -m qemu.qmp.qmp_shell $qmp     (or: socat - UNIX-CONNECT:$qmp)
TXT
exec target/release/bexd \
  --blockdev "driver=file,node-name=file0,filename=$image" \
  --blockdev driver=raw,node-name=disk0,file=file0 \
  --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$port" \
  --export type=nbd,id=export0,node-name=disk0,name=disk0,writable=on \
  --chardev "socket,id=qmp0,path=$qmp,server=on,wait=off" \
  --monitor chardev=qmp0

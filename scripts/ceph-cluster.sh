#!/usr/bin/env bash
# A one-node Ceph cluster for tests: one monitor, one manager and one OSD (memstore) from
# Debian's ceph packages, on 127.0.0.1 only, with cephx on. Everything lives under DIR
# (config, keyrings, daemon data, logs, pid files, admin sockets), so two clusters started
# in two directories never collide, with each other or with a developer's own cluster.
#
#   scripts/ceph-cluster.sh start DIR    start it; prints shell-sourceable lines:
#                                        CEPH_CONF, CEPH_KEYRING, CEPH_USER, CEPH_POOL,
#                                        CEPH_ADMIN_KEYRING (eval "$(... start DIR)")
#   scripts/ceph-cluster.sh env DIR      the same lines again, for a running cluster
#   scripts/ceph-cluster.sh status DIR   which daemons run, and `ceph health`
#   scripts/ceph-cluster.sh stop DIR     stop every daemon it started (pid files); idempotent
#
# The pool is `rbd` (size 1, min_size 1, initialised with `rbd pool init`); the user for
# bexd's tests is client.bexd with `profile rbd` caps, its keyring DIR/client.bexd.keyring.
# start returns once the pool takes a write. docs/ceph.md has its start-up time and memory.
set -euo pipefail

usage() {
  echo "usage: $0 start|stop|status|env DIR" >&2
  exit 2
}
[ "$#" -eq 2 ] || usage
cmd="$1"
mkdir -p "$2" 2>/dev/null || { echo "ceph-cluster: cannot create $2" >&2; exit 1; }
dir="$(cd "$2" && pwd)"
conf="$dir/ceph.conf"
pool=rbd
user=bexd
daemons=(mon.a mgr.x osd.0)
# Bounded waits, in seconds.
START_TIMEOUT="${CEPH_CLUSTER_TIMEOUT:-60}"
STOP_TIMEOUT=20

die() {
  echo "ceph-cluster: $*" >&2
  exit 1
}

# The pid a daemon's pid file names, if that process is alive and is this cluster's daemon
# (its command line names this cluster's config): a stale file or a reused pid is ignored.
running_pid() {
  local pidf="$dir/run/$1.pid" pid
  [ -s "$pidf" ] || return 1
  pid="$(cat "$pidf")"
  [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "-c $conf" || return 1
  echo "$pid"
}

print_env() {
  echo "CEPH_CONF=$conf"
  echo "CEPH_KEYRING=$dir/client.$user.keyring"
  echo "CEPH_USER=$user"
  echo "CEPH_POOL=$pool"
  echo "CEPH_ADMIN_KEYRING=$dir/client.admin.keyring"
}

# `ceph` as client.admin on this cluster, never waiting long for a monitor.
ceph_admin() {
  ceph -c "$conf" --name client.admin --connect-timeout 10 "$@"
}

# Two free TCP ports on 127.0.0.1 (the monitor's msgr2 and msgr1 addresses).
free_ports() {
  python3 -c '
import socket
ss = [socket.socket() for _ in range(2)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))'
}

# Waits until `check` succeeds, or fails naming `what` and the log to read.
wait_for() {
  local what="$1" log="$2" check="$3" deadline=$((SECONDS + START_TIMEOUT))
  until eval "$check"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      die "$what did not come up within ${START_TIMEOUT}s (log: $log)"
    fi
    sleep 0.2
  done
}

# Launches daemon $1 (type.id), which forks itself into the background once it has
# initialised and writes its pid file.
launch_daemon() {
  local type="${1%%.*}" id="${1#*.}" log="$dir/log/$1.log"
  "ceph-$type" -c "$conf" -i "$id" >>"$log.stdout" 2>&1 \
    || die "ceph-$type -i $id failed to start (log: $log, $log.stdout)"
}

# Waits for daemon $1's pid file.
wait_daemon() {
  wait_for "$1 (pid file)" "$dir/log/$1.log" "running_pid $1 >/dev/null"
}

stop_if_failed() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then do_stop; fi
}

do_start() {
  for d in "${daemons[@]}"; do
    if running_pid "$d" >/dev/null; then
      die "$d of the cluster in $dir is already running (stop it first)"
    fi
  done
  for t in ceph-mon ceph-mgr ceph-osd ceph ceph-authtool monmaptool rbd; do
    command -v "$t" >/dev/null || die "$t not found (scripts/install-deps.sh installs it)"
  done
  # A fresh cluster each time: the old one's data is no use to a test.
  rm -rf "${dir:?}"/{mon.a,mgr.x,osd.0,log,run,*.keyring,monmap,ceph.conf}
  mkdir -p "$dir"/{mon.a,mgr.x,osd.0,log,run}
  # A start that fails half-way stops what it started.
  trap stop_if_failed EXIT

  local fsid v2 v1 osd_uuid
  fsid="$(cat /proc/sys/kernel/random/uuid)"
  osd_uuid="$(cat /proc/sys/kernel/random/uuid)"
  read -r v2 v1 <<<"$(free_ports)"

  cat >"$conf" <<EOF
# A one-node test cluster made by scripts/ceph-cluster.sh; everything is under $dir.
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
keyring = $dir/\$name.keyring
run_dir = $dir/run
pid_file = $dir/run/\$name.pid
admin_socket = $dir/run/\$name.asok
log_file = $dir/log/\$name.log
crash_dir = $dir/crash
log_to_stderr = false
err_to_stderr = false
# One OSD: one copy of everything, placed across OSDs (not hosts), no warning about it.
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
# A shared disk being fuller than Ceph likes is no reason to fail a test.
mon_data_avail_warn = 1
mon_data_avail_crit = 0

[mon]
mon_data = $dir/\$name
# Commit map changes after 0.1 s instead of 1 s: each pool create or OSD boot waits for it.
paxos_propose_interval = 0.1
mon_cluster_log_file = $dir/log/cluster.log

[mgr]
mgr_data = $dir/\$name

[osd]
osd_data = $dir/\$name
osd_objectstore = memstore
memstore_device_bytes = 1073741824
osd_crush_update_on_start = true
EOF

  # Every key at once, in the monitor's initial keyring, so the monitor knows every
  # entity from its first start and no `ceph auth` round trips are needed.
  local kr="$dir/keyring.initial"
  authtool() { ceph-authtool "$@" >/dev/null; }
  authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *'
  authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
  authtool --create-keyring "$dir/mgr.x.keyring" --gen-key -n mgr.x \
    --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *'
  authtool --create-keyring "$dir/osd.0.keyring" --gen-key -n osd.0 \
    --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
  authtool --create-keyring "$dir/client.$user.keyring" --gen-key -n "client.$user" \
    --cap mon 'profile rbd' --cap osd "profile rbd pool=$pool" --cap mgr "profile rbd pool=$pool"
  cp "$dir/mon.keyring" "$kr"
  for k in client.admin mgr.x osd.0 "client.$user"; do
    authtool "$kr" --import-keyring "$dir/$k.keyring"
  done
  cp "$dir/mon.keyring" "$dir/mon.a.keyring"

  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]" \
    "$dir/monmap" >/dev/null
  ceph-mon -c "$conf" -i a --mkfs --monmap "$dir/monmap" --keyring "$kr" \
    >"$dir/log/mon.a.mkfs" 2>&1 || die "ceph-mon --mkfs failed (log: $dir/log/mon.a.mkfs)"
  rm -f "$kr"
  launch_daemon mon.a
  wait_daemon mon.a

  # The OSD's id in the osd map and the pool, before the OSD starts: it creates the pool's
  # placement groups as soon as it boots.
  ceph_admin osd new "$osd_uuid" 0 >/dev/null 2>"$dir/log/setup.err" \
    || die "ceph osd new failed: the monitor did not answer (log: $dir/log/mon.a.log, $dir/log/setup.err)"
  ceph_admin osd pool create "$pool" 8 8 >/dev/null 2>"$dir/log/setup.err" \
    || die "creating pool $pool failed (log: $dir/log/setup.err, $dir/log/mon.a.log)"
  # The OSD's store (memstore keeps the data in memory; the directory holds its identity).
  ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$dir/log/osd.0.mkfs" 2>&1 \
    || die "ceph-osd --mkfs failed (log: $dir/log/osd.0.mkfs)"
  # Each daemon initialises before it forks (the OSD takes about 2 s): both at once.
  launch_daemon osd.0 &
  local osd_launch=$!
  launch_daemon mgr.x
  wait "$osd_launch" || exit 1
  timeout "$START_TIMEOUT" rbd -c "$conf" --name client.admin pool init "$pool" \
    2>"$dir/log/setup.err" \
    || die "rbd pool init $pool failed or took over ${START_TIMEOUT}s (log: $dir/log/setup.err, $dir/log/osd.0.log)"
  wait_daemon osd.0
  wait_daemon mgr.x
  # Ready when the pool takes a write from the bexd user (its placement groups are active).
  wait_for "a write to pool $pool" "$dir/log/osd.0.log" \
    "rados -c '$conf' --id '$user' -p '$pool' --rados-osd-op-timeout 5 put probe /dev/null 2>/dev/null"
  rados -c "$conf" --id "$user" -p "$pool" rm probe 2>/dev/null || true
  print_env
}

# SIGTERM to the named daemons of this cluster; waits until they are gone, SIGKILL after
# STOP_TIMEOUT seconds.
stop_daemons() {
  local pids=() d pid
  for d in "$@"; do
    if pid="$(running_pid "$d")"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  local deadline=$((SECONDS + STOP_TIMEOUT)) alive
  while :; do
    alive=()
    for pid in "${pids[@]}"; do
      [ -d "/proc/$pid" ] && alive+=("$pid")
    done
    [ "${#alive[@]}" -eq 0 ] && break
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "ceph-cluster: killing ${alive[*]}, still running ${STOP_TIMEOUT}s after SIGTERM" >&2
      kill -KILL "${alive[@]}" 2>/dev/null || true
    fi
    sleep 0.1
  done
  for d in "$@"; do
    rm -f "$dir/run/$d.pid"
  done
}

# The OSD and the manager first, while the monitor can still take the OSD's "mark me down"
# (with the monitor gone the OSD waits osd_mon_shutdown_timeout for it), then the monitor.
do_stop() {
  stop_daemons osd.0 mgr.x
  stop_daemons mon.a
}

do_status() {
  local d pid down=0
  for d in "${daemons[@]}"; do
    if pid="$(running_pid "$d")"; then
      echo "$d running (pid $pid)"
    else
      echo "$d not running"
      down=1
    fi
  done
  if [ "$down" -eq 0 ]; then
    ceph_admin health
  fi
  return "$down"
}

case "$cmd" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  env)
    [ -f "$conf" ] || die "no cluster in $dir"
    print_env
    ;;
  *) usage ;;
esac

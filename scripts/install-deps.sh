#!/usr/bin/env bash
# Installs, idempotently, everything bexd's build and test suite need on Debian.
# Safe to run repeatedly: it only calls apt/pip/cargo for what is missing.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# Debian packages: qemu-utils (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon),
# libnbd-bin (nbdinfo, nbdcopy, nbdsh), python3-libnbd, fio, pytest; libssl-dev and
# pkg-config to build the openssl crate (TLS-PSK), openssl for the TLS tests' certificates;
# the benchmark peers and ceilings (nbdkit, nbd-server, iperf3); strace, with which the
# zero-copy tests see that replies really went out with sendfile; systemd for
# systemd-socket-activate (the socket-activation tests) and systemd-analyze (the unit
# files' check); man-db, with which systemd-analyze checks the units' man:bexd(8);
# prometheus for promtool and the server that scrapes bexd's metrics-http endpoint in the
# metrics tests; tmux, the terminal bexd top's test runs it in.
packages=(qemu-utils libnbd-bin python3-libnbd fio python3-pytest python3-pip
          libssl-dev pkg-config openssl nbdkit nbd-server iperf3 strace systemd man-db
          prometheus tmux)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# qemu.qmp for Debian's python3 (the one python3-libnbd belongs to).
if ! /usr/bin/python3 -c 'import qemu.qmp' 2>/dev/null; then
  echo "install-deps: pip install qemu.qmp"
  /usr/bin/python3 -m pip install -q --break-system-packages qemu.qmp 2>/dev/null \
    || /usr/bin/python3 -m pip install -q qemu.qmp
fi

# cargo-fuzz for the fuzz targets (runs on stable with RUSTC_BOOTSTRAP=1).
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "install-deps: cargo install cargo-fuzz"
  cargo install -q cargo-fuzz
fi

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
# metrics tests; tmux, the terminal bexd top's test runs it in; curl, which fetches
# qemu-block-extra below when apt's suites lack the matching version; fuse3 for fusermount3
# (FUSE exports mounted and unmounted without root, and the stale-mount clean-up). The guest
# tests' packages come further down.
packages=(qemu-utils libnbd-bin python3-libnbd fio python3-pytest python3-pip
          libssl-dev pkg-config openssl nbdkit nbd-server iperf3 strace systemd man-db
          prometheus tmux curl fuse3)
# apt_install [APT-FLAG...] -- PACKAGE...: installs those of the packages that are missing.
apt_install() {
  local flags=() missing=()
  while [ "$1" != "--" ]; do flags+=("$1"); shift; done
  shift
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: apt-get install ${flags[*]:+${flags[*]} }${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${flags[@]}" "${missing[@]}" \
      >/dev/null
  fi
}
apt_install -- "${packages[@]}"

# The one-node Ceph test cluster (scripts/ceph-cluster.sh, docs/ceph.md) and driver=rbd:
# Debian's Ceph daemons and tools, and librbd1, which bexd loads when an rbd node opens.
# Without recommends (the dashboard and other manager modules the tests do not need).
ceph_packages=(ceph-mon ceph-mgr ceph-osd ceph-common librbd1)
apt_install --no-install-recommends -- "${ceph_packages[@]}"

# QEMU's rbd driver (block-rbd.so, for qemu-img and qemu-storage-daemon, the rbd tests' peer)
# is in qemu-block-extra, which must be the very version of the installed qemu-utils (QEMU
# loads no module built for another version). Debian's own suite may only have an older one
# whose install would remove qemu-utils 10.0; then the matching .deb comes from Debian's pool
# (qemu-utils 10.0 is bookworm-backports'). Never anything that removes a package.
qemu_version="$(dpkg-query -W -f='${Version}' qemu-utils)"
if [ "$(dpkg-query -W -f='${Status} ${Version}' qemu-block-extra 2>/dev/null || true)" \
     != "install ok installed $qemu_version" ]; then
  echo "install-deps: qemu-block-extra $qemu_version"
  target="qemu-block-extra=$qemu_version"
  if ! apt-get download --print-uris "$target" >/dev/null 2>&1; then
    arch="$(dpkg --print-architecture)"
    file="qemu-block-extra_${qemu_version#*:}_$arch.deb"
    debdir="$(mktemp -d)"
    trap 'rm -rf "$debdir"' EXIT
    curl -fsSL -o "$debdir/$file" "http://deb.debian.org/debian/pool/main/q/qemu/${file//+/%2B}"
    chmod 755 "$debdir"
    target="$debdir/$file"
  fi
  if apt-get install -s --no-install-recommends "$target" | grep -q '^Remv'; then
    echo "install-deps: installing $target would remove packages; not installing it" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "$target" >/dev/null
fi

# The guest tests (tests/interop/test_guest.py): QEMU's system emulator, of the very version of
# the installed qemu-utils (10.0, bookworm-backports'; bookworm's own 7.2 would conflict with
# it), busybox-static for the guest's initramfs, and Debian's kernel, unpacked into a cache by
# scripts/guest-image.sh (never installed on this machine). Never anything that removes a
# package.
backports=/etc/apt/sources.list.d/bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "install-deps: adding $backports"
  printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
    'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
    | $SUDO tee "$backports" >/dev/null
  $SUDO apt-get update -qq
fi
if [ "$(dpkg-query -W -f='${Status} ${Version}' qemu-system-x86 2>/dev/null || true)" \
     != "install ok installed $qemu_version" ]; then
  echo "install-deps: qemu-system-x86 $qemu_version (bookworm-backports)"
  $SUDO apt-get update -qq
  target="qemu-system-x86=$qemu_version"
  if apt-get install -s --no-install-recommends -t bookworm-backports "$target" \
       | grep -q '^Remv'; then
    echo "install-deps: installing $target would remove packages; not installing it" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports "$target" >/dev/null
fi
apt_install --no-install-recommends -- busybox-static
$SUDO "$(dirname "$0")/guest-image.sh" fetch

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

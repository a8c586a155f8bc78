#!/usr/bin/env bash
# The guest of the vhost-user-blk guest test (tests/interop/test_guest.py): a Debian kernel and
# a tiny initramfs (busybox-static, the virtio modules, tests/guest/init) that QEMU boots with
# -kernel/-initrd.
#
#   scripts/guest-image.sh fetch        downloads Debian bookworm's kernel package (the one
#                                       linux-image-amd64 names) into the cache and extracts
#                                       the kernel and the modules virtio_blk needs; once (run
#                                       by scripts/install-deps.sh)
#   scripts/guest-image.sh build OUT    OUT/initramfs.cpio.gz from the cache and
#                                       tests/guest/init, and OUT/vmlinux, a link to the
#                                       cached kernel (no network; run by the test)
#
# The kernel is never installed on the host: the package is unpacked with dpkg-deb -x. The
# guest boots the uncompressed vmlinux (taken out of vmlinuz's xz payload) through its PVH
# entry point: no real-mode setup and no decompression, which under TCG (no usable KVM) is
# most of the boot.
# BEXD_GUEST_CACHE overrides the cache (default /var/cache/bexd-guest).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${BEXD_GUEST_CACHE:-/var/cache/bexd-guest}"
KERNEL="$CACHE/kernel"
# virtio_blk and the modules it needs over PCI, in load order (Debian builds them all as
# modules; `fetch` checks the order against each module's depends).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

die() { echo "guest-image.sh: $*" >&2; exit 1; }

fetch() {
  if [ -f "$KERNEL/vmlinux" ] && [ -f "$KERNEL/modules/virtio_blk.ko" ]; then
    return
  fi
  # The bookworm kernel (6.1), whatever bookworm-backports offers: linux-image-amd64's
  # candidate version is bookworm's as long as backports keeps its default priority.
  local pkg
  pkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-6\.1/ {print $2; exit}')"
  [ -n "$pkg" ] || die "no linux-image-6.1.* package named by linux-image-amd64"
  mkdir -p "$CACHE"
  work="$(mktemp -d "$CACHE/fetch.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  chmod 755 "$work"  # apt's _apt user downloads into it
  echo "guest-image.sh: apt-get download $pkg"
  (cd "$work" && apt-get download -q "$pkg" 2>&1 | grep -v 'unsandboxed' || true)
  local deb
  deb="$(ls "$work"/linux-image-*.deb 2>/dev/null | head -1)"
  [ -n "$deb" ] || die "apt-get download $pkg failed"
  dpkg-deb -x "$deb" "$work/root"
  local kdir
  kdir="$(ls -d "$work"/root/lib/modules/* | head -1)"
  mkdir -p "$work/kernel/modules"
  cp "$work"/root/boot/vmlinuz-* "$work/kernel/vmlinuz"
  python3 - "$work/kernel/vmlinuz" "$work/kernel/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
at = data.find(b"\xfd7zXZ\x00")
if at < 0:
    sys.exit("vmlinuz has no xz payload")
out = lzma.LZMADecompressor().decompress(data[at:])
if not out.startswith(b"\x7fELF"):
    sys.exit("vmlinuz's payload is not an ELF kernel")
open(sys.argv[2], "wb").write(out)
PY
  local loaded=() m ko dep
  for m in "${MODULES[@]}"; do
    ko="$(find "$kdir/kernel" -name "$m.ko" | head -1)"
    [ -n "$ko" ] || die "$m.ko is not in $pkg"
    for dep in $(modinfo -F depends "$ko" | tr ',' ' '); do
      [[ " ${loaded[*]} " == *" $dep "* ]] || die "$m needs $dep, which is not loaded before it"
    done
    cp "$ko" "$work/kernel/modules/$m.ko"
    loaded+=("$m")
  done
  basename "$kdir" > "$work/kernel/version"
  rm -rf "$KERNEL"
  mv "$work/kernel" "$KERNEL"
  echo "guest-image.sh: kernel $(cat "$KERNEL/version") in $KERNEL"
}

build() {
  local out="$1"
  [ -f "$KERNEL/vmlinux" ] || die "no guest kernel in $KERNEL: run scripts/install-deps.sh"
  # busybox-static's /bin/busybox: the initramfs has no libc.
  local busybox=/bin/busybox
  dpkg -s busybox-static >/dev/null 2>&1 && [ -x "$busybox" ] \
    || die "busybox-static is needed (scripts/install-deps.sh installs it)"
  mkdir -p "$out"
  local root="$out/initramfs"
  rm -rf "$root"
  mkdir -p "$root"/{bin,dev,proc,sys,modules}
  cp "$busybox" "$root/bin/busybox"
  ln -s busybox "$root/bin/sh"
  cp "$KERNEL"/modules/*.ko "$root/modules/"
  printf '%s\n' "${MODULES[@]}" > "$root/modules/order"
  install -m 755 "$REPO/tests/guest/init" "$root/init"
  (cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -1 > "$out/initramfs.cpio.gz"
  ln -sfn "$KERNEL/vmlinux" "$out/vmlinux"
  rm -rf "$root"
}

case "${1:-}" in
  fetch) fetch ;;
  build) [ -n "${2:-}" ] || die "usage: $0 build OUTDIR"; build "$2" ;;
  *) echo "usage: $0 fetch | build OUTDIR" >&2; exit 2 ;;
esac

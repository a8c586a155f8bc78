//! librbd-dev and librados-dev ship no pkg-config file (docs/ceph.md), so the
//! libraries are linked by name from the system's library path.

fn main() {
    println!("cargo:rustc-link-lib=rbd");
    println!("cargo:rustc-link-lib=rados");
}

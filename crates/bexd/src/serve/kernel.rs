//! `-c DEV` and `-d DEV`: the kernel's NBD device (`/dev/nbdN`).
//!
//! qemu-nbd drives the Linux NBD client through its ioctls. bexd detaches a
//! device as qemu-nbd does (`-d`), but does not attach one: where the device
//! exists it says so and points to the kernel's own `nbd-client`, which
//! attaches a device to any NBD server, bexd serve included. Where the kernel
//! has no NBD device (no `nbd` module), both fail as qemu-nbd does, naming
//! the device and the errno.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `NBD_CLEAR_SOCK` and `NBD_DISCONNECT` from `<linux/nbd.h>` (`_IO(0xab, n)`).
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;

/// `-c DEV`: checked once the export is ready, as qemu-nbd opens the device
/// only after the image.
pub fn connect(device: &Path) -> Result<(), String> {
    let _dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map_err(|e| {
            format!(
                "Failed to open {}: {}",
                device.display(),
                crate::util::strerror(&e)
            )
        })?;
    Err(format!(
        "-c/--connect is not supported by bexd serve: attach {} with nbd-client to bexd serve -k SOCKET instead",
        device.display()
    ))
}

/// `-d DEV`: tells the kernel to drop the device's connection; prints what
/// qemu-nbd prints. Returns the exit code.
pub fn disconnect(device: &Path) -> i32 {
    let dev = match OpenOptions::new().read(true).write(true).open(device) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "bexd serve: Cannot open {}: {}",
                device.display(),
                crate::util::strerror(&e)
            );
            return 1;
        }
    };
    // SAFETY: `dev` is an open descriptor for the duration of both calls;
    // these ioctls take no argument. On a file that is not an NBD device
    // they fail with ENOTTY and change nothing.
    let rc = unsafe {
        libc::ioctl(dev.as_raw_fd(), NBD_DISCONNECT as _);
        libc::ioctl(dev.as_raw_fd(), NBD_CLEAR_SOCK as _)
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        eprintln!(
            "bexd serve: {} is not an NBD device: {}",
            device.display(),
            crate::util::strerror(&e)
        );
        return 1;
    }
    println!("{} disconnected", device.display());
    0
}

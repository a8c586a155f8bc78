//! Linux abstract-namespace unix sockets (QEMU's `abstract=on`): the name
//! lives in the kernel, not the filesystem, so there is no socket file to
//! create, replace or remove. `tight=on` (the default) binds the address with
//! its length cut after the name; `tight=off` binds the whole `sun_path`,
//! zero-padded, which is a different address: clients must use the same form.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

use socket2::{Domain, Socket, Type};

/// The longest name: `sun_path` less its leading zero byte.
fn max_name() -> usize {
    sun_path_len() - 1
}

fn sun_path_len() -> usize {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let un: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    un.sun_path.len()
}

/// Binds and listens on `@name`; the error is QEMU's text.
pub fn bind(name: &str, tight: bool) -> Result<UnixListener, String> {
    if name.len() > max_name() {
        return Err(format!("UNIX socket path '{name}' is too long"));
    }
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut un: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    un.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &b) in un.sun_path[1..].iter_mut().zip(name.as_bytes()) {
        *dst = b as libc::c_char;
    }
    let path_offset = std::mem::size_of::<libc::sockaddr_un>() - sun_path_len();
    let len = match tight {
        true => path_offset + 1 + name.len(),
        false => std::mem::size_of::<libc::sockaddr_un>(),
    };
    let failed = |e: std::io::Error| {
        format!(
            "Failed to bind socket to @{name}: {}",
            crate::util::strerror(&e)
        )
    };
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(failed)?;
    // SAFETY: `un` is a valid sockaddr_un and `len` does not exceed its size.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::from_ref(&un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    socket.listen(libc::SOMAXCONN).map_err(failed)?;
    Ok(UnixListener::from(OwnedFd::from(socket)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;

    #[test]
    fn test_tight_name_is_reachable_by_its_name() {
        let name = format!("bexd-test-{}", std::process::id());
        let l = bind(&name, true).unwrap();
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        std::os::unix::net::UnixStream::connect_addr(&addr).unwrap();
        drop(l);
    }

    #[test]
    fn test_loose_name_is_the_padded_address() {
        let name = format!("bexd-loose-{}", std::process::id());
        let _l = bind(&name, false).unwrap();
        let short = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        assert!(std::os::unix::net::UnixStream::connect_addr(&short).is_err());
        let mut padded = name.clone().into_bytes();
        padded.resize(max_name(), 0);
        let long = std::os::unix::net::SocketAddr::from_abstract_name(&padded).unwrap();
        std::os::unix::net::UnixStream::connect_addr(&long).unwrap();
    }

    #[test]
    fn test_too_long_is_refused_with_qemus_text() {
        let name = "a".repeat(max_name() + 1);
        assert_eq!(
            bind(&name, true).unwrap_err(),
            format!("UNIX socket path '{name}' is too long")
        );
    }
}

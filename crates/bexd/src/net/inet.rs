//! Listening on an inet address as QEMU's socket listener does: the host is
//! resolved (`getaddrinfo`, passive, numeric only with `numeric=on`, one
//! family with `ipv4`/`ipv6`) and every address it yields is bound, each on
//! the first free port of `port..=to`; accepted sockets get SO_KEEPALIVE with
//! `keep-alive=on`. `localhost` is thus served on 127.0.0.1 and ::1, as QEMU
//! serves it.

use std::ffi::{CStr, CString};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::task::Poll;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{Family, InetOptions};

/// Every socket bound for one inet address.
#[derive(Debug)]
pub struct InetListener {
    sockets: Vec<TcpListener>,
    keep_alive: bool,
}

impl InetListener {
    /// Resolves and binds; the error is QEMU's text.
    pub fn bind(host: &str, port: &str, opts: &InetOptions) -> Result<Self, String> {
        let addrs = resolve(host, port, opts)?;
        let to = opts.to;
        let mut sockets = Vec::with_capacity(addrs.len());
        for addr in &addrs {
            sockets.push(bind_in_range(*addr, to, addrs.len() > 1)?);
        }
        Ok(Self {
            sockets,
            keep_alive: opts.keep_alive,
        })
    }

    /// The port of the first socket (they share it unless `to` let them differ).
    pub fn port(&self) -> Option<u16> {
        let first = self.sockets.first()?;
        first.local_addr().ok().map(|a| a.port())
    }

    /// The next client on any of the sockets.
    pub async fn accept(&self) -> std::io::Result<TcpStream> {
        let (stream, _) = poll_fn(|cx| {
            for l in &self.sockets {
                if let Poll::Ready(r) = l.poll_accept(cx) {
                    return Poll::Ready(r);
                }
            }
            Poll::Pending
        })
        .await?;
        if self.keep_alive {
            SockRef::from(&stream).set_keepalive(true)?;
        }
        Ok(stream)
    }
}

/// `getaddrinfo` as QEMU calls it for a listening socket.
fn resolve(host: &str, port: &str, opts: &InetOptions) -> Result<Vec<SocketAddr>, String> {
    let failed = |why: &str| format!("address resolution failed for {host}:{port}: {why}");
    let node = match host {
        "" => None,
        h => Some(CString::new(h).map_err(|_| failed("Name or service not known"))?),
    };
    let service = CString::new(port).map_err(|_| failed("Servname not supported"))?;
    // SAFETY: addrinfo is plain old data; all-zero is a valid value.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_flags = libc::AI_PASSIVE
        | if opts.numeric {
            libc::AI_NUMERICHOST
        } else {
            0
        };
    hints.ai_family = match opts.family {
        None => libc::AF_UNSPEC,
        Some(Family::V4) => libc::AF_INET,
        Some(Family::V6) => libc::AF_INET6,
    };
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: the strings are NUL-terminated and live across the call; res
    // is freed below with freeaddrinfo.
    let rc = unsafe {
        libc::getaddrinfo(
            node.as_ref().map_or(std::ptr::null(), |n| n.as_ptr()),
            service.as_ptr(),
            &hints,
            &mut res,
        )
    };
    if rc != 0 {
        // SAFETY: gai_strerror returns a static NUL-terminated string.
        let why = unsafe { CStr::from_ptr(libc::gai_strerror(rc)) };
        return Err(failed(&why.to_string_lossy()));
    }
    let mut addrs = Vec::new();
    let mut cur = res;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getaddrinfo returned, not yet freed.
        let ai = unsafe { &*cur };
        if let Some(a) = socket_addr(ai) {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        cur = ai.ai_next;
    }
    // SAFETY: res came from a successful getaddrinfo and is freed once.
    unsafe { libc::freeaddrinfo(res) };
    Ok(addrs)
}

/// One getaddrinfo result as a `SocketAddr` (`None` for other families).
fn socket_addr(ai: &libc::addrinfo) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    let len = ai.ai_addrlen as usize;
    match ai.ai_family {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: an AF_INET result's ai_addr is a sockaddr_in of ai_addrlen bytes.
            let sin = unsafe { std::ptr::read_unaligned(ai.ai_addr.cast::<libc::sockaddr_in>()) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)).into())
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: an AF_INET6 result's ai_addr is a sockaddr_in6 of ai_addrlen bytes.
            let sin6 = unsafe { std::ptr::read_unaligned(ai.ai_addr.cast::<libc::sockaddr_in6>()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(SocketAddrV6::new(ip, port, sin6.sin6_flowinfo, sin6.sin6_scope_id).into())
        }
        _ => None,
    }
}

/// Binds `addr` on the first port of `addr.port()..=to` that is free. With
/// several addresses an IPv6 socket is IPv6-only, so that `::` and
/// `0.0.0.0` can both be bound.
fn bind_in_range(addr: SocketAddr, to: Option<u16>, several: bool) -> Result<TcpListener, String> {
    let first = addr.port();
    let last = to.unwrap_or(first).max(first);
    let mut last_err = std::io::Error::from_raw_os_error(libc::EADDRINUSE);
    for port in first..=last {
        let mut a = addr;
        a.set_port(port);
        match try_bind(a, several) {
            Ok(l) => return Ok(l),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => last_err = e,
            Err(e) => {
                return Err(format!(
                    "Failed to bind socket: {}",
                    crate::util::strerror(&e)
                ))
            }
        }
    }
    Err(format!(
        "Failed to find an available port: {}",
        crate::util::strerror(&last_err)
    ))
}

fn try_bind(addr: SocketAddr, v6_only: bool) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() && v6_only {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(libc::SOMAXCONN)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_numeric_refuses_a_name() {
        let opts = InetOptions {
            numeric: true,
            ..InetOptions::default()
        };
        let e = resolve("localhost", "1234", &opts).unwrap_err();
        assert_eq!(
            e,
            "address resolution failed for localhost:1234: Name or service not known"
        );
        assert_eq!(
            resolve("127.0.0.1", "1234", &opts).unwrap(),
            ["127.0.0.1:1234".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn test_family_filters_the_resolved_addresses() {
        let v6 = InetOptions {
            family: Some(Family::V6),
            ..InetOptions::default()
        };
        assert!(resolve("127.0.0.1", "1", &v6).is_err());
    }

    #[tokio::test]
    async fn test_range_takes_the_next_free_port() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let opts = InetOptions::default();
        let e = InetListener::bind("127.0.0.1", &port.to_string(), &opts).unwrap_err();
        assert_eq!(
            e,
            "Failed to find an available port: Address already in use"
        );
        let ranged = InetOptions {
            to: Some(port.saturating_add(20)),
            ..opts
        };
        match InetListener::bind("127.0.0.1", &port.to_string(), &ranged) {
            Ok(l) => assert!(l.port().is_some_and(|p| p > port)),
            // Every port of the range may be in use on a busy machine.
            Err(e) => assert!(e.starts_with("Failed to find an available port"), "{e}"),
        }
    }
}

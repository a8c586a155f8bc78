//! A virtio-blk request read from its descriptor chain, with no I/O (the
//! vhost-user-blk export's parser, a crate of its own so the fuzz target
//! builds it alone): what
//! is asked (type, sector, data buffers, where the status byte goes), or
//! why it cannot be served. Guest memory is reached only through the
//! `read_header`/`read_segment` closures, so the parser is tested and
//! fuzzed with plain byte arrays.

/// The virtio-blk sector, whatever the logical block size.
pub const SECTOR: u64 = 512;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
const FLAG_UNMAP: u32 = 1;

/// Descriptors one request may chain; more is a malformed chain.
pub const MAX_SEGMENTS: usize = 1024;

/// One descriptor of a chain: a guest address, a length, and whether the
/// device writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset` into the `data` buffers.
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    /// The serial number, into the first data buffer.
    GetId,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// The data buffers, in order (guest addresses and lengths).
    pub data: Vec<Desc>,
    /// Where the status byte goes.
    pub status: u64,
}

/// A chain that cannot be served: answered with `status` (when the chain
/// has a place for it) and nothing else done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub status_at: Option<u64>,
    /// The request's type, when its header could be read (the caller counts
    /// refused requests by type).
    pub kind: Option<u32>,
    pub status: u8,
}

/// What the device is, for the checks a request needs.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Bytes.
    pub capacity: u64,
    /// The logical block size: offsets and lengths of data requests must be
    /// multiples of it.
    pub block_size: u64,
    pub writable: bool,
}

/// Reads the request of `chain`. `read_header` reads the 16-byte header at
/// a guest address, `read_segment` a 16-byte discard/write-zeroes segment;
/// either fails (None) when the address is outside guest memory.
pub fn parse(
    chain: &[Desc],
    geometry: &Geometry,
    read_header: impl Fn(u64) -> Option<[u8; 16]>,
    read_segment: impl Fn(u64) -> Option<[u8; 16]>,
) -> Result<Request, Refused> {
    let status_desc = chain.last().filter(|d| d.write_only && d.len >= 1);
    let refuse = |kind, status| Refused {
        status_at: status_desc.map(|d| d.addr),
        kind,
        status,
    };
    let (Some(head), Some(status)) = (chain.first(), status_desc) else {
        return Err(refuse(None, S_IOERR));
    };
    if chain.len() < 2 || chain.len() > MAX_SEGMENTS || head.write_only || head.len < 16 {
        return Err(refuse(None, S_IOERR));
    }
    let header = read_header(head.addr).ok_or(refuse(None, S_IOERR))?;
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let data = chain[1..chain.len() - 1].to_vec();
    let op = match kind {
        T_IN => {
            data_op(&data, true, sector, geometry).map(|(offset, len)| Op::Read { offset, len })
        }
        T_OUT if !geometry.writable => Err(S_IOERR),
        T_OUT => {
            data_op(&data, false, sector, geometry).map(|(offset, len)| Op::Write { offset, len })
        }
        T_FLUSH => Ok(Op::Flush),
        T_GET_ID => match data.first() {
            Some(d) if d.write_only => Ok(Op::GetId),
            _ => Err(S_IOERR),
        },
        T_DISCARD | T_WRITE_ZEROES if !geometry.writable => Err(S_IOERR),
        T_DISCARD | T_WRITE_ZEROES => zero_op(kind, &data, geometry, read_segment),
        _ => Err(S_UNSUPP),
    }
    .map_err(|status| refuse(Some(kind), status))?;
    Ok(Request {
        op,
        data,
        status: status.addr,
    })
}

/// A read or write: every buffer in the right direction, the range whole
/// logical blocks within the device.
fn data_op(data: &[Desc], read: bool, sector: u64, g: &Geometry) -> Result<(u64, u64), u8> {
    if data.iter().any(|d| d.write_only != read) {
        return Err(S_IOERR);
    }
    let len: u64 = data.iter().map(|d| u64::from(d.len)).sum();
    let offset = sector.checked_mul(SECTOR).ok_or(S_IOERR)?;
    in_range(offset, len, g)?;
    Ok((offset, len))
}

fn in_range(offset: u64, len: u64, g: &Geometry) -> Result<(), u8> {
    // The block size is a power of 2.
    let mask = g.block_size - 1;
    let aligned = offset & mask == 0 && len & mask == 0;
    let end = offset.checked_add(len).ok_or(S_IOERR)?;
    match aligned && end <= g.capacity {
        true => Ok(()),
        false => Err(S_IOERR),
    }
}

/// Discard and write-zeroes carry one 16-byte segment (sector, sectors,
/// flags), as the device's `max_*_seg` of 1 asks.
fn zero_op(
    kind: u32,
    data: &[Desc],
    g: &Geometry,
    read_segment: impl Fn(u64) -> Option<[u8; 16]>,
) -> Result<Op, u8> {
    let [seg] = data else {
        return Err(S_UNSUPP);
    };
    if seg.write_only || seg.len != 16 {
        return Err(S_UNSUPP);
    }
    let raw = read_segment(seg.addr).ok_or(S_IOERR)?;
    let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
    let sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
    let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
    let offset = sector.checked_mul(SECTOR).ok_or(S_IOERR)?;
    let len = u64::from(sectors) * SECTOR;
    let unmap = flags & FLAG_UNMAP != 0;
    // Discard takes no flags; write-zeroes only UNMAP.
    let allowed = if kind == T_DISCARD { 0 } else { FLAG_UNMAP };
    if flags & !allowed != 0 {
        return Err(S_UNSUPP);
    }
    in_range(offset, len, g)?;
    Ok(match kind {
        T_DISCARD => Op::Discard { offset, len },
        _ => Op::WriteZeroes { offset, len, unmap },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        capacity: 1 << 20,
        block_size: 512,
        writable: true,
    };

    fn header(kind: u32, sector: u64) -> [u8; 16] {
        let mut h = [0; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn chain(data: &[(u32, bool)]) -> Vec<Desc> {
        let mut c = vec![Desc {
            addr: 0x1000,
            len: 16,
            write_only: false,
        }];
        for (i, &(len, write_only)) in data.iter().enumerate() {
            c.push(Desc {
                addr: 0x2000 + 0x1000 * i as u64,
                len,
                write_only,
            });
        }
        c.push(Desc {
            addr: 0x9000,
            len: 1,
            write_only: true,
        });
        c
    }

    fn parse_with(c: &[Desc], h: [u8; 16], g: &Geometry) -> Result<Request, Refused> {
        parse(c, g, |_| Some(h), |_| None)
    }

    #[test]
    fn test_read_of_two_buffers_sums_their_lengths() {
        let r = parse_with(&chain(&[(512, true), (1024, true)]), header(T_IN, 2), &G).unwrap();
        assert_eq!(
            r.op,
            Op::Read {
                offset: 1024,
                len: 1536
            }
        );
        assert_eq!(r.status, 0x9000);
    }

    #[test]
    fn test_read_past_the_end_is_ioerr() {
        let e = parse_with(&chain(&[(1024, true)]), header(T_IN, 2047), &G).unwrap_err();
        assert_eq!(
            e,
            Refused {
                status_at: Some(0x9000),
                kind: Some(T_IN),
                status: S_IOERR
            }
        );
    }

    #[test]
    fn test_read_into_a_device_readable_buffer_is_ioerr() {
        let e = parse_with(&chain(&[(512, false)]), header(T_IN, 0), &G).unwrap_err();
        assert_eq!(e.status, S_IOERR);
    }

    #[test]
    fn test_write_to_read_only_device_is_ioerr() {
        let ro = Geometry {
            writable: false,
            ..G
        };
        let e = parse_with(&chain(&[(512, false)]), header(T_OUT, 0), &ro).unwrap_err();
        assert_eq!((e.kind, e.status), (Some(T_OUT), S_IOERR));
    }

    #[test]
    fn test_write_not_a_multiple_of_the_block_size_is_ioerr() {
        let g = Geometry {
            block_size: 4096,
            ..G
        };
        let e = parse_with(&chain(&[(512, false)]), header(T_OUT, 0), &g).unwrap_err();
        assert_eq!(e.status, S_IOERR);
    }

    #[test]
    fn test_unknown_type_is_unsupp() {
        let e = parse_with(&chain(&[]), header(99, 0), &G).unwrap_err();
        assert_eq!(e.status, S_UNSUPP);
    }

    #[test]
    fn test_header_outside_guest_memory_is_ioerr() {
        let e = parse(&chain(&[]), &G, |_| None, |_| None).unwrap_err();
        assert_eq!(
            e,
            Refused {
                status_at: Some(0x9000),
                kind: None,
                status: S_IOERR
            }
        );
    }

    #[test]
    fn test_chain_without_a_writable_status_has_no_status_place() {
        let c = [Desc {
            addr: 0x1000,
            len: 16,
            write_only: false,
        }];
        let e = parse_with(&c, header(T_FLUSH, 0), &G).unwrap_err();
        assert_eq!(e.status_at, None);
    }

    #[test]
    fn test_write_zeroes_segment_with_unmap() {
        let mut seg = [0; 16];
        seg[0..8].copy_from_slice(&8u64.to_le_bytes());
        seg[8..12].copy_from_slice(&16u32.to_le_bytes());
        seg[12..16].copy_from_slice(&1u32.to_le_bytes());
        let c = chain(&[(16, false)]);
        let r = parse(&c, &G, |_| Some(header(T_WRITE_ZEROES, 0)), |_| Some(seg)).unwrap();
        assert_eq!(
            r.op,
            Op::WriteZeroes {
                offset: 4096,
                len: 8192,
                unmap: true
            }
        );
    }

    #[test]
    fn test_discard_with_flags_is_unsupp() {
        let mut seg = [0; 16];
        seg[12..16].copy_from_slice(&1u32.to_le_bytes());
        let c = chain(&[(16, false)]);
        let e = parse(&c, &G, |_| Some(header(T_DISCARD, 0)), |_| Some(seg)).unwrap_err();
        assert_eq!(e.status, S_UNSUPP);
    }
}

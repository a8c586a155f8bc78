//! L1/L2 table entries: what one guest (sub)cluster maps to.
//!
//! Pure decoding and encoding, no I/O, so the mapping rules are unit-tested
//! on their own and every host offset is checked before anyone reads it.

use crate::error::{BlockError, BlockErrorKind, BlockResult};

use super::header::MAX_HOST_OFFSET;

/// Bits 9..55: the host offset of an L2 table (in L1) or of a data cluster (in L2).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The cluster's refcount is exactly 1, so it may be written in place.
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
/// Standard L2 entries only: the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Extended L2: subclusters per cluster.
pub const SUBCLUSTERS: u32 = 32;
/// Extended L2 bitmap: all "reads as zero" bits.
pub const ALL_ZERO_BITS: u64 = 0xffff_ffff << 32;
pub const ALL_ALLOC_BITS: u64 = 0xffff_ffff;

/// What reading one guest (sub)cluster needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Not in this layer: read from the backing file, or zeroes without one.
    Unallocated,
    /// Reads as zeroes in this layer.
    Zero,
    /// At this host offset (of the start of the cluster).
    Data { host: u64 },
    /// Compressed: `len` bytes at `host` (any alignment) inflate to one cluster.
    Compressed { host: u64, len: u64 },
}

/// One L2 entry, with its subcluster bitmap when the image has extended L2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Entry {
    pub word: u64,
    pub bitmap: u64,
}

fn corrupt(msg: String) -> BlockError {
    BlockError::new(BlockErrorKind::Corrupt, msg)
}

impl L2Entry {
    pub fn host_offset(&self) -> u64 {
        self.word & OFFSET_MASK
    }

    pub fn is_compressed(&self) -> bool {
        self.word & COMPRESSED != 0
    }

    pub fn is_copied(&self) -> bool {
        self.word & COPIED != 0
    }

    /// True when every subcluster (or the whole cluster) is data here, so an
    /// in-place write changes no metadata.
    pub fn fully_allocated(&self, extended: bool) -> bool {
        let host = self.host_offset() != 0 && !self.is_compressed();
        match extended {
            true => host && self.bitmap & ALL_ALLOC_BITS == ALL_ALLOC_BITS,
            false => host && self.word & ZERO == 0,
        }
    }

    /// The mapping of subcluster `sub` (always 0 without extended L2).
    pub fn mapping(&self, geom: &Geometry, sub: u32) -> BlockResult<Mapping> {
        if self.is_compressed() {
            return self.compressed(geom);
        }
        let host = self.host_offset();
        let check_host = || {
            if !host.is_multiple_of(geom.cluster_size()) || host >= MAX_HOST_OFFSET {
                return Err(corrupt(format!(
                    "qcow2: data cluster offset {host:#x} is not cluster-aligned"
                )));
            }
            Ok(Mapping::Data { host })
        };
        if !geom.extended {
            return match (self.word & ZERO != 0, host) {
                (true, _) => Ok(Mapping::Zero),
                (false, 0) => Ok(Mapping::Unallocated),
                (false, _) => check_host(),
            };
        }
        let alloc = self.bitmap >> sub & 1 != 0;
        let zero = self.bitmap >> (sub + 32) & 1 != 0;
        match (alloc, zero) {
            (true, true) => Err(corrupt(format!(
                "qcow2: subcluster {sub} is both allocated and zero (bitmap {:#x})",
                self.bitmap
            ))),
            (true, false) if host == 0 => Err(corrupt(
                "qcow2: allocated subcluster without a host cluster".to_string(),
            )),
            (true, false) => check_host(),
            (false, true) => Ok(Mapping::Zero),
            (false, false) => Ok(Mapping::Unallocated),
        }
    }

    fn compressed(&self, geom: &Geometry) -> BlockResult<Mapping> {
        // x = 62 - (cluster_bits - 8): the offset below, the sector count above.
        let shift = 62 - (geom.cluster_bits - 8);
        let host = self.word & ((1u64 << shift) - 1);
        let sectors = ((self.word & !COPIED & !COMPRESSED) >> shift) + 1;
        let len = sectors * 512 - (host & 511);
        if geom.extended && self.bitmap != 0 {
            return Err(corrupt(
                "qcow2: compressed cluster with a subcluster bitmap".into(),
            ));
        }
        if host >= MAX_HOST_OFFSET {
            return Err(corrupt(format!(
                "qcow2: compressed offset {host:#x} too large"
            )));
        }
        Ok(Mapping::Compressed { host, len })
    }

    /// The host clusters a compressed entry keeps a reference on:
    /// `[host & !511, + sectors * 512)`, by cluster.
    pub fn compressed_span(&self, geom: &Geometry) -> Option<(u64, u64)> {
        match self.compressed(geom) {
            Ok(Mapping::Compressed { host, len }) => Some((host & !511, (host & 511) + len)),
            _ => None,
        }
    }
}

/// The sizes every table computation needs.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub extended: bool,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn entry_bytes(&self) -> usize {
        if self.extended {
            16
        } else {
            8
        }
    }

    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.entry_bytes() as u64
    }

    /// Bytes one subcluster covers (the cluster itself without extended L2).
    pub fn sub_size(&self) -> u64 {
        match self.extended {
            true => self.cluster_size() / u64::from(SUBCLUSTERS),
            false => self.cluster_size(),
        }
    }

    /// (L1 index, L2 index) of a guest offset.
    pub fn split(&self, guest: u64) -> (u64, usize) {
        let cluster = guest >> self.cluster_bits;
        let per = self.l2_entries();
        (cluster / per, (cluster % per) as usize)
    }

    pub fn read_entry(&self, table: &[u8], index: usize) -> L2Entry {
        let at = index * self.entry_bytes();
        let word = be64(table, at);
        let bitmap = if self.extended {
            be64(table, at + 8)
        } else {
            0
        };
        L2Entry { word, bitmap }
    }

    pub fn write_entry(&self, table: &mut [u8], index: usize, e: L2Entry) {
        let at = index * self.entry_bytes();
        table[at..at + 8].copy_from_slice(&e.word.to_be_bytes());
        if self.extended {
            table[at + 8..at + 16].copy_from_slice(&e.bitmap.to_be_bytes());
        }
    }
}

pub fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Checks an L2 table offset read from L1 before it is used.
pub fn l2_offset(l1_entry: u64, cluster_size: u64) -> BlockResult<u64> {
    let off = l1_entry & OFFSET_MASK;
    if !off.is_multiple_of(cluster_size) {
        return Err(corrupt(format!(
            "qcow2: L2 table offset {off:#x} is not cluster-aligned"
        )));
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: Geometry = Geometry {
        cluster_bits: 16,
        extended: false,
    };
    const EXT: Geometry = Geometry {
        cluster_bits: 16,
        extended: true,
    };

    #[test]
    fn test_mapping_zero_entry_is_unallocated() {
        assert_eq!(
            L2Entry::default().mapping(&STD, 0).unwrap(),
            Mapping::Unallocated
        );
    }

    #[test]
    fn test_mapping_zero_flag_with_offset_reads_zero() {
        let e = L2Entry {
            word: 0x30000 | ZERO | COPIED,
            bitmap: 0,
        };
        assert_eq!(e.mapping(&STD, 0).unwrap(), Mapping::Zero);
    }

    #[test]
    fn test_mapping_unaligned_host_is_corrupt() {
        let e = L2Entry {
            word: 0x30200,
            bitmap: 0,
        };
        assert_eq!(
            e.mapping(&STD, 0).unwrap_err().kind(),
            BlockErrorKind::Corrupt
        );
    }

    #[test]
    fn test_mapping_compressed_decodes_offset_and_length() {
        // 64 KiB clusters: 54 offset bits, then sectors - 1 = 2.
        let word = COMPRESSED | (2u64 << 54) | 0x1_0100;
        let e = L2Entry { word, bitmap: 0 };
        let expect = Mapping::Compressed {
            host: 0x1_0100,
            len: 3 * 512 - 0x100,
        };
        assert_eq!(e.mapping(&STD, 0).unwrap(), expect);
    }

    #[test]
    fn test_mapping_extended_bits_pick_subcluster_state() {
        let e = L2Entry {
            word: 0x50000,
            bitmap: 0b01 | (0b10 << 32),
        };
        assert_eq!(e.mapping(&EXT, 0).unwrap(), Mapping::Data { host: 0x50000 });
        assert_eq!(e.mapping(&EXT, 1).unwrap(), Mapping::Zero);
        assert_eq!(e.mapping(&EXT, 2).unwrap(), Mapping::Unallocated);
    }

    #[test]
    fn test_mapping_extended_alloc_and_zero_is_corrupt() {
        let e = L2Entry {
            word: 0x50000,
            bitmap: 1 | (1 << 32),
        };
        assert_eq!(
            e.mapping(&EXT, 0).unwrap_err().kind(),
            BlockErrorKind::Corrupt
        );
    }

    #[test]
    fn test_entry_roundtrip_extended() {
        let mut table = vec![0u8; 65536];
        let e = L2Entry {
            word: COPIED | 0x70000,
            bitmap: ALL_ALLOC_BITS,
        };
        EXT.write_entry(&mut table, 7, e);
        assert_eq!(EXT.read_entry(&table, 7), e);
    }
}

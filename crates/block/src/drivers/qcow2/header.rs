//! The qcow2 header and its extensions (docs/interop/qcow2.txt): parsing with
//! every field checked, so later code can index tables without re-validating.

use crate::error::{BlockError, BlockErrorKind, BlockResult};

pub const MAGIC: u32 = 0x5146_49fb;
/// Size of the fixed version 2 header; version 3 adds fields up to `header_length`.
const V2_HEADER_LEN: usize = 72;
const V3_HEADER_LEN: usize = 104;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// The bits this driver understands; any other set bit refuses the open.
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit: the bitmaps extension is consistent with the image. A
/// program that does not know bitmaps clears it when it writes the image.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Header extension types.
const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_BITMAPS: u32 = 0x2385_2875;
/// Size of the bitmaps extension's data.
const BITMAPS_EXT_LEN: usize = 24;

/// QEMU's limits on persistent bitmaps (QCOW2_MAX_BITMAPS and the directory
/// size they imply); bigger values are refused at open.
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;

/// Byte offsets of fields rewritten in place.
pub const OFF_REFCOUNT_TABLE: u64 = 48;
pub const OFF_AUTOCLEAR: u64 = 88;
const OFF_BACKING_FILE_OFFSET: usize = 8;

/// QEMU's limits: bigger tables are refused rather than allocated.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU refuses backing file names longer than this.
const MAX_BACKING_NAME: u32 = 1023;
/// Host offsets live in bits 9..55 of table entries.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

/// Where a version 3 header keeps its incompatible feature bits.
pub const OFF_INCOMPATIBLE: u64 = 72;

#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    /// From the backing-format extension.
    pub backing_format: Option<String>,
    /// Names of feature bits, from the feature name table: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// From the external data file extension.
    pub data_file: Option<String>,
    /// Where the persistent bitmaps' directory is (version 3 only).
    pub bitmaps: Option<BitmapsExt>,
    /// Every extension but the bitmaps one, as found, so the header can be
    /// rewritten with a new bitmaps extension and nothing else lost.
    pub other_extensions: Vec<(u32, Vec<u8>)>,
}

/// The bitmaps header extension: where the bitmap directory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

impl BitmapsExt {
    fn parse(data: &[u8], cluster_size: u64) -> BlockResult<Self> {
        if data.len() != BITMAPS_EXT_LEN {
            return Err(invalid("bitmaps_ext: Invalid extension length"));
        }
        if be32(data, 4) != 0 {
            return Err(invalid("bitmaps_ext: Reserved field is not zero"));
        }
        let ext = Self {
            nb_bitmaps: be32(data, 0),
            directory_size: be64(data, 8),
            directory_offset: be64(data, 16),
        };
        if ext.nb_bitmaps == 0 {
            return Err(invalid("found bitmaps extension with zero bitmaps"));
        }
        if ext.nb_bitmaps > MAX_BITMAPS {
            return Err(invalid(format!(
                "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}",
                ext.nb_bitmaps
            )));
        }
        if ext.directory_size == 0 || ext.directory_size > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(invalid(format!(
                "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({MAX_BITMAP_DIRECTORY_SIZE})",
                ext.directory_size
            )));
        }
        if ext.directory_offset == 0
            || !ext.directory_offset.is_multiple_of(cluster_size)
            || ext.directory_offset >= MAX_HOST_OFFSET
        {
            return Err(invalid("bitmaps_ext: invalid bitmap directory offset"));
        }
        Ok(ext)
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(BITMAPS_EXT_LEN);
        b.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&self.directory_size.to_be_bytes());
        b.extend_from_slice(&self.directory_offset.to_be_bytes());
        b
    }
}

fn invalid(msg: impl Into<String>) -> BlockError {
    BlockError::new(BlockErrorKind::InvalidImage, msg)
}

/// Big-endian reads from a buffer that is known to be long enough.
fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Reads just enough to learn the cluster size (the header must fit in cluster 0).
    pub fn cluster_bits_of(prefix: &[u8]) -> BlockResult<u32> {
        if prefix.len() < V2_HEADER_LEN || be32(prefix, 0) != MAGIC {
            return Err(invalid("Image is not in qcow2 format"));
        }
        let bits = be32(prefix, 20);
        if !(9..=21).contains(&bits) {
            return Err(invalid(format!(
                "Cluster size must be a power of two between 512 and 2048k (cluster_bits {bits})"
            )));
        }
        Ok(bits)
    }

    /// Parses cluster 0 (`buf` is the whole first cluster, zero-filled past EOF).
    pub fn parse(buf: &[u8]) -> BlockResult<Self> {
        let cluster_bits = Self::cluster_bits_of(buf)?;
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(BlockError::new(
                BlockErrorKind::NotSupported,
                format!("Unsupported qcow2 version {version}"),
            ));
        }
        let mut h = Self::fixed_fields(buf, version, cluster_bits)?;
        h.check_features()?;
        h.check_layout(buf.len() as u64)?;
        h.read_extensions(buf)?;
        Ok(h)
    }

    fn fixed_fields(buf: &[u8], version: u32, cluster_bits: u32) -> BlockResult<Self> {
        let mut h = Self {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression: Compression::Zlib,
            backing_format: None,
            feature_names: Vec::new(),
            data_file: None,
            bitmaps: None,
            other_extensions: Vec::new(),
        };
        if version == 3 {
            h.incompatible = be64(buf, OFF_INCOMPATIBLE as usize);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            let len = h.header_length as usize;
            if len < V3_HEADER_LEN || len > buf.len() {
                return Err(invalid(format!("qcow2 header too short or long ({len})")));
            }
            if len > V3_HEADER_LEN {
                h.compression = match buf[V3_HEADER_LEN] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    t => return Err(invalid(format!("Unknown compression type {t}"))),
                };
            }
        }
        Ok(h)
    }

    fn check_features(&self) -> BlockResult<()> {
        if self.crypt_method != 0 {
            return Err(BlockError::new(
                BlockErrorKind::NotSupported,
                "Encrypted qcow2 images are not supported by bexd",
            ));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(BlockError::new(
                BlockErrorKind::NotSupported,
                "qcow2 images with an external data file are not supported by bexd",
            ));
        }
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(BlockError::new(
                BlockErrorKind::NotSupported,
                format!("Unsupported qcow2 feature(s): incompatible bits {unknown:#x}"),
            ));
        }
        let zstd_flag = self.incompatible & INCOMPAT_COMPRESSION != 0;
        if zstd_flag != (self.compression == Compression::Zstd) {
            return Err(invalid(
                "qcow2 compression type and its incompatible bit disagree",
            ));
        }
        if self.refcount_order > 6 {
            return Err(invalid(format!(
                "Invalid refcount_order {}",
                self.refcount_order
            )));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        Ok(())
    }

    fn check_layout(&self, cluster_size: u64) -> BlockResult<()> {
        let aligned = |o: u64| o.is_multiple_of(cluster_size) && o < MAX_HOST_OFFSET;
        let entry = if self.extended_l2() { 16 } else { 8 };
        let l2_entries = cluster_size / entry;
        let coverage = l2_entries << self.cluster_bits;
        let needed = self.size.div_ceil(coverage);
        if self.size > (1 << 62) || needed > u64::from(self.l1_size) {
            return Err(invalid(format!(
                "L1 table too small for the image size ({} entries)",
                self.l1_size
            )));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES || !aligned(self.l1_table_offset) {
            return Err(invalid("Invalid L1 table offset or size"));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cluster_size;
        if self.refcount_table_clusters == 0
            || rt_bytes > MAX_REFTABLE_BYTES
            || !aligned(self.refcount_table_offset)
        {
            return Err(invalid("Invalid refcount table offset or size"));
        }
        if self.nb_snapshots != 0 && !aligned(self.snapshots_offset) {
            return Err(invalid("Invalid snapshot table offset"));
        }
        if self.backing_file_offset != 0
            && (self.backing_file_size > MAX_BACKING_NAME
                || self.backing_file_offset + u64::from(self.backing_file_size) > cluster_size)
        {
            return Err(invalid("Backing file name too long or outside cluster 0"));
        }
        Ok(())
    }

    /// Walks the extension list after the header; each entry is bounds-checked.
    fn read_extensions(&mut self, buf: &[u8]) -> BlockResult<()> {
        let mut at = self.header_length as usize;
        let end = match self.backing_file_offset {
            0 => buf.len(),
            o => (o as usize).min(buf.len()),
        };
        while at + 8 <= end {
            let (kind, len) = (be32(buf, at), be32(buf, at + 4) as usize);
            let data_at = at + 8;
            if len > end - data_at {
                return Err(invalid("qcow2 header extension overruns the header"));
            }
            let data = &buf[data_at..data_at + len];
            if kind != EXT_BITMAPS && kind != EXT_END {
                self.other_extensions.push((kind, data.to_vec()));
            }
            match kind {
                EXT_END => break,
                // Version 2 has no autoclear bits, so bitmaps there cannot be
                // trusted; QEMU ignores them too.
                EXT_BITMAPS if self.version >= 3 => {
                    self.bitmaps = Some(BitmapsExt::parse(data, buf.len() as u64)?)
                }
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned())
                }
                EXT_FEATURE_NAMES => self.feature_names = feature_names(data),
                EXT_DATA_FILE => self.data_file = Some(String::from_utf8_lossy(data).into_owned()),
                _ => {}
            }
            at = data_at + len.next_multiple_of(8);
        }
        Ok(())
    }

    /// The start of cluster 0 with `bitmaps` as the bitmaps extension (none:
    /// no extension) and `autoclear` as the autoclear bits. `fixed` is the
    /// fixed part of the header as it is now on disk (fields such as the
    /// refcount table offset change while the image is open); the other
    /// extensions are kept and the backing file name moves behind them.
    pub fn encode_with_bitmaps(
        &self,
        fixed: &[u8],
        backing_file: Option<&str>,
        bitmaps: Option<BitmapsExt>,
        autoclear: u64,
    ) -> BlockResult<Vec<u8>> {
        let mut out = fixed[..self.header_length as usize].to_vec();
        out[OFF_AUTOCLEAR as usize..OFF_AUTOCLEAR as usize + 8]
            .copy_from_slice(&autoclear.to_be_bytes());
        let bitmaps = bitmaps.map(|b| (EXT_BITMAPS, b.encode()));
        for (kind, data) in self.other_extensions.iter().chain(bitmaps.iter()) {
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out.extend_from_slice(&[0u8; 8]);
        if let Some(name) = backing_file {
            let at = out.len() as u64;
            out[OFF_BACKING_FILE_OFFSET..OFF_BACKING_FILE_OFFSET + 8]
                .copy_from_slice(&at.to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() as u64 > self.cluster_size() {
            return Err(BlockError::new(
                BlockErrorKind::NoSpace,
                "qcow2: the header extensions do not fit in the first cluster",
            ));
        }
        Ok(out)
    }

    /// The backing file name stored in cluster 0, if any.
    pub fn backing_file(&self, buf: &[u8]) -> Option<String> {
        if self.backing_file_offset == 0 || self.backing_file_size == 0 {
            return None;
        }
        let start = self.backing_file_offset as usize;
        let name = buf.get(start..start + self.backing_file_size as usize)?;
        Some(String::from_utf8_lossy(name).into_owned())
    }
}

/// Entries of 48 bytes: type, bit number, then a NUL-padded name.
fn feature_names(data: &[u8]) -> Vec<(u8, u8, String)> {
    data.chunks_exact(48)
        .map(|e| {
            let name = &e[2..];
            let n = name.iter().position(|&c| c == 0).unwrap_or(name.len());
            (e[0], e[1], String::from_utf8_lossy(&name[..n]).into_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid v3 header with 64 KiB clusters for a 1 MiB disk.
    fn v3_cluster() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    #[test]
    fn test_parse_minimal_v3_header() {
        let h = Header::parse(&v3_cluster()).unwrap();
        assert_eq!((h.version, h.cluster_size(), h.size), (3, 65536, 1 << 20));
    }

    #[test]
    fn test_parse_bad_magic_is_invalid_image() {
        let mut b = v3_cluster();
        b[0] = 0;
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(e.kind(), BlockErrorKind::InvalidImage);
    }

    #[test]
    fn test_parse_unknown_incompatible_bit_is_not_supported() {
        let mut b = v3_cluster();
        b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(e.kind(), BlockErrorKind::NotSupported);
    }

    #[test]
    fn test_parse_encrypted_is_not_supported() {
        let mut b = v3_cluster();
        b[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(
            Header::parse(&b).unwrap_err().kind(),
            BlockErrorKind::NotSupported
        );
    }

    #[test]
    fn test_parse_l1_too_small_for_size_is_invalid() {
        let mut b = v3_cluster();
        b[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(
            Header::parse(&b).unwrap_err().kind(),
            BlockErrorKind::InvalidImage
        );
    }

    #[test]
    fn test_parse_extension_overrun_is_invalid() {
        let mut b = v3_cluster();
        b[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Header::parse(&b).unwrap_err().kind(),
            BlockErrorKind::InvalidImage
        );
    }

    #[test]
    fn test_parse_reads_backing_format_extension() {
        let mut b = v3_cluster();
        b[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[116..120].copy_from_slice(&5u32.to_be_bytes());
        b[120..125].copy_from_slice(b"qcow2");
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
    }
}

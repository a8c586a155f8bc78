//! The persistent bitmaps' on-disk format (docs/interop/qcow2.txt, "Bitmaps"):
//! the bitmap directory, the bitmap tables and the bits in the data
//! clusters. Decoding checks every field, so the loader can trust what it
//! gets; no I/O here.

use crate::error::{BlockError, BlockErrorKind, BlockResult};

use super::header::MAX_HOST_OFFSET;

/// Directory entry flags.
pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const FLAGS_KNOWN: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;

/// The only bitmap type there is.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// QEMU's granularity range for stored bitmaps (BME_MIN/MAX_GRANULARITY_BITS).
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// QEMU's limits (BME_MAX_TABLE_SIZE, BME_MAX_PHYS_SIZE, BME_MAX_NAME_SIZE).
pub const MAX_TABLE_SIZE: u64 = 0x800_0000;
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
pub const MAX_NAME_SIZE: usize = 1023;
/// Fixed part of a directory entry, before extra data and name.
const ENTRY_FIXED: usize = 24;

/// Bitmap table entries: a host offset in bits 9..55; with none, bit 0 says
/// the whole cluster of bits is set.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_ALL_ONES: u64 = 1;

fn invalid(msg: impl Into<String>) -> BlockError {
    BlockError::new(BlockErrorKind::InvalidImage, msg)
}

/// One bitmap as the directory describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub granularity_bits: u8,
    pub name: String,
    /// Kept as found (only with the extra-data-compatible flag, see `decode`).
    pub extra_data: Vec<u8>,
}

impl DirEntry {
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    fn encoded_len(&self) -> usize {
        (ENTRY_FIXED + self.extra_data.len() + self.name.len()).next_multiple_of(8)
    }
}

/// The number of bitmap table entries for a disk of `size` bytes: each
/// entry covers one cluster of bits.
pub fn table_size(size: u64, granularity: u64, cluster_size: u64) -> u64 {
    size.div_ceil(granularity).div_ceil(cluster_size * 8)
}

/// QEMU's check_constraints_on_bitmap, for a bitmap about to be stored.
pub fn check_constraints(size: u64, granularity: u64, cluster_size: u64) -> Result<(), String> {
    let bits = granularity.trailing_zeros();
    // In u128: the limits shifted by the granularity overflow 64 bits.
    let size128 = u128::from(size);
    let fits = size128 <= u128::from(MAX_PHYS_SIZE) << bits
        && size128 <= (u128::from(MAX_TABLE_SIZE) * u128::from(cluster_size)) << bits;
    if !granularity.is_power_of_two()
        || !(u32::from(MIN_GRANULARITY_BITS)..=u32::from(MAX_GRANULARITY_BITS)).contains(&bits)
    {
        return Err(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        ));
    }
    match fits {
        true => Ok(()),
        false => {
            Err("Too much space will be occupied by the bitmap. Use larger granularity".into())
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Decodes a directory of `count` entries for a disk of `size` bytes.
pub fn decode(dir: &[u8], count: u32, size: u64, cluster_size: u64) -> BlockResult<Vec<DirEntry>> {
    let mut entries: Vec<DirEntry> = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        let rest = &dir[at.min(dir.len())..];
        if rest.len() < ENTRY_FIXED {
            return Err(invalid("qcow2: bitmap directory is truncated"));
        }
        let name_size = usize::from(be16(rest, 18));
        let extra_size = be32(rest, 20) as usize;
        let need = ENTRY_FIXED
            .checked_add(extra_size)
            .and_then(|n| n.checked_add(name_size))
            .filter(|&n| n <= rest.len())
            .ok_or_else(|| invalid("qcow2: bitmap directory is truncated"))?;
        let name = String::from_utf8_lossy(&rest[ENTRY_FIXED + extra_size..need]).into_owned();
        let e = DirEntry {
            table_offset: be64(rest, 0),
            table_size: be32(rest, 8),
            flags: be32(rest, 12),
            granularity_bits: rest[17],
            extra_data: rest[ENTRY_FIXED..ENTRY_FIXED + extra_size].to_vec(),
            name,
        };
        check_entry(&e, rest[16], name_size, size, cluster_size)?;
        if entries.iter().any(|o| o.name == e.name) {
            return Err(invalid(format!(
                "qcow2: bitmap '{}' appears twice in the directory",
                e.name
            )));
        }
        at += need.next_multiple_of(8);
        entries.push(e);
    }
    if at != dir.len() {
        return Err(invalid(
            "qcow2: bitmap directory size does not match its entries",
        ));
    }
    Ok(entries)
}

/// QEMU's check_dir_entry: what makes an entry unusable (the image then fails to open).
fn check_entry(
    e: &DirEntry,
    kind: u8,
    name_size: usize,
    size: u64,
    cluster_size: u64,
) -> BlockResult<()> {
    let bad = |what: &str| invalid(format!("qcow2: bitmap '{}': {what}", e.name));
    if kind != TYPE_DIRTY_TRACKING {
        return Err(bad("unknown bitmap type"));
    }
    if e.flags & !FLAGS_KNOWN != 0 {
        return Err(bad("reserved flags are set"));
    }
    if name_size == 0 || name_size > MAX_NAME_SIZE {
        return Err(bad("invalid name length"));
    }
    if !e.extra_data.is_empty() && e.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
        return Err(bad("extra data of an unknown kind"));
    }
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits) {
        return Err(bad("granularity out of range"));
    }
    if e.table_offset == 0
        || !e.table_offset.is_multiple_of(cluster_size)
        || e.table_offset >= MAX_HOST_OFFSET
    {
        return Err(bad("invalid bitmap table offset"));
    }
    // An in-use bitmap is never read, so only its layout must be sane.
    let expected = table_size(size, e.granularity(), cluster_size);
    if !e.in_use() && u64::from(e.table_size) != expected {
        return Err(bad("bitmap table size does not match the disk size"));
    }
    if u64::from(e.table_size) > MAX_TABLE_SIZE {
        return Err(bad("bitmap table too large"));
    }
    Ok(())
}

/// Encodes a directory; its size is what goes into the header extension.
pub fn encode(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(DirEntry::encoded_len).sum());
    for e in entries {
        let start = out.len();
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(TYPE_DIRTY_TRACKING);
        out.push(e.granularity_bits);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(e.extra_data.len() as u32).to_be_bytes());
        out.extend_from_slice(&e.extra_data);
        out.extend_from_slice(e.name.as_bytes());
        out.resize(start + e.encoded_len(), 0);
    }
    out
}

/// A decoded bitmap table entry: where one cluster of bits is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableEntry {
    Zeroes,
    Ones,
    Data(u64),
}

pub fn decode_table_entry(raw: u64, cluster_size: u64) -> BlockResult<TableEntry> {
    let offset = raw & TABLE_OFFSET_MASK;
    if raw & !(TABLE_OFFSET_MASK | TABLE_ALL_ONES) != 0
        || (offset != 0 && raw & TABLE_ALL_ONES != 0)
        || !offset.is_multiple_of(cluster_size)
    {
        return Err(invalid(format!(
            "qcow2: invalid bitmap table entry {raw:#x}"
        )));
    }
    Ok(match (offset, raw & TABLE_ALL_ONES) {
        (0, 0) => TableEntry::Zeroes,
        (0, _) => TableEntry::Ones,
        (o, _) => TableEntry::Data(o),
    })
}

pub fn encode_table_entry(e: TableEntry) -> u64 {
    match e {
        TableEntry::Zeroes => 0,
        TableEntry::Ones => TABLE_ALL_ONES,
        TableEntry::Data(o) => o,
    }
}

/// The bitmap's bits as stored: bit `i` is bit `i % 8` of byte `i / 8`,
/// which is the little-endian layout of the in-memory words.
pub fn words_to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The inverse of [`words_to_bytes`]; a short last word is zero-padded.
pub fn bytes_to_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> DirEntry {
        DirEntry {
            table_offset: 0x30000,
            table_size: 1,
            flags: FLAG_AUTO,
            granularity_bits: 16,
            name: name.into(),
            extra_data: Vec::new(),
        }
    }

    #[test]
    fn test_directory_roundtrip_pads_entries_to_eight_bytes() {
        let entries = vec![entry("b0"), entry("a-longer-name")];
        let bytes = encode(&entries);
        assert_eq!(bytes.len(), 32 + 40);
        assert_eq!(decode(&bytes, 2, 64 << 20, 65536).unwrap(), entries);
    }

    #[test]
    fn test_wrong_table_size_is_refused_unless_in_use() {
        let mut e = entry("b");
        e.table_size = 7;
        let bytes = encode(&[e.clone()]);
        assert!(decode(&bytes, 1, 64 << 20, 65536).is_err());
        e.flags |= FLAG_IN_USE;
        assert!(decode(&encode(&[e]), 1, 64 << 20, 65536).is_ok());
    }

    #[test]
    fn test_truncated_and_duplicate_directories_are_invalid() {
        let bytes = encode(&[entry("b")]);
        assert!(decode(&bytes[..20], 1, 64 << 20, 65536).is_err());
        assert!(decode(&bytes, 2, 64 << 20, 65536).is_err());
        let twice = encode(&[entry("b"), entry("b")]);
        assert!(decode(&twice, 2, 64 << 20, 65536).is_err());
    }

    #[test]
    fn test_table_entries() {
        let cs = 65536;
        assert_eq!(decode_table_entry(0, cs).unwrap(), TableEntry::Zeroes);
        assert_eq!(decode_table_entry(1, cs).unwrap(), TableEntry::Ones);
        assert_eq!(
            decode_table_entry(0x50000, cs).unwrap(),
            TableEntry::Data(0x50000)
        );
        assert!(decode_table_entry(0x50001, cs).is_err());
        assert!(decode_table_entry(0x50200, cs).is_err());
        assert!(decode_table_entry(1 << 60, cs).is_err());
    }

    #[test]
    fn test_bits_are_lsb_first_bytes() {
        let words = vec![0b1000_0001u64 | 1 << 9];
        let bytes = words_to_bytes(&words);
        assert_eq!(&bytes[..2], &[0b1000_0001, 0b10]);
        assert_eq!(bytes_to_words(&bytes), words);
    }

    #[test]
    fn test_constraints_do_not_overflow_with_big_clusters() {
        assert!(check_constraints(64 << 20, 65536, 2 << 20).is_ok());
        assert!(check_constraints(1 << 58, 1 << 31, 2 << 20).is_ok());
        // 2^62 bytes at 512 B is 2^53 bits, far over the 2^29 QEMU allows.
        assert!(check_constraints(1 << 62, 512, 65536).is_err());
    }

    #[test]
    fn test_table_size_counts_clusters_of_bits() {
        // 64 MiB at 64 KiB granularity is 1024 bits: one cluster.
        assert_eq!(table_size(64 << 20, 65536, 65536), 1);
        // 4 TiB at 512 B is 2^33 bits, 2^30 bytes: 16384 clusters of 64 KiB.
        assert_eq!(table_size(4 << 40, 512, 65536), 16384);
    }
}

//! Laying out a new, empty qcow2 image: what `bexd serve -s` needs for its
//! throwaway overlay (qemu-nbd's `-s` creates one with `backing_file=IMAGE`).
//!
//! The image is version 3 with 64 KiB clusters and 16-bit refcounts, as
//! `qemu-img create -f qcow2` makes by default:
//!
//! ```text
//!   cluster 0      header, backing-format extension, backing file name
//!   cluster 1      refcount table (one entry used)
//!   cluster 2      refcount block (counts clusters 0..=2+L1 clusters as used)
//!   cluster 3..    L1 table, all entries zero (nothing allocated)
//! ```
//!
//! The driver grows the refcount structures itself as data is written.

use crate::error::{BlockError, BlockErrorKind, BlockResult};

use super::header::EXT_BACKING_FORMAT;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// 16-bit refcounts (refcount_order 4), QEMU's default.
const REFCOUNT_ORDER: u32 = 4;
/// The version 3 header without extensions.
const HEADER_LEN: usize = 104;
/// L2 entries per table: each L1 entry maps this many clusters.
const L2_ENTRIES: u64 = CLUSTER / 8;
/// One refcount block counts this many clusters; the metadata must fit in it.
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER * 8 / (1 << REFCOUNT_ORDER);

/// The bytes of a new empty qcow2 image of `size` bytes whose backing file
/// is `backing` (name, format), if any.
pub fn empty_image(size: u64, backing: Option<(&str, &str)>) -> BlockResult<Vec<u8>> {
    let l1_entries = size.div_ceil(CLUSTER * L2_ENTRIES);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER).max(1);
    let clusters = 3 + l1_clusters;
    if clusters > REFCOUNTS_PER_BLOCK || l1_entries > u64::from(u32::MAX) {
        return Err(BlockError::new(
            BlockErrorKind::InvalidArgument,
            format!("Image size {size} is too large for a new qcow2 image"),
        ));
    }
    let mut image = vec![0u8; (clusters * CLUSTER) as usize];
    let header = &mut image[..CLUSTER as usize];
    put(header, 0, b"QFI\xfb");
    put(header, 4, &3u32.to_be_bytes());
    put(header, 20, &CLUSTER_BITS.to_be_bytes());
    put(header, 24, &size.to_be_bytes());
    put(header, 36, &(l1_entries as u32).to_be_bytes());
    put(header, 40, &(3 * CLUSTER).to_be_bytes());
    put(header, 48, &CLUSTER.to_be_bytes());
    put(header, 56, &1u32.to_be_bytes());
    put(header, 96, &REFCOUNT_ORDER.to_be_bytes());
    put(header, 100, &(HEADER_LEN as u32).to_be_bytes());
    let mut at = HEADER_LEN;
    if let Some((_, format)) = backing {
        // Extension: the backing file's format, padded to 8 bytes.
        put(header, at, &EXT_BACKING_FORMAT.to_be_bytes());
        put(header, at + 4, &(format.len() as u32).to_be_bytes());
        put(header, at + 8, format.as_bytes());
        at += 8 + format.len().next_multiple_of(8);
    }
    at += 8; // the end-of-extensions marker: type 0, length 0
    if let Some((name, _)) = backing {
        if at + name.len() > header.len() || name.len() > 1023 {
            return Err(BlockError::new(
                BlockErrorKind::InvalidArgument,
                format!("Backing file name too long: {name}"),
            ));
        }
        put(header, 8, &(at as u64).to_be_bytes());
        put(header, 16, &(name.len() as u32).to_be_bytes());
        put(header, at, name.as_bytes());
    }
    // Refcount table entry 0 points at the refcount block in cluster 2.
    put(&mut image, CLUSTER as usize, &(2 * CLUSTER).to_be_bytes());
    for cluster in 0..clusters {
        let at = (2 * CLUSTER + cluster * 2) as usize;
        put(&mut image, at, &1u16.to_be_bytes());
    }
    Ok(image)
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::qcow2::header::Header;

    #[test]
    fn test_empty_image_header_reads_back() {
        let image = empty_image(1 << 30, Some(("/images/base.raw", "raw"))).unwrap();
        // The header is parsed from its cluster, as the driver reads it.
        let header = Header::parse(&image[..CLUSTER as usize]).unwrap();
        assert_eq!(header.size, 1 << 30);
        assert_eq!(header.cluster_bits, 16);
        assert_eq!(header.l1_size, 2);
        assert_eq!(image.len() as u64, 4 * CLUSTER);
        let name_at = header.backing_file_offset as usize;
        assert_eq!(
            &image[name_at..name_at + header.backing_file_size as usize],
            b"/images/base.raw"
        );
    }

    #[test]
    fn test_huge_sizes_get_more_l1_clusters_until_refcounts_run_out() {
        // 64 TiB: 131072 L1 entries, 1 MiB of L1 table (16 clusters).
        let image = empty_image(64 << 40, None).unwrap();
        assert_eq!(image.len() as u64, (3 + 16) * CLUSTER);
        assert!(empty_image(u64::MAX, None).is_err());
    }
}

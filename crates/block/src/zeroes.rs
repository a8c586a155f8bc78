//! `detect-zeroes`: a node option that turns WRITEs whose payload is all
//! zeroes into write-zeroes requests, as QEMU's block layer does, so a guest
//! or client that writes zero blocks leaves sparse (or discarded) ranges
//! instead of allocated zero data.

/// QEMU's `BlockdevDetectZeroesOptions`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Writes go to the driver as they are (QEMU's default).
    #[default]
    Off,
    /// A zero payload becomes a write-zeroes that keeps the range allocated.
    On,
    /// A zero payload becomes a write-zeroes that may deallocate the range;
    /// the driver deallocates only when its node has `discard=unmap` (QEMU
    /// refuses `unmap` without it, before a node exists).
    Unmap,
}

impl DetectZeroes {
    /// QEMU's name, as `query-named-block-nodes` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::On => "on",
            Self::Unmap => "unmap",
        }
    }
}

/// Bytes compared per step: a fixed-size OR-reduction the compiler turns
/// into vector instructions, with one branch per block instead of per byte.
const BLOCK: usize = 256;

/// Whether every byte of `buf` is zero. Cheap on data, the common case: the
/// first 16 bytes are looked at before anything else, so a payload with data
/// near its start costs one compare; an all-zero payload is read once at
/// memory speed.
pub fn is_zero(buf: &[u8]) -> bool {
    let head = buf.len().min(16);
    if buf[..head].iter().any(|&b| b != 0) {
        return false;
    }
    let mut blocks = buf.chunks_exact(BLOCK);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_empty_and_zero_buffers_are_zero() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1]));
        assert!(is_zero(&[0; 4096]));
        assert!(is_zero(&[0; 4096 + 17]));
    }

    #[test]
    fn test_one_nonzero_byte_anywhere_is_found() {
        for len in [1usize, 15, 16, 17, 255, 256, 257, 4096, 4096 + 100] {
            for at in [0, len / 2, len - 1] {
                let mut buf = vec![0u8; len];
                buf[at] = 0x80;
                assert!(!is_zero(&buf), "len {len}, byte {at}");
            }
        }
    }

    #[test]
    fn test_names_are_qemus() {
        assert_eq!(DetectZeroes::default().as_str(), "off");
        assert_eq!(DetectZeroes::On.as_str(), "on");
        assert_eq!(DetectZeroes::Unmap.as_str(), "unmap");
    }
}

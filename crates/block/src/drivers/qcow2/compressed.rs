//! Compressed clusters: raw deflate (QEMU's default, zlib without header) or
//! one zstd frame (compression type 1). The stored length is rounded up to
//! 512-byte sectors, so input may carry trailing bytes; output must fill
//! exactly one cluster, anything else is a corrupt image.

use std::io::Read;

use flate2::{Decompress, FlushDecompress, Status};

use crate::error::{BlockError, BlockErrorKind, BlockResult};

use super::header::Compression;

fn corrupt(what: &str) -> BlockError {
    BlockError::new(
        BlockErrorKind::Corrupt,
        format!("qcow2: compressed cluster does not decompress ({what})"),
    )
}

/// Inflates `input` into `out` (one cluster).
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> BlockResult<()> {
    match kind {
        Compression::Zlib => inflate(input, out),
        Compression::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> BlockResult<()> {
    let mut d = Decompress::new(false);
    let status = d
        .decompress(input, out, FlushDecompress::Finish)
        .map_err(|_| corrupt("deflate error"))?;
    let full = d.total_out() == out.len() as u64;
    match status {
        Status::StreamEnd | Status::Ok | Status::BufError if full => Ok(()),
        _ => Err(corrupt("short deflate output")),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> BlockResult<()> {
    let mut src = input;
    let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
        .map_err(|_| corrupt("bad zstd frame header"))?;
    dec.read_exact(out).map_err(|_| corrupt("zstd error"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression as Level, FlushCompress};

    #[test]
    fn test_inflate_raw_deflate_with_trailing_bytes() {
        let data = vec![7u8; 4096];
        let mut c = Compress::new(Level::default(), false);
        let mut packed = vec![0u8; 8192];
        c.compress(&data, &mut packed, FlushCompress::Finish)
            .unwrap();
        packed.truncate(c.total_out() as usize + 100);
        let mut out = vec![0u8; 4096];
        decompress(Compression::Zlib, &packed, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn test_inflate_garbage_is_corrupt() {
        let mut out = vec![0u8; 4096];
        let e = decompress(Compression::Zlib, &[0xff; 64], &mut out).unwrap_err();
        assert_eq!(e.kind(), BlockErrorKind::Corrupt);
    }

    #[test]
    fn test_zstd_garbage_is_corrupt() {
        let mut out = vec![0u8; 4096];
        let e = decompress(Compression::Zstd, &[1, 2, 3], &mut out).unwrap_err();
        assert_eq!(e.kind(), BlockErrorKind::Corrupt);
    }
}

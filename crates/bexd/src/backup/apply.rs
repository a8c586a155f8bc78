//! Incrementals kept apart from their full: an incremental pulled without
//! `--base` is a sparse file of the export's size holding the dirty ranges,
//! plus `FILE.extents.json`, the list of those ranges. `--apply FILE`
//! later writes exactly those ranges onto a copy of a full backup (zeroes
//! included), which is what `--base` would have produced at backup time.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::BackupError;

/// Where the ranges of an incremental are listed.
pub fn extents_path(incremental: &Path) -> PathBuf {
    let mut p = incremental.as_os_str().to_owned();
    p.push(".extents.json");
    PathBuf::from(p)
}

pub fn save(incremental: &Path, ranges: &[(u64, u64)]) -> Result<(), BackupError> {
    let json = serde_json::to_string(ranges).map_err(|e| BackupError::Usage(e.to_string()))?;
    std::fs::write(extents_path(incremental), json)?;
    Ok(())
}

/// Copies `base` to `output` (unless they are the same file) and writes the
/// incremental's ranges into it. Returns the bytes applied.
pub fn apply(incremental: &Path, base: &Path, output: &Path) -> Result<u64, BackupError> {
    let listed = std::fs::read_to_string(extents_path(incremental))?;
    let ranges: Vec<(u64, u64)> = serde_json::from_str(&listed)
        .map_err(|e| BackupError::Usage(format!("{}: {e}", extents_path(incremental).display())))?;
    let inc = std::fs::File::open(incremental)?;
    if base != output {
        std::fs::copy(base, output)?;
    }
    let out = std::fs::OpenOptions::new().write(true).open(output)?;
    let (inc_len, out_len) = (inc.metadata()?.len(), out.metadata()?.len());
    if inc_len != out_len {
        return Err(BackupError::Usage(format!(
            "the incremental is {inc_len} bytes, the base {out_len}"
        )));
    }
    let mut buf = vec![0u8; super::plan::MAX_READ as usize];
    let mut applied = 0;
    for (offset, len) in ranges {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= inc_len)
            .ok_or_else(|| {
                BackupError::Usage(format!("range {offset}+{len} is outside the image"))
            })?;
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            inc.read_exact_at(&mut buf[..n], pos)?;
            out.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
        }
        applied += len;
    }
    out.sync_all()?;
    Ok(applied)
}

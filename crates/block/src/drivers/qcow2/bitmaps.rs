//! Persistent dirty bitmaps in the image: loaded at open, stored at close,
//! removed on request, the way QEMU keeps them (block/qcow2-bitmap.c).
//!
//! While an image is open for writing, every bitmap it holds is flagged
//! "in use" on disk; a clean close writes the bits and clears the flag. So
//! after a crash the next open finds the flag and loads the bitmap as
//! *inconsistent* (no bits, removable only) instead of trusting stale bits.
//!
//! Every rewrite follows one crash-safe order: new clusters (bits, tables,
//! directory) are allocated and written, refcounts and data are synced, then
//! the header is pointed at the new directory and synced, and only then are
//! the old clusters released. A crash at any step leaves either the old or
//! the new directory in place, plus at most leaked clusters.

use std::sync::{Arc, MutexGuard};

use crate::bitmap::DirtyBitmap;
use crate::bitmap_store::StoredBitmap;
use crate::driver::Driver;
use crate::error::{BlockError, BlockErrorKind, BlockResult};

use super::bitmap_dir::{self, DirEntry, TableEntry, FLAG_AUTO, FLAG_IN_USE};
use super::header::{
    BitmapsExt, Header, AUTOCLEAR_BITMAPS, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE, OFF_AUTOCLEAR,
};
use super::meta::Meta;
use super::Qcow2Driver;

/// The image's bitmap directory as it is on disk, and what open loaded.
#[derive(Debug, Default)]
pub struct BitmapDirectory {
    pub entries: Vec<DirEntry>,
    pub ext: Option<BitmapsExt>,
    /// The autoclear bits as on disk.
    pub autoclear: u64,
    /// Loaded at open, handed to the node once.
    pub loaded: Vec<DirtyBitmap>,
}

fn invalid(msg: impl Into<String>) -> BlockError {
    BlockError::new(BlockErrorKind::InvalidImage, msg)
}

/// Reads the directory and every consistent bitmap's bits. On a writable
/// image the bitmaps are then flagged in use (see the module docs).
pub fn load(f: &dyn Driver, h: &Header, read_only: bool) -> BlockResult<BitmapDirectory> {
    let mut store = BitmapDirectory {
        autoclear: h.autoclear,
        ..BitmapDirectory::default()
    };
    let ext = match h.bitmaps {
        Some(ext) if h.autoclear & AUTOCLEAR_BITMAPS != 0 => ext,
        Some(_) => {
            tracing::warn!(
                "qcow2: a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent"
            );
            if !read_only {
                // Dropping the stale extension leaks its clusters, as in QEMU;
                // `qemu-img check -r leaks` reclaims them.
                store.autoclear = 0;
                write_header(f, h, None, 0)?;
            }
            return Ok(store);
        }
        None => {
            if !read_only && h.autoclear != 0 {
                // Autoclear features we do not know become stale once we write.
                f.write_at(&[0u8; 8], OFF_AUTOCLEAR, false)?;
                f.flush()?;
                store.autoclear = 0;
            }
            return Ok(store);
        }
    };
    let cs = h.cluster_size();
    let mut dir = vec![0u8; ext.directory_size as usize];
    f.read_at(&mut dir, ext.directory_offset)?;
    store.entries = bitmap_dir::decode(&dir, ext.nb_bitmaps, h.size, cs)?;
    store.ext = Some(ext);
    for e in &store.entries {
        let bitmap = match e.in_use() {
            true => DirtyBitmap::inconsistent(e.name.clone(), h.size, e.granularity()),
            false => {
                let words = read_bits(f, e, h.size, cs)?;
                DirtyBitmap::new_with_words(
                    e.name.clone(),
                    h.size,
                    e.granularity(),
                    e.auto(),
                    true,
                    words,
                )
            }
        };
        store.loaded.push(match read_only {
            true => bitmap.into_readonly(),
            false => bitmap,
        });
    }
    if !read_only {
        let known = AUTOCLEAR_BITMAPS;
        if h.autoclear & !known != 0 {
            store.autoclear = h.autoclear & known;
            f.write_at(&store.autoclear.to_be_bytes(), OFF_AUTOCLEAR, false)?;
        }
        if store.entries.iter().any(|e| !e.in_use()) {
            store
                .entries
                .iter_mut()
                .for_each(|e| e.flags |= FLAG_IN_USE);
            f.write_at(
                &bitmap_dir::encode(&store.entries),
                ext.directory_offset,
                false,
            )?;
        }
        f.flush()?;
    }
    Ok(store)
}

/// The bitmap table of an entry, decoded.
fn read_table(f: &dyn Driver, e: &DirEntry, cs: u64) -> BlockResult<Vec<TableEntry>> {
    let mut raw = vec![0u8; e.table_size as usize * 8];
    f.read_at(&mut raw, e.table_offset)?;
    raw.chunks_exact(8)
        .map(|c| bitmap_dir::decode_table_entry(super::l2::be64(c, 0), cs))
        .collect()
}

/// A consistent bitmap's bits, as the in-memory words.
fn read_bits(f: &dyn Driver, e: &DirEntry, size: u64, cs: u64) -> BlockResult<Vec<u64>> {
    let nbits = size.div_ceil(e.granularity());
    if u64::from(e.table_size) * cs > bitmap_dir::MAX_PHYS_SIZE {
        return Err(invalid(format!("qcow2: bitmap '{}' is too big", e.name)));
    }
    let mut bytes = vec![0u8; e.table_size as usize * cs as usize];
    for (i, t) in read_table(f, e, cs)?.into_iter().enumerate() {
        let chunk = &mut bytes[i * cs as usize..(i + 1) * cs as usize];
        match t {
            TableEntry::Zeroes => {}
            TableEntry::Ones => chunk.fill(0xff),
            TableEntry::Data(o) => f.read_at(chunk, o)?,
        }
    }
    bytes.truncate(nbits.div_ceil(8) as usize);
    let mut words = bitmap_dir::bytes_to_words(&bytes);
    if !nbits.is_multiple_of(64) {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << (nbits % 64)) - 1;
        }
    }
    Ok(words)
}

/// Writes the start of cluster 0 with `ext` as the bitmaps extension.
fn write_header(
    f: &dyn Driver,
    h: &Header,
    ext: Option<BitmapsExt>,
    autoclear: u64,
) -> BlockResult<()> {
    let mut fixed = vec![0u8; h.header_length as usize];
    f.read_at(&mut fixed, 0)?;
    let backing = backing_name(f, h)?;
    let bytes = h.encode_with_bitmaps(&fixed, backing.as_deref(), ext, autoclear)?;
    f.write_at(&bytes, 0, false)?;
    f.flush()
}

fn backing_name(f: &dyn Driver, h: &Header) -> BlockResult<Option<String>> {
    if h.backing_file_offset == 0 || h.backing_file_size == 0 {
        return Ok(None);
    }
    // The header may have moved the name since open: read where it is now.
    let mut at = [0u8; 8];
    f.read_at(&mut at, 8)?;
    let mut name = vec![0u8; h.backing_file_size as usize];
    f.read_at(&mut name, u64::from_be_bytes(at))?;
    Ok(Some(String::from_utf8_lossy(&name).into_owned()))
}

impl Qcow2Driver {
    /// The bitmap directory, locked. Never on a request's path (open,
    /// close, QMP), but it is metadata like the L2 tables: a holder that
    /// panicked may have left it out of step with the disk, so a poisoned
    /// lock is an error, never used as it is (see `Qcow2Driver::lock`).
    fn directory(&self) -> BlockResult<MutexGuard<'_, BitmapDirectory>> {
        self.bitmaps
            .lock()
            .map_err(|_| super::poisoned("bitmap directory"))
    }

    /// The bitmaps loaded at open (none if the directory's lock was poisoned).
    pub(super) fn take_loaded(&self) -> Vec<DirtyBitmap> {
        match self.directory() {
            Ok(mut st) => std::mem::take(&mut st.loaded),
            Err(e) => {
                tracing::error!(error = %e, "qcow2: loaded bitmaps lost");
                Vec::new()
            }
        }
    }

    /// What the image holds (nothing shown if the directory's lock was poisoned).
    pub(super) fn stored(&self) -> Vec<StoredBitmap> {
        let Ok(st) = self.directory() else {
            return Vec::new();
        };
        st.entries
            .iter()
            .map(|e| StoredBitmap {
                name: e.name.clone(),
                granularity: e.granularity(),
                in_use: e.in_use(),
                auto: e.auto(),
            })
            .collect()
    }

    /// QEMU's qcow2_co_can_store_new_dirty_bitmap.
    pub(super) fn check_new(&self, name: &str, granularity: u64) -> Result<(), String> {
        if self.header.version < 3 {
            return Err("Cannot store dirty bitmaps in qcow2 v2 files".into());
        }
        // A name taken in memory is refused by the caller ("Bitmap already
        // exists"), and every stored bitmap is in memory.
        let st = self.directory().map_err(|e| e.to_string())?;
        if st.entries.len() >= MAX_BITMAPS as usize {
            return Err("Maximum number of persistent bitmaps is already reached".into());
        }
        let dir_size = st.ext.map_or(0, |e| e.directory_size);
        if dir_size + (24 + name.len() as u64).next_multiple_of(8) > MAX_BITMAP_DIRECTORY_SIZE {
            return Err("Not enough space in the bitmap directory".into());
        }
        bitmap_dir::check_constraints(self.header.size, granularity, self.cluster_size())
    }

    /// Writes every persistent, consistent bitmap of the node and clears the
    /// in-use flags; inconsistent ones stay as they are on disk.
    pub(super) fn store(&self, bitmaps: &[Arc<DirtyBitmap>]) -> BlockResult<()> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.directory()?;
        let to_store: Vec<&Arc<DirtyBitmap>> = bitmaps
            .iter()
            .filter(|b| b.persistent() && !b.is_inconsistent())
            .collect();
        if to_store.is_empty() && st.entries.is_empty() {
            return Ok(());
        }
        self.flush_all()?;
        let f = self.f();
        let cs = self.cluster_size();
        let mut m = self.lock()?;
        let mut entries = Vec::new();
        let mut frees = Vec::new();
        for old in &st.entries {
            let kept = bitmaps
                .iter()
                .any(|b| b.name() == old.name && b.is_inconsistent());
            match kept {
                true => entries.push(old.clone()),
                false => frees.extend(clusters_of(f, old, cs)),
            }
        }
        // Directory order as on disk, new bitmaps after them (as QEMU stores).
        let mut ordered: Vec<&Arc<DirtyBitmap>> = Vec::new();
        for old in &st.entries {
            ordered.extend(to_store.iter().filter(|b| b.name() == old.name));
        }
        for b in &to_store {
            if !st.entries.iter().any(|e| e.name == b.name()) {
                ordered.push(b);
            }
        }
        for b in ordered {
            entries.push(self.write_bitmap(&mut m, b)?);
        }
        self.replace_directory(&mut st, &mut m, entries, frees)
    }

    /// Drops one bitmap from the image's directory and frees its clusters.
    pub(super) fn remove_stored(&self, name: &str) -> BlockResult<()> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.directory()?;
        let Some(i) = st.entries.iter().position(|e| e.name == name) else {
            return Ok(());
        };
        let mut entries = st.entries.clone();
        let removed = entries.remove(i);
        let frees = clusters_of(self.f(), &removed, self.cluster_size());
        let mut m = self.lock()?;
        self.replace_directory(&mut st, &mut m, entries, frees)
    }

    /// Bits, then table, in newly allocated clusters; all-zero clusters of
    /// bits take no space. Returns the directory entry.
    fn write_bitmap(&self, m: &mut Meta, b: &DirtyBitmap) -> BlockResult<DirEntry> {
        let f = self.f();
        let cs = self.cluster_size() as usize;
        let granularity = b.granularity();
        let table_size = bitmap_dir::table_size(self.header.size, granularity, cs as u64);
        let mut bytes = bitmap_dir::words_to_bytes(&b.words());
        bytes.resize(table_size as usize * cs, 0);
        let mut table = Vec::with_capacity(table_size as usize * 8);
        for chunk in bytes.chunks(cs) {
            let entry = match chunk.iter().all(|&x| x == 0) {
                true => TableEntry::Zeroes,
                false => {
                    let at = m.alloc_clusters(f, 1)?;
                    f.write_at(chunk, at, false)?;
                    TableEntry::Data(at)
                }
            };
            table.extend_from_slice(&bitmap_dir::encode_table_entry(entry).to_be_bytes());
        }
        let table_offset = self.write_new_clusters(m, table)?;
        Ok(DirEntry {
            table_offset,
            table_size: table_size as u32,
            flags: if b.enabled() { FLAG_AUTO } else { 0 },
            granularity_bits: granularity.trailing_zeros() as u8,
            name: b.name().to_string(),
            extra_data: Vec::new(),
        })
    }

    /// Allocates clusters for `data` (zero-padded to whole clusters) and writes it.
    fn write_new_clusters(&self, m: &mut Meta, mut data: Vec<u8>) -> BlockResult<u64> {
        let cs = self.cluster_size();
        let n = (data.len() as u64).div_ceil(cs).max(1);
        data.resize((n * cs) as usize, 0);
        let at = m.alloc_clusters(self.f(), n)?;
        self.f().write_at(&data, at, false)?;
        Ok(at)
    }

    /// Points the header at a directory of `entries` (none: no extension),
    /// in the crash-safe order of the module docs, then frees `frees` and
    /// the old directory.
    fn replace_directory(
        &self,
        st: &mut BitmapDirectory,
        m: &mut Meta,
        entries: Vec<DirEntry>,
        mut frees: Vec<(u64, u64)>,
    ) -> BlockResult<()> {
        let f = self.f();
        let cs = self.cluster_size();
        let ext = match entries.is_empty() {
            true => None,
            false => {
                let dir = bitmap_dir::encode(&entries);
                let size = dir.len() as u64;
                Some(BitmapsExt {
                    nb_bitmaps: entries.len() as u32,
                    directory_size: size,
                    directory_offset: self.write_new_clusters(m, dir)?,
                })
            }
        };
        m.flush(f)?;
        f.flush()?;
        let autoclear = match ext {
            Some(_) => st.autoclear | AUTOCLEAR_BITMAPS,
            None => st.autoclear & !AUTOCLEAR_BITMAPS,
        };
        write_header(f, &self.header, ext, autoclear)?;
        if let Some(old) = st.ext {
            frees.push((
                old.directory_offset,
                old.directory_size.next_multiple_of(cs),
            ));
        }
        st.entries = entries;
        st.ext = ext;
        st.autoclear = autoclear;
        m.pending_frees.extend(frees);
        m.flush(f)?;
        Ok(())
    }
}

/// The clusters a stored bitmap occupies: its table and its bits. A table
/// that cannot be read or decoded (an in-use bitmap may hold anything) only
/// costs leaked clusters.
fn clusters_of(f: &dyn Driver, e: &DirEntry, cs: u64) -> Vec<(u64, u64)> {
    let mut out = vec![(
        e.table_offset,
        (u64::from(e.table_size) * 8).next_multiple_of(cs).max(cs),
    )];
    match read_table(f, e, cs) {
        Ok(table) => out.extend(table.into_iter().filter_map(|t| match t {
            TableEntry::Data(o) => Some((o, cs)),
            _ => None,
        })),
        Err(err) => tracing::warn!("qcow2: bitmap '{}': {err}; its clusters leak", e.name),
    }
    out
}

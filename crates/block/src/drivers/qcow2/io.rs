//! Guest I/O: mapping under the metadata lock, data I/O outside it.
//!
//! A write to a cluster that is fully allocated here with refcount 1
//! (COPIED) goes in place. Any other write allocates fresh clusters, fills
//! them (old contents of partial clusters copied from this layer, the
//! backing file or zeroes), and only then points the L2 entry at them; the
//! old clusters are freed after the next flush has made that change durable.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use crate::debug_event::DebugEvent;
use crate::driver::{Extent, ZeroFlags};
use crate::error::{BlockError, BlockErrorKind, BlockResult};
use crate::mapping::{Access, FileMapping, MappingLease};

use super::compressed::decompress;
use super::l2::{L2Entry, Mapping, ALL_ALLOC_BITS, ALL_ZERO_BITS, COPIED, ZERO};
use super::meta::Meta;
use super::Qcow2Driver;

/// A stretch of a request with one source.
#[derive(Clone, Copy, Debug)]
struct Piece {
    len: u64,
    src: Source,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Zero,
    /// Not in this layer: the backing file at this guest offset.
    Below {
        guest: u64,
    },
    /// This host offset in the image file.
    Host {
        pos: u64,
    },
    /// Bytes `skip..` of a compressed cluster.
    Compressed {
        host: u64,
        len: u64,
        skip: u64,
    },
}

/// Most clusters one allocating write handles before it takes the lock again.
const MAX_ALLOC_RUN: u64 = 1024;

fn source(m: Mapping, guest: u64, in_cluster: u64) -> Source {
    match m {
        Mapping::Unallocated => Source::Below { guest },
        Mapping::Zero => Source::Zero,
        Mapping::Data { host } => Source::Host {
            pos: host + in_cluster,
        },
        Mapping::Compressed { host, len } => Source::Compressed {
            host,
            len,
            skip: in_cluster,
        },
    }
}

/// Appends, merging with the previous piece when the sources continue.
fn push(pieces: &mut Vec<Piece>, p: Piece) {
    if let Some(last) = pieces.last_mut() {
        let merged = match (last.src, p.src) {
            (Source::Zero, Source::Zero) => true,
            (Source::Below { guest: a }, Source::Below { guest: b }) => a + last.len == b,
            (Source::Host { pos: a }, Source::Host { pos: b }) => a + last.len == b,
            _ => false,
        };
        if merged {
            last.len += p.len;
            return;
        }
    }
    pieces.push(p);
}

impl Qcow2Driver {
    fn map_range(&self, m: &mut Meta, offset: u64, len: u64) -> BlockResult<Vec<Piece>> {
        let geom = m.geom;
        let (cs, sub) = (geom.cluster_size(), geom.sub_size());
        let mut pieces = Vec::new();
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let e = m.lookup(self.f(), pos)?;
            let in_cluster = pos & (cs - 1);
            let mapping = e.mapping(&geom, (in_cluster / sub) as u32)?;
            let next = ((pos / sub + 1) * sub).min(end);
            let src = source(mapping, pos, in_cluster);
            push(
                &mut pieces,
                Piece {
                    len: next - pos,
                    src,
                },
            );
            pos = next;
        }
        Ok(pieces)
    }

    pub(super) fn read(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let (pieces, in_flight) = {
            let mut m = self.lock()?;
            let pieces = self.map_range(&mut m, offset, buf.len() as u64)?;
            m.in_flight.fetch_add(1, Ordering::AcqRel);
            (pieces, m.in_flight.clone())
        };
        let mut at = 0usize;
        let mut r = Ok(());
        for p in pieces {
            let n = p.len as usize;
            r = self.read_source(&mut buf[at..at + n], p.src);
            if r.is_err() {
                break;
            }
            at += n;
        }
        in_flight.fetch_sub(1, Ordering::AcqRel);
        r
    }

    /// The file runs of `[offset, offset+len)` when all of it lies in data
    /// clusters of this layer, leased: its clusters are not freed (so not
    /// reused for other data) until the lease drops. Unless the file is a
    /// page-cache file, mapping must read nothing (the L2 tables are
    /// cached): the caller may be an async task, which a miss would block.
    pub(super) fn leased_mapping(&self, offset: u64, len: u64) -> Option<FileMapping<'_>> {
        // Never take the lock and map unless the file can answer at all.
        let page_cache = self.f().map_file(0, 4096, Access::Read)?.page_cache;
        let m = &mut *self.lock().ok()?;
        // Frees waiting for leases to end: hand out no more, so they do end
        // (under a steady read load they otherwise might never all be gone).
        if !m.pending_frees.is_empty() {
            return None;
        }
        if !page_cache {
            let l2_span = m.geom.cluster_size() * m.geom.l2_entries();
            let mut guest = offset - offset % l2_span;
            while guest < offset + len {
                if !m.lookup_is_cached(guest.max(offset)) {
                    return None;
                }
                guest += l2_span;
            }
        }
        let pieces = self.map_range(m, offset, len).ok()?;
        self.lease_host_pieces(m, pieces)
    }

    /// The file mapping of `pieces` when every one is this layer's data (on
    /// one descriptor), joined, with a lease on the mapping: taken under the
    /// lock that flush checks the lease count under. The joined mapping can
    /// do what every part can (the page cache, the ring).
    fn lease_host_pieces(&self, m: &Meta, pieces: Vec<Piece>) -> Option<FileMapping<'_>> {
        let mut whole: Option<FileMapping<'_>> = None;
        for piece in pieces {
            let Source::Host { pos } = piece.src else {
                return None;
            };
            let mut p = self.f().map_file(pos, piece.len, Access::Read)?;
            if p.lease.is_some() {
                return None;
            }
            match &mut whole {
                None => whole = Some(p),
                Some(w) if w.fd.as_raw_fd() == p.fd.as_raw_fd() => {
                    w.runs.append(&mut p.runs);
                    w.page_cache &= p.page_cache;
                    w.ring = w.ring.and(p.ring);
                    if !w.page_cache && w.ring.is_none() {
                        return None;
                    }
                }
                Some(_) => return None,
            }
        }
        let mut whole = whole?;
        whole.lease = Some(MappingLease::new(m.leased.clone()));
        Some(whole)
    }

    fn read_source(&self, buf: &mut [u8], src: Source) -> BlockResult<()> {
        match src {
            Source::Zero => {
                buf.fill(0);
                Ok(())
            }
            Source::Below { guest } => self.read_below(buf, guest),
            Source::Host { pos } => {
                self.f().debug_event(DebugEvent::ReadAio);
                self.f().read_at(buf, pos)
            }
            Source::Compressed { host, len, skip } => {
                let mut packed = vec![0u8; len as usize];
                self.f().debug_event(DebugEvent::ReadCompressed);
                self.f().read_at(&mut packed, host)?;
                let mut cluster = vec![0u8; self.cluster_size() as usize];
                decompress(self.header.compression, &packed, &mut cluster)?;
                let s = skip as usize;
                buf.copy_from_slice(&cluster[s..s + buf.len()]);
                Ok(())
            }
        }
    }

    /// Reads the backing file; past its end (or without one) reads zeroes.
    fn read_below(&self, buf: &mut [u8], guest: u64) -> BlockResult<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let avail = b.size().saturating_sub(guest).min(buf.len() as u64) as usize;
        if avail > 0 {
            self.f().debug_event(DebugEvent::ReadBackingAio);
            b.driver().read_at(&mut buf[..avail], guest)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// The current contents of the guest cluster at `start`, given its entry.
    fn read_cluster(&self, e: L2Entry, start: u64) -> BlockResult<Vec<u8>> {
        let geom = self.geom();
        let (cs, sub) = (geom.cluster_size(), geom.sub_size());
        let mut data = vec![0u8; cs as usize];
        let mut at = 0u64;
        while at < cs {
            let src = source(e.mapping(&geom, (at / sub) as u32)?, start + at, at);
            let len = match src {
                Source::Compressed { .. } => cs,
                _ => sub,
            };
            self.read_source(&mut data[at as usize..(at + len) as usize], src)?;
            at += len;
        }
        Ok(data)
    }

    pub(super) fn write(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        let mut done = 0usize;
        while done < buf.len() {
            done += self.write_step(&buf[done..], offset + done as u64)?;
        }
        Ok(())
    }

    fn in_place(m: &Meta, e: L2Entry, guest: u64) -> bool {
        e.is_copied() && e.fully_allocated(m.geom.extended) && m.l2_writable(guest)
    }

    /// Writes a prefix of `buf`; returns its length.
    fn write_step(&self, buf: &[u8], offset: u64) -> BlockResult<usize> {
        let bits = self.header.cluster_bits;
        let cluster = offset >> bits;
        let mut m = self.lock()?;
        loop {
            if m.busy.contains(&cluster) {
                m = self.wait_released(m)?;
                continue;
            }
            let e = m.lookup(self.f(), offset)?;
            if Self::in_place(&m, e, offset) {
                return self.write_in_place(m, buf, offset, e.host_offset());
            }
            return self.write_allocating(m, buf, offset);
        }
    }

    /// Overwrites clusters that are already ours. Counted in flight, so a
    /// concurrent zeroing or discard cannot let their clusters be reused
    /// under the write (see `Meta::flush`).
    fn write_in_place(
        &self,
        mut m: std::sync::MutexGuard<'_, Meta>,
        buf: &[u8],
        offset: u64,
        host: u64,
    ) -> BlockResult<usize> {
        let cs = self.cluster_size();
        let in_cluster = offset % cs;
        let mut n = (cs - in_cluster).min(buf.len() as u64);
        while n < buf.len() as u64 {
            let g = offset + n;
            let e = m.lookup(self.f(), g)?;
            let contiguous = e.host_offset() == host + in_cluster + n;
            if !contiguous || m.busy.contains(&(g / cs)) || !Self::in_place(&m, e, g) {
                break;
            }
            n += cs.min(buf.len() as u64 - n);
        }
        m.check_data_write(host + in_cluster, n)?;
        m.in_flight.fetch_add(1, Ordering::AcqRel);
        let in_flight = m.in_flight.clone();
        drop(m);
        self.f().debug_event(DebugEvent::WriteAio);
        let r = self
            .f()
            .write_at(&buf[..n as usize], host + in_cluster, false);
        in_flight.fetch_sub(1, Ordering::AcqRel);
        r.map(|()| n as usize)
    }

    fn write_allocating(
        &self,
        mut m: std::sync::MutexGuard<'_, Meta>,
        buf: &[u8],
        offset: u64,
    ) -> BlockResult<usize> {
        let cs = self.cluster_size();
        let first = offset / cs;
        let end = offset + buf.len() as u64;
        let (l1_first, _) = m.geom.split(offset);
        let mut olds = Vec::new();
        while olds.len() < MAX_ALLOC_RUN as usize {
            let c = first + olds.len() as u64;
            if c * cs >= end {
                break;
            }
            if !olds.is_empty() {
                let (l1i, _) = m.geom.split(c * cs);
                if l1i != l1_first || m.busy.contains(&c) {
                    break;
                }
            }
            let e = m.lookup(self.f(), c * cs)?;
            if !olds.is_empty() && Self::in_place(&m, e, c * cs) {
                break;
            }
            olds.push(e);
        }
        let k = olds.len() as u64;
        m.writable_l2(self.f(), offset)?;
        let untouched = m.untouched_from;
        let host = m.alloc_clusters(self.f(), k)?;
        // New clusters that read as zeroes, replacing clusters that read as zeroes, need only the data.
        let fresh = host >= untouched && olds.iter().all(|e| self.reads_zero(e));
        for i in 0..k {
            m.busy.insert(first + i);
        }
        drop(m);
        let r = match fresh {
            true => self.fill_fresh_clusters(buf, offset, host, k),
            false => self.fill_new_clusters(buf, offset, host, &olds),
        };
        let mut m = match self.lock() {
            Ok(m) => m,
            Err(e) => {
                // Writers waiting for these clusters wake to the same error.
                self.released.notify_all();
                return Err(e);
            }
        };
        // How many new clusters the L2 table now references.
        let mut linked = 0u64;
        let r = r.and_then(|n| {
            for (i, old) in olds.iter().enumerate() {
                let new = L2Entry {
                    word: (host + i as u64 * cs) | COPIED,
                    bitmap: if m.geom.extended { ALL_ALLOC_BITS } else { 0 },
                };
                m.set_entry(self.f(), (first + i as u64) * cs, new)?;
                m.free_entry(*old);
                linked += 1;
            }
            Ok(n)
        });
        if r.is_err() && linked < k {
            // New clusters nothing references: their refcount drops after the next flush.
            m.pending_frees
                .push((host + linked * cs, (k - linked) * cs));
        }
        for i in 0..k {
            m.busy.remove(&(first + i));
        }
        drop(m);
        self.released.notify_all();
        r
    }

    /// True if every (sub)cluster of the entry reads as zeroes.
    fn reads_zero(&self, e: &L2Entry) -> bool {
        let geom = self.geom();
        let subs = (geom.cluster_size() / geom.sub_size()) as u32;
        (0..subs).all(|s| match e.mapping(&geom, s) {
            Ok(Mapping::Zero) => true,
            Ok(Mapping::Unallocated) => self.backing.is_none(),
            _ => false,
        })
    }

    /// Writes just the data into never-written clusters (the rest reads as zeroes).
    fn fill_fresh_clusters(
        &self,
        buf: &[u8],
        offset: u64,
        host: u64,
        k: u64,
    ) -> BlockResult<usize> {
        let cs = self.cluster_size();
        let start = offset % cs;
        let n = (k * cs - start).min(buf.len() as u64) as usize;
        self.f().debug_event(DebugEvent::WriteAio);
        self.f().write_at(&buf[..n], host + start, false)?;
        Ok(n)
    }

    /// Writes the new clusters: partial first and last ones merged with their
    /// old contents, whole ones straight from `buf`. Returns bytes of `buf` used.
    fn fill_new_clusters(
        &self,
        buf: &[u8],
        offset: u64,
        host: u64,
        olds: &[L2Entry],
    ) -> BlockResult<usize> {
        let cs = self.cluster_size();
        let k = olds.len() as u64;
        let start = offset % cs;
        let n = (k * cs - start).min(buf.len() as u64);
        let base = offset - start;
        let end = start + n;
        let mut whole_from = 0u64;
        let mut whole_to = k;
        self.f().debug_event(DebugEvent::WriteAio);
        if start != 0 || (k == 1 && n < cs) {
            self.f().debug_event(DebugEvent::CowRead);
            let mut c = self.read_cluster(olds[0], base)?;
            let len = (cs - start).min(n) as usize;
            c[start as usize..start as usize + len].copy_from_slice(&buf[..len]);
            self.f().write_at(&c, host, false)?;
            whole_from = 1;
        }
        if k > whole_from && !end.is_multiple_of(cs) {
            let last = k - 1;
            self.f().debug_event(DebugEvent::CowRead);
            let mut c = self.read_cluster(olds[last as usize], base + last * cs)?;
            let len = (end - last * cs) as usize;
            let from = (last * cs - start) as usize;
            c[..len].copy_from_slice(&buf[from..from + len]);
            self.f().write_at(&c, host + last * cs, false)?;
            whole_to = last;
        }
        if whole_to > whole_from {
            let from = (whole_from * cs - start) as usize;
            let to = (whole_to * cs - start) as usize;
            self.f()
                .write_at(&buf[from..to], host + whole_from * cs, false)?;
        }
        Ok(n as usize)
    }

    pub(super) fn flush_all(&self) -> BlockResult<()> {
        let (wrote, freed) = {
            let mut m = self.lock()?;
            let wrote = m.flush(self.f())?;
            (wrote, std::mem::take(&mut m.freed))
        };
        if !wrote {
            self.f().flush()?;
        }
        if self.discard {
            for off in freed {
                let _ = self.f().discard(off, self.cluster_size());
            }
        }
        Ok(())
    }

    /// The entry that makes a whole cluster read as zeroes, if the format has one.
    fn zero_entry(&self) -> Option<L2Entry> {
        match (self.header.version, self.header.extended_l2()) {
            (2, _) => None,
            (_, true) => Some(L2Entry {
                word: 0,
                bitmap: ALL_ZERO_BITS,
            }),
            (_, false) => Some(L2Entry {
                word: ZERO,
                bitmap: 0,
            }),
        }
    }

    pub(super) fn zero_range(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        let (head, body, tail) = self.split_aligned(offset, len);
        let unallocated_is_zero = self.backing.is_none();
        let entry = match (self.zero_entry(), unallocated_is_zero) {
            (Some(z), _) => Some(z),
            (None, true) => Some(L2Entry::default()),
            (None, false) => None,
        };
        let slow = head.1 > 0 || tail.1 > 0 || (entry.is_none() && body.1 > 0);
        if flags.fast && slow {
            return Err(BlockError::new(
                BlockErrorKind::NotSupported,
                "qcow2: zeroing this range needs data writes",
            ));
        }
        for (o, l) in [head, tail] {
            self.write_zero_bytes(o, l)?;
        }
        match entry {
            Some(e) => self.set_clusters(body.0, body.1, e, true),
            None => self.write_zero_bytes(body.0, body.1),
        }
    }

    pub(super) fn discard_range(&self, offset: u64, len: u64) -> BlockResult<()> {
        let (_, body, _) = self.split_aligned(offset, len);
        // With a backing file, deallocating would expose old data: zero instead where possible.
        let entry = match (&self.backing, self.zero_entry()) {
            (Some(_), Some(z)) => z,
            _ => L2Entry::default(),
        };
        self.set_clusters(body.0, body.1, entry, false)
    }

    /// (head, whole clusters, tail) as (offset, len); the last cluster of the
    /// disk counts as whole when the range reaches the end.
    fn split_aligned(&self, offset: u64, len: u64) -> ((u64, u64), (u64, u64), (u64, u64)) {
        let cs = self.cluster_size();
        let end = offset + len;
        let a = offset.next_multiple_of(cs);
        let b = match end >= self.header.size {
            true => end.next_multiple_of(cs),
            false => end / cs * cs,
        };
        if a >= b {
            return ((offset, len), (a, 0), (end, 0));
        }
        ((offset, a - offset), (a, b - a), (b, end.saturating_sub(b)))
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> BlockResult<()> {
        let chunk = (1u64 << 20).min(len) as usize;
        let zeroes = vec![0u8; chunk];
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(chunk as u64) as usize;
            self.write(&zeroes[..n], offset + pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Points whole clusters at `entry` (zero or unallocated), freeing what they held.
    fn set_clusters(
        &self,
        offset: u64,
        len: u64,
        entry: L2Entry,
        zeroing: bool,
    ) -> BlockResult<()> {
        let cs = self.cluster_size();
        let mut m = self.lock()?;
        for c in offset / cs..(offset + len).div_ceil(cs) {
            while m.busy.contains(&c) {
                m = self.wait_released(m)?;
            }
            let old = m.lookup(self.f(), c * cs)?;
            let already_zero = zeroing && old == L2Entry::default() && self.backing.is_none();
            if old == entry || already_zero {
                continue;
            }
            m.set_entry(self.f(), c * cs, entry)?;
            m.free_entry(old);
        }
        Ok(())
    }

    pub(super) fn status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let (kind, n) = {
            let mut m = self.lock()?;
            self.classify_run(&mut m, offset, len)?
        };
        let here = |allocated, zero| Extent {
            len: n,
            allocated,
            zero,
            depth: 1,
        };
        match kind {
            Kind::Data => Ok(here(true, false)),
            Kind::Zero => Ok(here(false, true)),
            Kind::Below => self.status_below(offset, n),
        }
    }

    fn status_below(&self, offset: u64, n: u64) -> BlockResult<Extent> {
        let nowhere = Extent {
            len: n,
            allocated: false,
            zero: true,
            depth: 0,
        };
        let Some(b) = &self.backing else {
            return Ok(nowhere);
        };
        let avail = b.size().saturating_sub(offset).min(n);
        if avail == 0 {
            return Ok(nowhere);
        }
        let e = b.driver().block_status(offset, avail)?;
        Ok(Extent {
            depth: if e.depth == 0 { 0 } else { e.depth + 1 },
            ..e
        })
    }

    /// The kind of the (sub)cluster at `offset` and how far it continues, up
    /// to `len` and the end of the L2 table (bounding work under the lock).
    fn classify_run(&self, m: &mut Meta, offset: u64, len: u64) -> BlockResult<(Kind, u64)> {
        let geom = m.geom;
        let (cs, sub) = (geom.cluster_size(), geom.sub_size());
        let table_span = geom.l2_entries() * cs;
        let end = (offset + len).min((offset / table_span + 1) * table_span);
        let mut pos = offset;
        let mut kind = None;
        while pos < end {
            let e = m.lookup(self.f(), pos)?;
            let k = match e.mapping(&geom, ((pos & (cs - 1)) / sub) as u32)? {
                Mapping::Unallocated => Kind::Below,
                Mapping::Zero => Kind::Zero,
                Mapping::Data { .. } | Mapping::Compressed { .. } => Kind::Data,
            };
            match kind {
                None => kind = Some(k),
                Some(prev) if prev != k => break,
                Some(_) => {}
            }
            pos = ((pos / sub + 1) * sub).min(end);
        }
        Ok((kind.unwrap_or(Kind::Below), pos - offset))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Data,
    Zero,
    Below,
}

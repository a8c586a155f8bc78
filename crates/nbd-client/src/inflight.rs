//! The requests in flight on a connection, by cookie, and what their replies
//! have brought so far.

use std::collections::HashMap;
use std::sync::Arc;

use block::{BlockError, BlockErrorKind, BlockResult, IoBuf};
use nbd::request::RequestHeader;
use tokio::sync::oneshot;

/// What a request's caller gets back.
#[derive(Debug)]
pub(crate) struct Answer {
    /// A READ's buffer, filled.
    pub read: Option<IoBuf>,
    pub result: BlockResult<()>,
    /// A BLOCK_STATUS's first descriptor: length and flags.
    pub status: Option<(u64, u32)>,
}

impl Answer {
    pub fn failed(read: Option<IoBuf>, error: BlockError) -> Self {
        Self {
            read,
            result: Err(error),
            status: None,
        }
    }
}

/// The error of every request the connection could not carry.
pub(crate) fn lost(detail: &str) -> BlockError {
    BlockError::new(BlockErrorKind::Io, format!("NBD connection lost: {detail}"))
}

/// One request, from registration until its last reply chunk.
#[derive(Debug)]
pub(crate) struct Entry {
    pub header: RequestHeader,
    /// A WRITE's data, kept until the reply so it can be sent again after a reconnect.
    pub payload: Option<Arc<IoBuf>>,
    /// A READ's destination.
    pub read: Option<IoBuf>,
    /// Bytes of a READ that data and hole chunks have filled.
    pub covered: u64,
    /// The first error chunk's error.
    pub error: Option<BlockError>,
    pub status: Option<(u64, u32)>,
    /// The connection generation it was last written on (0: never).
    pub sent_gen: u64,
    pub done: oneshot::Sender<Answer>,
}

impl Entry {
    /// Forgets what replies brought on a connection that is gone, for a resend.
    pub fn reset(&mut self) {
        self.covered = 0;
        self.error = None;
        self.status = None;
    }

    pub fn finish(self, result: BlockResult<()>) {
        let answer = Answer {
            read: self.read,
            result,
            status: self.status,
        };
        // The caller may have gone away: then nobody wants the answer.
        let _ = self.done.send(answer);
    }

    pub fn fail(self, error: BlockError) {
        self.finish(Err(error));
    }
}

/// Where the connection stands, as requests see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinkState {
    Up,
    /// Lost, inside `reconnect-delay`: requests wait to be resent.
    Waiting,
    /// Lost past `reconnect-delay` (or without one): requests fail at once.
    Failing,
    /// The node is gone.
    Closed,
}

#[derive(Debug)]
pub(crate) struct Table {
    pub entries: HashMap<u64, Entry>,
    next_cookie: u64,
    pub state: LinkState,
}

impl Table {
    pub fn new() -> Self {
        Self {
            entries: HashMap::new(),
            next_cookie: 1,
            state: LinkState::Up,
        }
    }

    pub fn next_cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        c
    }

    pub fn fail_all(&mut self, detail: &str) {
        for (_, e) in self.entries.drain() {
            e.fail(lost(detail));
        }
    }
}

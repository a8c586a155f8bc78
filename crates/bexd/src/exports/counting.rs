//! Counts a FUSE or vhost-user-blk request in its export's and its node's
//! statistics, as the NBD server counts its requests (`block::stats`: lock-free
//! sharded counters; counting takes two reference-count increments and
//! allocates nothing).

use std::sync::Arc;
use std::time::Instant;

use block::{BlockError, BlockNode, IoKind, IoStats, Outcome, Started};

/// A request being counted, from when it is taken until it is answered.
/// Dropped before [`Counted::end`] (a request with no counters, or one that
/// never finished), it only leaves the in-flight counts.
pub struct Counted {
    export: Arc<IoStats>,
    node: Arc<BlockNode>,
    started: Started,
    ended: bool,
}

impl Counted {
    pub fn begin(export: &Arc<IoStats>, node: &Arc<BlockNode>) -> Self {
        export.begin();
        node.stats().begin();
        Self {
            export: export.clone(),
            node: node.clone(),
            started: Started::now(),
            ended: false,
        }
    }

    /// The request of `kind` over `range` (offset, bytes) ended with `outcome`.
    pub fn end(mut self, kind: IoKind, range: (u64, u64), outcome: Outcome) {
        self.ended = true;
        let now = Instant::now();
        self.export.end(self.started, now, kind, range, outcome);
        self.node
            .stats()
            .end(self.started, now, kind, range, outcome);
    }

    /// Ends the request with the block layer's result.
    pub fn end_with<T>(self, kind: IoKind, range: (u64, u64), r: &Result<T, BlockError>) {
        self.end(kind, range, outcome(r));
    }

    /// A request refused before it reached the node, with `errno`.
    pub fn refused(
        export: &Arc<IoStats>,
        node: &Arc<BlockNode>,
        kind: IoKind,
        range: (u64, u64),
        errno: i32,
    ) {
        Self::begin(export, node).end(kind, range, Outcome::Invalid(errno));
    }
}

/// How a block-layer call ended, for the counters.
pub fn outcome<T>(r: &Result<T, BlockError>) -> Outcome {
    match r {
        Ok(_) => Outcome::Done,
        Err(e) => Outcome::Failed(e.errno()),
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if !self.ended {
            self.export.end_uncounted();
            self.node.stats().end_uncounted();
        }
    }
}

//! Status flags of BLOCK_STATUS descriptors, per metadata context, so that
//! the daemon says what it knows (allocated, reads as zeroes, dirty) and the
//! bit layout stays the protocol's.

use crate::consts::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};

/// `base:allocation` flags: HOLE for a range not allocated, ZERO for one
/// that reads as zeroes (both for an unallocated range of zeroes).
pub fn allocation_status(allocated: bool, zero: bool) -> u32 {
    let hole = if allocated { 0 } else { STATE_HOLE };
    hole | if zero { STATE_ZERO } else { 0 }
}

/// `qemu:dirty-bitmap:NAME` flags: DIRTY for a range written since the
/// bitmap was cleared.
pub fn dirty_status(dirty: bool) -> u32 {
    if dirty {
        STATE_DIRTY
    } else {
        0
    }
}

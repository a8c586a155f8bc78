//! blkdebug's `align`, `max-transfer`, `opt-write-zero`, `max-write-zero`,
//! `opt-discard` and `max-discard`: limits a test sets on the node so that
//! the layers above must cope with them, checked as QEMU checks them.
//!
//! In QEMU the generic block layer pads, splits and aligns requests to a
//! node's limits before the driver sees them. bexd's nodes do not, so the
//! blkdebug driver does that work itself (see `mod.rs`); this module holds
//! the numbers and the arithmetic.

/// The limits; 0 means "not set" (the child's own limits apply).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub align: u64,
    pub max_transfer: u64,
    pub opt_write_zero: u64,
    pub max_write_zero: u64,
    pub opt_discard: u64,
    pub max_discard: u64,
}

const INT_MAX: u64 = i32::MAX as u64;

impl Limits {
    /// QEMU's checks, with its messages. `child_align` is the child's
    /// request alignment, which `max-transfer` and the others must respect too.
    pub fn validate(&self, child_align: u64) -> Result<(), String> {
        let refuse = |name: &str, v: u64| Err(format!("Cannot meet constraints with {name} {v}"));
        if self.align != 0 && (self.align >= INT_MAX || !self.align.is_power_of_two()) {
            return refuse("align", self.align);
        }
        let align = self.align.max(child_align).max(1);
        let bad =
            |v: u64, multiple_of: u64| v != 0 && (v >= INT_MAX || !v.is_multiple_of(multiple_of));
        if bad(self.max_transfer, align) {
            return refuse("max-transfer", self.max_transfer);
        }
        if bad(self.opt_write_zero, align) {
            return refuse("opt-write-zero", self.opt_write_zero);
        }
        if bad(self.max_write_zero, self.opt_write_zero.max(align)) {
            return refuse("max-write-zero", self.max_write_zero);
        }
        if bad(self.opt_discard, align) {
            return refuse("opt-discard", self.opt_discard);
        }
        if bad(self.max_discard, self.opt_discard.max(align)) {
            return refuse("max-discard", self.max_discard);
        }
        Ok(())
    }
}

/// `[offset, offset + len)` widened to multiples of `align`, and clipped at `size`.
pub fn widen(offset: u64, len: u64, align: u64, size: u64) -> (u64, u64) {
    let start = offset - offset % align;
    let end = (offset + len).div_ceil(align) * align;
    (start, end.min(size) - start)
}

/// Cuts `[offset, offset + len)` into pieces for a zeroing or discarding
/// request: none longer than `max` (0: no limit), and after a first piece
/// that ends on an `opt` boundary, each starting on one, as QEMU's block
/// layer hands them to a driver. Returns (offset, len, aligned) per piece,
/// where `aligned` says the piece both starts and ends on `opt` boundaries
/// (or runs to the request's end from one).
pub fn pieces(offset: u64, len: u64, opt: u64, max: u64) -> Vec<(u64, u64, bool)> {
    let opt = opt.max(1);
    let max = match max {
        0 => u64::MAX,
        m => (m / opt).max(1) * opt,
    };
    let mut out = Vec::new();
    let (mut at, end) = (offset, offset + len);
    while at < end {
        let head = at % opt;
        let n = match head {
            0 if end - at >= opt => (end - at).min(max) / opt * opt,
            0 => end - at,
            h => (opt - h).min(end - at),
        };
        let aligned = head == 0 && n % opt == 0;
        out.push((at, n, aligned));
        at += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(align: u64) -> Limits {
        Limits {
            align,
            ..Limits::default()
        }
    }

    #[test]
    fn test_qemu_refuses_what_it_cannot_meet() {
        assert_eq!(
            limits(3).validate(1).unwrap_err(),
            "Cannot meet constraints with align 3"
        );
        assert_eq!(
            limits(1 << 31).validate(1).unwrap_err(),
            "Cannot meet constraints with align 2147483648"
        );
        assert!(limits(1 << 30).validate(1).is_ok());
        assert!(limits(0).validate(1).is_ok());
        let l = Limits {
            max_transfer: 512,
            ..limits(4096)
        };
        assert_eq!(
            l.validate(1).unwrap_err(),
            "Cannot meet constraints with max-transfer 512"
        );
        // The child's alignment counts too.
        let l = Limits {
            max_transfer: 1000,
            ..limits(0)
        };
        assert!(l.validate(1).is_ok());
        assert!(l.validate(512).is_err());
        let l = Limits {
            opt_write_zero: 4096,
            max_write_zero: 6144,
            ..limits(0)
        };
        assert_eq!(
            l.validate(1).unwrap_err(),
            "Cannot meet constraints with max-write-zero 6144"
        );
        let l = Limits {
            opt_discard: 512,
            ..limits(4096)
        };
        assert_eq!(
            l.validate(1).unwrap_err(),
            "Cannot meet constraints with opt-discard 512"
        );
        let l = Limits {
            opt_discard: 4096,
            max_discard: 6000,
            ..limits(0)
        };
        assert_eq!(
            l.validate(1).unwrap_err(),
            "Cannot meet constraints with max-discard 6000"
        );
    }

    #[test]
    fn test_widen_and_pieces() {
        assert_eq!(widen(100, 1000, 4096, 1 << 20), (0, 4096));
        assert_eq!(widen(4000, 200, 4096, 1 << 20), (0, 8192));
        assert_eq!(widen(4000, 200, 4096, 6000), (0, 6000));
        assert_eq!(
            pieces(10, 20000, 8192, 0),
            vec![(10, 8182, false), (8192, 8192, true), (16384, 3626, false)]
        );
        assert_eq!(
            pieces(0, 40960, 4096, 16384),
            vec![(0, 16384, true), (16384, 16384, true), (32768, 8192, true)]
        );
        assert_eq!(pieces(0, 100, 1, 0), vec![(0, 100, true)]);
    }
}

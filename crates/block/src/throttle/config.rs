//! The limits of a throttle group and QEMU's rules for them
//! (`throttle_is_valid`, `throttle_limits_to_config`, the `x-*` properties).

/// The largest rate or burst QEMU accepts (`THROTTLE_VALUE_MAX`).
pub const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

/// The six buckets, in QEMU's order (`BucketType`), which is also the order
/// the validation walks them in, so the first error reported is QEMU's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketKind {
    BpsTotal,
    BpsRead,
    BpsWrite,
    OpsTotal,
    OpsRead,
    OpsWrite,
}

impl BucketKind {
    pub const ALL: [BucketKind; 6] = [
        Self::BpsTotal,
        Self::BpsRead,
        Self::BpsWrite,
        Self::OpsTotal,
        Self::OpsRead,
        Self::OpsWrite,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Counts bytes (else operations).
    pub fn counts_bytes(self) -> bool {
        matches!(self, Self::BpsTotal | Self::BpsRead | Self::BpsWrite)
    }
}

/// One bucket's limits: `avg` units per second, bursts of up to `max` per
/// second lasting `burst_length` seconds (1 when no burst is configured).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketLimit {
    pub avg: u64,
    pub max: u64,
    pub burst_length: u64,
}

impl Default for BucketLimit {
    fn default() -> Self {
        Self {
            avg: 0,
            max: 0,
            burst_length: 1,
        }
    }
}

/// Which value of a bucket a member sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    Avg,
    Max,
    BurstLength,
}

/// A member of QEMU's `ThrottleLimits` (and, with `x-` in front, a
/// throttle-group property).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitMember {
    Bucket(BucketKind, Setting),
    IopsSize,
}

impl LimitMember {
    /// Every member with its QAPI name, in `ThrottleLimits`' order.
    pub const ALL: [(&'static str, LimitMember); 19] = {
        use BucketKind::*;
        use LimitMember::{Bucket as B, IopsSize};
        use Setting::*;
        [
            ("iops-total", B(OpsTotal, Avg)),
            ("iops-total-max", B(OpsTotal, Max)),
            ("iops-total-max-length", B(OpsTotal, BurstLength)),
            ("iops-read", B(OpsRead, Avg)),
            ("iops-read-max", B(OpsRead, Max)),
            ("iops-read-max-length", B(OpsRead, BurstLength)),
            ("iops-write", B(OpsWrite, Avg)),
            ("iops-write-max", B(OpsWrite, Max)),
            ("iops-write-max-length", B(OpsWrite, BurstLength)),
            ("bps-total", B(BpsTotal, Avg)),
            ("bps-total-max", B(BpsTotal, Max)),
            ("bps-total-max-length", B(BpsTotal, BurstLength)),
            ("bps-read", B(BpsRead, Avg)),
            ("bps-read-max", B(BpsRead, Max)),
            ("bps-read-max-length", B(BpsRead, BurstLength)),
            ("bps-write", B(BpsWrite, Avg)),
            ("bps-write-max", B(BpsWrite, Max)),
            ("bps-write-max-length", B(BpsWrite, BurstLength)),
            ("iops-size", IopsSize),
        ]
    };
}

/// Why a configuration or a value was refused; each prints QEMU's text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ThrottleConfigError {
    #[error("bps/iops/max total values and read/write values cannot be used at the same time")]
    TotalWithReadWrite,
    #[error("iops size requires an iops value to be set")]
    IopsSizeWithoutIops,
    #[error("bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]")]
    OutOfRange,
    #[error("the burst length cannot be 0")]
    ZeroBurstLength,
    #[error("burst length set without burst rate")]
    BurstLengthWithoutRate,
    #[error("burst length too high for this burst rate")]
    BurstLengthTooHigh,
    #[error("bps_max/iops_max require corresponding bps/iops values")]
    MaxWithoutAvg,
    #[error("bps_max/iops_max cannot be lower than bps/iops")]
    MaxBelowAvg,
    /// A `ThrottleLimits` burst length past 32 bits.
    #[error("{0} value must be in the range [0, {max}]", max = u32::MAX)]
    LimitsBurstLengthRange(&'static str),
    /// An `x-*-max-length` property past 32 bits (QEMU's text lacks a space).
    #[error("x-{0} value must be in therange [0, {max}]", max = u32::MAX)]
    PropertyBurstLengthRange(&'static str),
    #[error("Property values cannot be negative")]
    NegativeProperty,
}

/// A group's limits: six buckets and the size that counts as one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleConfig {
    pub buckets: [BucketLimit; 6],
    /// Requests larger than this count as `size / op_size` operations; 0: every request is one.
    pub op_size: u64,
}

impl ThrottleConfig {
    pub fn bucket(&self, kind: BucketKind) -> &BucketLimit {
        &self.buckets[kind.index()]
    }

    fn bucket_mut(&mut self, kind: BucketKind) -> &mut BucketLimit {
        &mut self.buckets[kind.index()]
    }

    /// Any limit is set (QEMU's `throttle_enabled`).
    pub fn enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg > 0)
    }

    /// The member's value as `qom-get` shows it.
    pub fn get(&self, member: LimitMember) -> u64 {
        match member {
            LimitMember::IopsSize => self.op_size,
            LimitMember::Bucket(kind, setting) => {
                let b = self.bucket(kind);
                match setting {
                    Setting::Avg => b.avg,
                    Setting::Max => b.max,
                    Setting::BurstLength => b.burst_length,
                }
            }
        }
    }

    fn store(&mut self, member: LimitMember, value: u64) {
        match member {
            LimitMember::IopsSize => self.op_size = value,
            LimitMember::Bucket(kind, setting) => {
                let b = self.bucket_mut(kind);
                match setting {
                    Setting::Avg => b.avg = value,
                    Setting::Max => b.max = value,
                    Setting::BurstLength => b.burst_length = value,
                }
            }
        }
    }

    /// Sets a `ThrottleLimits` member as QEMU does: values are taken as
    /// unsigned 64-bit (so a negative rate fails validation as out of
    /// range, and a negative burst length as too long), and a burst length
    /// past 32 bits is refused here. The caller validates the whole afterwards.
    pub fn set_limit(
        &mut self,
        name: &'static str,
        member: LimitMember,
        value: i64,
    ) -> Result<(), ThrottleConfigError> {
        let value = match member {
            LimitMember::Bucket(_, Setting::BurstLength) => {
                if value > u32::MAX as i64 {
                    return Err(ThrottleConfigError::LimitsBurstLengthRange(name));
                }
                value as u64
            }
            _ => value as u64,
        };
        self.store(member, value);
        Ok(())
    }

    /// Sets an `x-*` property before the group is complete, as QEMU's
    /// property setter does (negative values and 33-bit burst lengths refused).
    pub fn set_property(
        &mut self,
        name: &'static str,
        member: LimitMember,
        value: i64,
    ) -> Result<(), ThrottleConfigError> {
        if value < 0 {
            return Err(ThrottleConfigError::NegativeProperty);
        }
        if matches!(member, LimitMember::Bucket(_, Setting::BurstLength)) && value > u32::MAX as i64
        {
            return Err(ThrottleConfigError::PropertyBurstLengthRange(name));
        }
        self.store(member, value as u64);
        Ok(())
    }

    /// QEMU's `throttle_is_valid`, check for check in its order.
    pub fn validate(&self) -> Result<(), ThrottleConfigError> {
        use BucketKind::*;
        let total_and_rw = |total: BucketKind, read, write, f: fn(&BucketLimit) -> u64| {
            f(self.bucket(total)) != 0 && (f(self.bucket(read)) != 0 || f(self.bucket(write)) != 0)
        };
        if total_and_rw(BpsTotal, BpsRead, BpsWrite, |b| b.avg)
            || total_and_rw(OpsTotal, OpsRead, OpsWrite, |b| b.avg)
            || total_and_rw(BpsTotal, BpsRead, BpsWrite, |b| b.max)
            || total_and_rw(OpsTotal, OpsRead, OpsWrite, |b| b.max)
        {
            return Err(ThrottleConfigError::TotalWithReadWrite);
        }
        if self.op_size != 0
            && [OpsTotal, OpsRead, OpsWrite]
                .iter()
                .all(|k| self.bucket(*k).avg == 0)
        {
            return Err(ThrottleConfigError::IopsSizeWithoutIops);
        }
        for b in &self.buckets {
            if b.avg > THROTTLE_VALUE_MAX || b.max > THROTTLE_VALUE_MAX {
                return Err(ThrottleConfigError::OutOfRange);
            }
            if b.burst_length == 0 {
                return Err(ThrottleConfigError::ZeroBurstLength);
            }
            if b.burst_length > 1 && b.max == 0 {
                return Err(ThrottleConfigError::BurstLengthWithoutRate);
            }
            if b.max != 0 && b.burst_length > THROTTLE_VALUE_MAX / b.max {
                return Err(ThrottleConfigError::BurstLengthTooHigh);
            }
            if b.max != 0 && b.avg == 0 {
                return Err(ThrottleConfigError::MaxWithoutAvg);
            }
            if b.max != 0 && b.max < b.avg {
                return Err(ThrottleConfigError::MaxBelowAvg);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&'static str, i64)]) -> Result<ThrottleConfig, ThrottleConfigError> {
        let mut c = ThrottleConfig::default();
        for (name, v) in pairs {
            let (_, m) = LimitMember::ALL.iter().find(|(n, _)| n == name).unwrap();
            c.set_limit(name, *m, *v)?;
        }
        c.validate().map(|()| c)
    }

    #[test]
    fn test_qemus_refusals_in_qemus_order() {
        use ThrottleConfigError::*;
        assert_eq!(
            with(&[("iops-total", 10), ("iops-read", 5)]),
            Err(TotalWithReadWrite)
        );
        assert_eq!(
            with(&[("bps-total-max", 10), ("bps-write-max", 5)]),
            Err(TotalWithReadWrite)
        );
        assert_eq!(with(&[("iops-size", 4096)]), Err(IopsSizeWithoutIops));
        assert_eq!(with(&[("iops-total", -1)]), Err(OutOfRange));
        assert_eq!(with(&[("iops-total-max-length", 0)]), Err(ZeroBurstLength));
        assert_eq!(
            with(&[("iops-total-max-length", 2)]),
            Err(BurstLengthWithoutRate)
        );
        assert_eq!(with(&[("iops-total-max", 10)]), Err(MaxWithoutAvg));
        assert_eq!(
            with(&[("iops-total", 10), ("iops-total-max", 5)]),
            Err(MaxBelowAvg)
        );
        assert_eq!(
            with(&[
                ("bps-total", 100),
                ("bps-total-max", 1_000_000_000_000),
                ("bps-total-max-length", 1_000_000)
            ]),
            Err(BurstLengthTooHigh)
        );
        assert_eq!(
            with(&[("iops-total-max-length", 5_000_000_000)]),
            Err(LimitsBurstLengthRange("iops-total-max-length"))
        );
        assert_eq!(
            LimitsBurstLengthRange("iops-total-max-length").to_string(),
            "iops-total-max-length value must be in the range [0, 4294967295]"
        );
        assert_eq!(
            with(&[
                ("iops-total", 5),
                ("iops-total-max", 7),
                ("iops-total-max-length", -5)
            ]),
            Err(BurstLengthTooHigh)
        );
        assert!(with(&[
            ("iops-total", 10),
            ("iops-total-max", 20),
            ("iops-total-max-length", 3)
        ])
        .is_ok());
    }

    #[test]
    fn test_properties_refuse_negatives_and_wide_burst_lengths() {
        let mut c = ThrottleConfig::default();
        let (name, m) = LimitMember::ALL[2];
        assert_eq!(
            c.set_property(name, m, -1),
            Err(ThrottleConfigError::NegativeProperty)
        );
        assert_eq!(
            c.set_property(name, m, 5_000_000_000)
                .unwrap_err()
                .to_string(),
            "x-iops-total-max-length value must be in therange [0, 4294967295]"
        );
    }
}

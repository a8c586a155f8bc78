//! The leaky buckets (QEMU's `ThrottleState`): each request adds its bytes
//! or its operations to the buckets of its direction, the buckets leak at
//! their average rate, and a request waits while a bucket is over its size.
//!
//! A bucket holds `avg / 10` units without a burst limit (QEMU lets short
//! bursts through so that not every other request waits), or `max *
//! burst_length` with one; with a burst longer than a second a second
//! bucket, leaking at `max`, caps the burst's own rate at `max` per second.
//! Time is passed in (nanoseconds from any origin), so the arithmetic is
//! tested with a fake clock.

use super::config::{BucketKind, BucketLimit, ThrottleConfig};
use super::group::Direction;

const NANOS_PER_SEC: f64 = 1e9;

#[derive(Clone, Copy, Debug, Default)]
struct Levels {
    level: f64,
    burst_level: f64,
}

/// A group's limits and how full its buckets are.
#[derive(Clone, Debug)]
pub struct ThrottleState {
    config: ThrottleConfig,
    levels: [Levels; 6],
    previous_leak_ns: u64,
}

impl ThrottleState {
    pub fn new(config: ThrottleConfig, now_ns: u64) -> Self {
        Self {
            config,
            levels: [Levels::default(); 6],
            previous_leak_ns: now_ns,
        }
    }

    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    /// New limits, with empty buckets (QEMU's `throttle_config`).
    pub fn reconfigure(&mut self, config: ThrottleConfig, now_ns: u64) {
        *self = Self::new(config, now_ns);
    }

    /// Nanoseconds a request in `direction` must wait from `now_ns` before it
    /// may go; 0: it may go now. Leaks the buckets up to `now_ns` first.
    pub fn wait_ns(&mut self, direction: Direction, now_ns: u64) -> u64 {
        self.leak(now_ns);
        direction
            .buckets()
            .iter()
            .map(|&k| bucket_wait_ns(self.config.bucket(k), &self.levels[k as usize]))
            .max()
            .unwrap_or(0)
    }

    /// Counts a request that goes now: its bytes in the byte buckets, its
    /// operations (`bytes / iops-size` when larger than `iops-size`) in the
    /// operation buckets.
    pub fn account(&mut self, direction: Direction, bytes: u64) {
        let op_size = self.config.op_size;
        let ops = match op_size != 0 && bytes > op_size {
            true => bytes as f64 / op_size as f64,
            false => 1.0,
        };
        for &kind in direction.buckets() {
            let units = match kind.counts_bytes() {
                true => bytes as f64,
                false => ops,
            };
            let long_burst = self.config.bucket(kind).burst_length > 1;
            let l = &mut self.levels[kind as usize];
            l.level += units;
            if long_burst {
                l.burst_level += units;
            }
        }
    }

    fn leak(&mut self, now_ns: u64) {
        let delta = now_ns.saturating_sub(self.previous_leak_ns);
        self.previous_leak_ns = self.previous_leak_ns.max(now_ns);
        if delta == 0 {
            return;
        }
        let secs = delta as f64 / NANOS_PER_SEC;
        for kind in BucketKind::ALL {
            let b = self.config.bucket(kind);
            let l = &mut self.levels[kind as usize];
            l.level = (l.level - b.avg as f64 * secs).max(0.0);
            if b.burst_length > 1 {
                l.burst_level = (l.burst_level - b.max as f64 * secs).max(0.0);
            }
        }
    }
}

/// QEMU's `throttle_compute_wait` for one bucket.
fn bucket_wait_ns(b: &BucketLimit, l: &Levels) -> u64 {
    if b.avg == 0 {
        return 0;
    }
    let (size, burst_size) = match b.max {
        0 => (b.avg as f64 / 10.0, 0.0),
        max => (max as f64 * b.burst_length as f64, max as f64 / 10.0),
    };
    let extra = l.level - size;
    if extra > 0.0 {
        return (extra * NANOS_PER_SEC / b.avg as f64) as u64;
    }
    if b.burst_length > 1 {
        let extra = l.burst_level - burst_size;
        if extra > 0.0 {
            return (extra * NANOS_PER_SEC / b.max as f64) as u64;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::config::LimitMember;

    const SEC: u64 = 1_000_000_000;

    fn config(pairs: &[(&'static str, i64)]) -> ThrottleConfig {
        let mut c = ThrottleConfig::default();
        for (name, v) in pairs {
            let (_, m) = LimitMember::ALL.iter().find(|(n, _)| n == name).unwrap();
            c.set_limit(name, *m, *v).unwrap();
        }
        c.validate().unwrap();
        c
    }

    /// Runs requests back to back on a fake clock: each goes as soon as the
    /// buckets let it. Returns when each one went.
    fn run(state: &mut ThrottleState, dir: Direction, bytes: u64, n: usize) -> Vec<u64> {
        let mut now = 0;
        let mut starts = Vec::with_capacity(n);
        for _ in 0..n {
            loop {
                match state.wait_ns(dir, now) {
                    0 => break,
                    w => now += w,
                }
            }
            state.account(dir, bytes);
            starts.push(now);
        }
        starts
    }

    #[test]
    fn test_average_rate_holds_after_the_small_initial_bucket() {
        let mut s = ThrottleState::new(config(&[("iops-total", 50)]), 0);
        let starts = run(&mut s, Direction::Read, 4096, 1001);
        // The bucket holds avg/10 = 5 operations, so 6 go at once; the
        // rest leak out at 50 per second.
        assert_eq!(starts[5], 0);
        assert!(starts[6] > 0);
        let secs = *starts.last().unwrap() as f64 / SEC as f64;
        assert!((secs - 995.0 / 50.0).abs() < 0.05, "{secs}");
    }

    #[test]
    fn test_burst_runs_at_max_for_its_length_then_falls_to_avg() {
        let mut s = ThrottleState::new(
            config(&[
                ("iops-total", 10),
                ("iops-total-max", 100),
                ("iops-total-max-length", 5),
            ]),
            0,
        );
        let starts = run(&mut s, Direction::Write, 512, 2000);
        let by = |t: u64| starts.iter().filter(|&&s| s <= t).count();
        // The burst: about max (100/s) while the 500-op bucket fills,
        // which at 100/s in and 10/s out takes about 5.5 s.
        assert!((by(SEC) as i64 - 111).abs() <= 2, "{}", by(SEC));
        let at_burst_end = by(5 * SEC);
        assert!((at_burst_end as i64 - 511).abs() <= 5, "{at_burst_end}");
        // Afterwards: avg, 10 per second.
        let later = by(60 * SEC) - by(20 * SEC);
        assert!((later as i64 - 400).abs() <= 2, "{later}");
    }

    #[test]
    fn test_iops_size_counts_a_large_request_as_several() {
        let mut s = ThrottleState::new(config(&[("iops-total", 100), ("iops-size", 4096)]), 0);
        let starts = run(&mut s, Direction::Read, 65536, 101);
        // 16 operations each: 100 requests take about 16 s.
        let secs = *starts.last().unwrap() as f64 / SEC as f64;
        assert!((secs - 16.0).abs() < 0.2, "{secs}");
    }

    #[test]
    fn test_bps_read_leaves_writes_alone() {
        let mut s = ThrottleState::new(config(&[("bps-read", 1 << 20)]), 0);
        let starts = run(&mut s, Direction::Write, 1 << 20, 100);
        assert_eq!(*starts.last().unwrap(), 0);
        let starts = run(&mut s, Direction::Read, 1 << 20, 11);
        let secs = *starts.last().unwrap() as f64 / SEC as f64;
        assert!((secs - 9.9).abs() < 0.2, "{secs}");
    }

    #[test]
    fn test_reconfigure_empties_the_buckets() {
        let mut s = ThrottleState::new(config(&[("iops-total", 1)]), 0);
        s.account(Direction::Read, 1);
        s.account(Direction::Read, 1);
        assert!(s.wait_ns(Direction::Read, 0) > 0);
        s.reconfigure(config(&[("iops-total", 1)]), 0);
        assert_eq!(s.wait_ns(Direction::Read, 0), 0);
        s.reconfigure(ThrottleConfig::default(), 0);
        run(&mut s, Direction::Read, 1, 1000);
        assert_eq!(s.wait_ns(Direction::Read, 0), 0);
    }
}

//! A job's `speed`, as QEMU's ratelimit.h measures it: time is cut into
//! 100 ms slices, each may carry a tenth of the speed, and a job that has
//! dispatched more waits until the slices it used up are over. Plain
//! arithmetic over a time the caller passes.

use std::time::{Duration, Instant};

const SLICE: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, Default)]
pub struct RateLimit {
    /// Bytes per second; 0 is no limit.
    speed: u64,
    slice_start: Option<Instant>,
    dispatched: u64,
}

impl RateLimit {
    pub fn speed(&self) -> u64 {
        self.speed
    }

    pub fn set_speed(&mut self, speed: u64) {
        self.speed = speed;
    }

    fn quota(&self) -> u64 {
        (self.speed / 10).max(1)
    }

    /// How long to wait before dispatching more at `now`.
    pub fn delay(&mut self, now: Instant) -> Duration {
        if self.speed == 0 {
            return Duration::ZERO;
        }
        let start = match self.slice_start {
            Some(s) if now < s + SLICE => s,
            _ => {
                self.slice_start = Some(now);
                self.dispatched = 0;
                now
            }
        };
        if self.dispatched < self.quota() {
            return Duration::ZERO;
        }
        let slices = self.dispatched.div_ceil(self.quota()) as u32;
        (start + SLICE * slices).saturating_duration_since(now)
    }

    /// `bytes` were copied.
    pub fn dispatch(&mut self, bytes: u64) {
        self.dispatched += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_no_limit_never_waits() {
        let mut r = RateLimit::default();
        r.dispatch(1 << 40);
        assert_eq!(r.delay(Instant::now()), Duration::ZERO);
    }

    #[test]
    fn test_waits_for_the_slices_used() {
        let mut r = RateLimit::default();
        r.set_speed(10 << 20); // 1 MiB per slice
        let t0 = Instant::now();
        assert_eq!(r.delay(t0), Duration::ZERO);
        r.dispatch(1 << 20);
        assert_eq!(r.delay(t0), SLICE);
        r.dispatch(2 << 20); // three slices' worth in all
        assert_eq!(
            r.delay(t0 + Duration::from_millis(50)),
            Duration::from_millis(250)
        );
        // A slice that is over starts afresh.
        assert_eq!(r.delay(t0 + Duration::from_millis(400)), Duration::ZERO);
    }
}

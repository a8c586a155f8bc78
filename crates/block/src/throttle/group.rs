//! A throttle group: the buckets its member nodes share, and the requests
//! waiting for them (QEMU's block/throttle-groups.c).
//!
//! A request that may go is counted and goes at once. One that must wait
//! (or arrives while others of its direction wait, so it cannot overtake
//! them) joins its member's queue, and one timer task per direction wakes
//! the queued requests as the buckets leak, taking members in turn
//! (round-robin, as QEMU's tokens do), so a busy member cannot starve the
//! others. Waiting is a tokio timer and a oneshot channel: no thread ever
//! blocks. A group without limits is one relaxed atomic load per request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::config::{BucketKind, ThrottleConfig};
use super::state::ThrottleState;

/// Reads or writes: each has its own buckets, queues and timer. Writes
/// include write-zeroes and discards, as in QEMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

impl Direction {
    fn index(self) -> usize {
        self as usize
    }

    /// The buckets a request in this direction fills and waits for.
    pub fn buckets(self) -> &'static [BucketKind; 4] {
        use BucketKind::*;
        match self {
            Self::Read => &[BpsTotal, OpsTotal, BpsRead, OpsRead],
            Self::Write => &[BpsTotal, OpsTotal, BpsWrite, OpsWrite],
        }
    }
}

/// A queued request: its size, and how to wake it.
#[derive(Debug)]
struct Waiter {
    bytes: u64,
    wake: oneshot::Sender<()>,
}

#[derive(Debug)]
struct MemberQueues {
    id: u64,
    queues: [VecDeque<Waiter>; 2],
}

#[derive(Debug)]
struct Shared {
    state: ThrottleState,
    /// Members in joining order; the round-robin walks this list.
    members: Vec<MemberQueues>,
    next_member_id: u64,
    /// Per direction: the member served last, where the next turn starts after.
    last_served: [u64; 2],
    /// Per direction: a timer task is running (it serves every queued request).
    timer_running: [bool; 2],
}

impl Shared {
    fn has_waiters(&self, dir: Direction) -> bool {
        self.members
            .iter()
            .any(|m| !m.queues[dir.index()].is_empty())
    }

    /// The member whose turn it is: the first after the one served last
    /// that has a request waiting.
    fn next_turn(&self, dir: Direction) -> Option<usize> {
        let n = self.members.len();
        let after = self
            .members
            .iter()
            .position(|m| m.id == self.last_served[dir.index()])
            .map_or(0, |i| i + 1);
        (0..n)
            .map(|k| (after + k) % n)
            .find(|&i| !self.members[i].queues[dir.index()].is_empty())
    }
}

/// A throttle group (`--object throttle-group`). Its name is fixed; its
/// limits change with [`Self::set_config`] (`qom-set ... limits`).
#[derive(Debug)]
pub struct ThrottleGroup {
    name: String,
    /// Any limit set: without one, requests skip the lock entirely.
    enabled: AtomicBool,
    /// Set at shutdown: limits no longer apply, so in-flight requests
    /// finish at once. (qemu-storage-daemon keeps throttling them: 20 reads
    /// queued at `iops-total=1` held its exit for 15 s.)
    draining: AtomicBool,
    shared: Mutex<Shared>,
    /// Wakes a direction's timer task when the limits change, so queued
    /// requests are looked at again under the new ones.
    reconfigured: [Notify; 2],
    origin: Instant,
}

impl ThrottleGroup {
    /// A group with limits `config`, which the caller has validated.
    pub fn new(name: String, config: ThrottleConfig) -> Arc<Self> {
        Arc::new(Self {
            name,
            enabled: AtomicBool::new(config.enabled()),
            draining: AtomicBool::new(false),
            shared: Mutex::new(Shared {
                state: ThrottleState::new(config, 0),
                members: Vec::new(),
                next_member_id: 0,
                last_served: [u64::MAX; 2],
                timer_running: [false; 2],
            }),
            reconfigured: [Notify::new(), Notify::new()],
            origin: Instant::now(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queues and buckets are left consistent by every update (each is
    /// done under the lock with nothing that can panic half-way), so a
    /// poisoned lock is used as it is.
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    pub fn config(&self) -> ThrottleConfig {
        *self.lock().state.config()
    }

    /// New limits (validated by the caller), with empty buckets, as QEMU's
    /// `qom-set` of `limits` does; queued requests are looked at again.
    pub fn set_config(&self, config: ThrottleConfig) {
        let mut shared = self.lock();
        let now = self.now_ns();
        shared.state.reconfigure(config, now);
        self.enabled.store(config.enabled(), Ordering::Relaxed);
        drop(shared);
        for n in &self.reconfigured {
            n.notify_one();
        }
    }

    /// Whether any limit applies now.
    pub fn is_limited(&self) -> bool {
        self.enabled.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }

    /// Lifts the limits for good and lets every queued request go: the
    /// daemon is shutting down and waits for in-flight requests, which a
    /// low limit could otherwise hold for minutes.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        for n in &self.reconfigured {
            n.notify_one();
        }
    }

    /// The number of nodes in the group (an object in use cannot be deleted).
    pub fn member_count(&self) -> usize {
        self.lock().members.len()
    }

    /// Adds a member (a throttle node); it leaves the group when dropped.
    pub fn join(self: &Arc<Self>) -> ThrottleMember {
        let mut shared = self.lock();
        let id = shared.next_member_id;
        shared.next_member_id += 1;
        shared.members.push(MemberQueues {
            id,
            queues: [VecDeque::new(), VecDeque::new()],
        });
        ThrottleMember {
            group: self.clone(),
            id,
        }
    }

    /// Waits until a request of `bytes` by member `id` may go, and counts it.
    async fn admit(self: &Arc<Self>, id: u64, dir: Direction, bytes: u64) {
        if !self.is_limited() {
            return;
        }
        let woken = {
            let mut shared = self.lock();
            let d = dir.index();
            if !shared.timer_running[d] && !shared.has_waiters(dir) {
                let wait = shared.state.wait_ns(dir, self.now_ns());
                if wait == 0 {
                    shared.state.account(dir, bytes);
                    shared.last_served[d] = id;
                    return;
                }
            }
            let (wake, woken) = oneshot::channel();
            let Some(member) = shared.members.iter_mut().find(|m| m.id == id) else {
                return;
            };
            member.queues[d].push_back(Waiter { bytes, wake });
            if !shared.timer_running[d] {
                shared.timer_running[d] = true;
                tokio::spawn(self.clone().serve_queued(dir));
            }
            woken
        };
        // The timer task counted the request before waking it. A closed
        // channel (the task gone with the runtime) lets the request go.
        let _ = woken.await;
    }

    /// The timer task of a direction: wakes queued requests, member by
    /// member in turn, each as soon as the buckets let it go; ends when
    /// none is left.
    async fn serve_queued(self: Arc<Self>, dir: Direction) {
        let d = dir.index();
        loop {
            let wait = {
                let mut shared = self.lock();
                loop {
                    let Some(turn) = shared.next_turn(dir) else {
                        shared.timer_running[d] = false;
                        return;
                    };
                    let wait = match self.is_limited() {
                        true => shared.state.wait_ns(dir, self.now_ns()),
                        false => 0,
                    };
                    if wait > 0 {
                        break wait;
                    }
                    let member = &mut shared.members[turn];
                    let id = member.id;
                    let Some(waiter) = member.queues[d].pop_front() else {
                        continue;
                    };
                    // A request whose client went away is not counted.
                    if waiter.wake.is_closed() {
                        continue;
                    }
                    shared.state.account(dir, waiter.bytes);
                    shared.last_served[d] = id;
                    let _ = waiter.wake.send(());
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_nanos(wait)) => {}
                _ = self.reconfigured[d].notified() => {}
            }
        }
    }

    fn leave(&self, id: u64) {
        let mut shared = self.lock();
        // Its requests hold the node, so none is queued when it goes; any
        // left would be woken by their senders dropping.
        shared.members.retain(|m| m.id != id);
    }
}

/// A throttle node's place in its group.
#[derive(Debug)]
pub struct ThrottleMember {
    group: Arc<ThrottleGroup>,
    id: u64,
}

impl ThrottleMember {
    /// Waits (on a timer, never blocking a thread) until a request of
    /// `bytes` in `dir` may go under the group's limits, and counts it.
    pub async fn admit(&self, dir: Direction, bytes: u64) {
        self.group.admit(self.id, dir, bytes).await
    }

    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }
}

impl Drop for ThrottleMember {
    fn drop(&mut self) {
        self.group.leave(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::config::LimitMember;

    fn iops_total(n: i64) -> ThrottleConfig {
        let mut c = ThrottleConfig::default();
        c.set_limit("iops-total", LimitMember::ALL[0].1, n).unwrap();
        c
    }

    #[tokio::test(start_paused = true)]
    async fn test_requests_wait_for_the_limit_on_a_timer() {
        let g = ThrottleGroup::new("g".into(), iops_total(50));
        let m = g.join();
        let start = Instant::now();
        for _ in 0..106 {
            m.admit(Direction::Read, 4096).await;
        }
        // 6 at once, then 100 at 50 per second.
        let secs = start.elapsed().as_secs_f64();
        assert!((secs - 2.0).abs() < 0.05, "{secs}");
    }

    #[tokio::test(start_paused = true)]
    async fn test_members_share_the_limit_and_take_turns() {
        let g = ThrottleGroup::new("g".into(), iops_total(20));
        let (a, b) = (Arc::new(g.join()), Arc::new(g.join()));
        let count = |m: Arc<ThrottleMember>| async move {
            let mut n = 0;
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                m.admit(Direction::Write, 512).await;
                n += 1;
            }
            n
        };
        let (na, nb) = tokio::join!(tokio::spawn(count(a)), tokio::spawn(count(b)));
        let (na, nb) = (na.unwrap(), nb.unwrap());
        assert!((na + nb) <= 205, "{na} + {nb}");
        assert!((na as i64 - nb as i64).abs() <= 3, "{na} vs {nb}");
    }

    #[tokio::test(start_paused = true)]
    async fn test_lifting_the_limit_releases_queued_requests() {
        let g = ThrottleGroup::new("g".into(), iops_total(1));
        let m = Arc::new(g.join());
        for _ in 0..2 {
            m.admit(Direction::Read, 1).await;
        }
        let queued = tokio::spawn({
            let m = m.clone();
            async move { m.admit(Direction::Read, 1).await }
        });
        tokio::task::yield_now().await;
        g.set_config(ThrottleConfig::default());
        tokio::time::timeout(Duration::from_millis(10), queued)
            .await
            .expect("released at once")
            .unwrap();
        assert!(!g.is_limited());
    }

    #[tokio::test(start_paused = true)]
    async fn test_draining_releases_queued_requests_and_lifts_the_limit() {
        let g = ThrottleGroup::new("g".into(), iops_total(1));
        let m = Arc::new(g.join());
        for _ in 0..2 {
            m.admit(Direction::Write, 1).await;
        }
        let queued: Vec<_> = (0..5)
            .map(|_| {
                let m = m.clone();
                tokio::spawn(async move { m.admit(Direction::Write, 1).await })
            })
            .collect();
        tokio::task::yield_now().await;
        let start = Instant::now();
        g.drain();
        for q in queued {
            q.await.unwrap();
        }
        m.admit(Direction::Write, 1).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(!g.is_limited());
    }

    #[tokio::test]
    async fn test_a_group_without_limits_never_waits() {
        let g = ThrottleGroup::new("g".into(), ThrottleConfig::default());
        let m = g.join();
        for _ in 0..10_000 {
            m.admit(Direction::Read, 1 << 20).await;
        }
        assert_eq!(g.member_count(), 1);
        drop(m);
        assert_eq!(g.member_count(), 0);
    }
}

//! blkdebug's rules and state machine, as QEMU's blkdebug runs them.
//!
//! Rules wait for their event. When an event fires, the rules for it whose
//! `state` is 0 (any) or the current state act: `set-state` rules pick the
//! next state (the first such rule in the order the rules were given wins),
//! and `inject-error` rules become the armed set, replacing whatever was
//! armed before (an event with no inject-error rule for the current state
//! leaves the armed set alone). The state changes after the event, so rules
//! of one event all see the state it fired in. An armed rule fails the next
//! request that matches it (I/O type, sector) and stays armed unless it is
//! `once`, which removes it for good. The state starts at 1.

use crate::debug_event::DebugEvent;

/// The kinds of request a rule can fail (QEMU's `BlkdebugIOType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

impl IoType {
    /// What a rule without `iotype` fails: everything but block status.
    pub const DEFAULT: [IoType; 5] = [
        IoType::Read,
        IoType::Write,
        IoType::WriteZeroes,
        IoType::Discard,
        IoType::Flush,
    ];

    /// The QAPI name (`write-zeroes`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return None,
        })
    }
}

/// One `inject-error` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectError {
    pub event: DebugEvent,
    /// The state the event must fire in; 0 for any.
    pub state: i64,
    pub iotypes: Vec<IoType>,
    /// A positive errno (EIO = 5, ENOSPC = 28, ...); 0 arms a rule that
    /// fails nothing, as in QEMU.
    pub errno: i32,
    /// Fail only requests covering this 512-byte sector (never a flush).
    pub sector: Option<u64>,
    /// Remove the rule after it failed a request.
    pub once: bool,
    /// QEMU fails the request before or after a coroutine yield; bexd's
    /// drivers are synchronous, so both fail it at once. Kept so a rule
    /// written for QEMU means the same here.
    pub immediately: bool,
    /// bexd's `x-after`: once armed, let this many matching requests pass
    /// before failing one.
    pub after: u64,
}

impl InjectError {
    /// A rule failing `iotypes` with `errno` once `event` fired, in any state.
    pub fn new(event: DebugEvent, iotypes: Vec<IoType>, errno: i32) -> Self {
        Self {
            event,
            state: 0,
            iotypes,
            errno,
            sector: None,
            once: false,
            immediately: false,
            after: 0,
        }
    }

    fn matches(&self, io: IoType, offset: u64, len: u64) -> bool {
        let in_range = self.sector.is_none_or(|s| {
            let at = s.saturating_mul(512);
            len > 0 && offset <= at && at < offset.saturating_add(len)
        });
        in_range && self.iotypes.contains(&io)
    }
}

/// One `set-state` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetState {
    pub event: DebugEvent,
    /// The state the event must fire in; 0 for any.
    pub state: i64,
    pub new_state: i64,
}

/// The rules of one blkdebug node and where its state machine is.
#[derive(Debug)]
pub struct RuleSet {
    inject: Vec<InjectError>,
    set_state: Vec<SetState>,
    /// Indexes into `inject` of the armed rules, in rule order.
    armed: Vec<usize>,
    state: i64,
}

/// What [`RuleSet::check`] decided for a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail { errno: i32 },
}

impl RuleSet {
    pub fn new(inject: Vec<InjectError>, set_state: Vec<SetState>) -> Self {
        Self {
            inject,
            set_state,
            armed: Vec::new(),
            state: 1,
        }
    }

    pub fn state(&self) -> i64 {
        self.state
    }

    /// Whether any rule waits for `event` (lets callers skip nothing-to-do work).
    pub fn listens(&self, event: DebugEvent) -> bool {
        self.inject.iter().any(|r| r.event == event)
            || self.set_state.iter().any(|r| r.event == event)
    }

    /// `event` fired: arm its inject-error rules and move to the next state.
    pub fn fire(&mut self, event: DebugEvent) {
        let applies = |rule_event: DebugEvent, state: i64| {
            rule_event == event && (state == 0 || state == self.state)
        };
        let hit: Vec<usize> = (0..self.inject.len())
            .filter(|&i| applies(self.inject[i].event, self.inject[i].state))
            .collect();
        if !hit.is_empty() {
            self.armed = hit;
        }
        if let Some(r) = self.set_state.iter().find(|r| applies(r.event, r.state)) {
            self.state = r.new_state;
        }
    }

    /// The armed rules' verdict on a request; a `once` rule that fails it is removed.
    pub fn check(&mut self, io: IoType, offset: u64, len: u64) -> Verdict {
        let mut hit = None;
        for (pos, &i) in self.armed.iter().enumerate() {
            let rule = &mut self.inject[i];
            if !rule.matches(io, offset, len) {
                continue;
            }
            if rule.after > 0 {
                rule.after -= 1;
                continue;
            }
            hit = Some((pos, i));
            break;
        }
        let Some((pos, index)) = hit else {
            return Verdict::Pass;
        };
        let errno = self.inject[index].errno;
        if errno == 0 {
            return Verdict::Pass;
        }
        if self.inject[index].once {
            self.armed.remove(pos);
            self.inject.remove(index);
            for i in &mut self.armed {
                if *i > index {
                    *i -= 1;
                }
            }
        }
        Verdict::Fail { errno }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DebugEvent::{None as Open, ReadAio, WriteAio};

    const EIO: i32 = 5;

    fn read_rule(event: DebugEvent) -> InjectError {
        InjectError::new(event, vec![IoType::Read], EIO)
    }

    fn fails(r: &mut RuleSet, io: IoType) -> bool {
        r.check(io, 0, 512) != Verdict::Pass
    }

    #[test]
    fn test_a_rule_waits_for_its_event_and_then_stays_armed() {
        let mut r = RuleSet::new(vec![read_rule(ReadAio)], vec![]);
        assert!(!fails(&mut r, IoType::Read));
        r.fire(WriteAio);
        assert!(!fails(&mut r, IoType::Read));
        r.fire(ReadAio);
        assert!(fails(&mut r, IoType::Read));
        assert!(fails(&mut r, IoType::Read));
        assert!(!fails(&mut r, IoType::Write));
    }

    #[test]
    fn test_once_removes_the_rule_for_good() {
        let once = InjectError {
            once: true,
            ..read_rule(ReadAio)
        };
        let mut r = RuleSet::new(vec![once], vec![]);
        r.fire(ReadAio);
        assert!(fails(&mut r, IoType::Read));
        assert!(!fails(&mut r, IoType::Read));
        r.fire(ReadAio);
        assert!(!fails(&mut r, IoType::Read));
    }

    #[test]
    fn test_set_state_chain_gates_rules_and_changes_after_the_event() {
        let gated = InjectError {
            state: 2,
            ..read_rule(ReadAio)
        };
        let to2 = SetState {
            event: WriteAio,
            state: 1,
            new_state: 2,
        };
        let to3 = SetState {
            event: ReadAio,
            state: 2,
            new_state: 3,
        };
        let mut r = RuleSet::new(vec![gated], vec![to2, to3]);
        r.fire(ReadAio);
        assert!(!fails(&mut r, IoType::Read));
        assert_eq!(r.state(), 1);
        r.fire(WriteAio);
        assert_eq!(r.state(), 2);
        // read_aio in state 2 arms the rule (it sees state 2) and moves to 3.
        r.fire(ReadAio);
        assert_eq!(r.state(), 3);
        assert!(fails(&mut r, IoType::Read));
        // In state 3 nothing re-arms or disarms it.
        r.fire(ReadAio);
        assert!(fails(&mut r, IoType::Read));
    }

    #[test]
    fn test_the_first_set_state_rule_wins() {
        let a = SetState {
            event: Open,
            state: 0,
            new_state: 7,
        };
        let b = SetState {
            new_state: 9,
            ..a.clone()
        };
        let mut r = RuleSet::new(vec![], vec![a, b]);
        r.fire(Open);
        assert_eq!(r.state(), 7);
    }

    #[test]
    fn test_an_event_with_rules_replaces_the_armed_set() {
        let write = InjectError::new(WriteAio, vec![IoType::Write], EIO);
        let mut r = RuleSet::new(vec![read_rule(ReadAio), write], vec![]);
        r.fire(ReadAio);
        r.fire(WriteAio);
        assert!(!fails(&mut r, IoType::Read));
        assert!(fails(&mut r, IoType::Write));
    }

    #[test]
    fn test_sector_rules_match_covering_requests_and_never_a_flush() {
        let rule = InjectError {
            sector: Some(8),
            iotypes: IoType::DEFAULT.to_vec(),
            ..read_rule(Open)
        };
        let mut r = RuleSet::new(vec![rule], vec![]);
        r.fire(Open);
        assert_eq!(
            r.check(IoType::Read, 4096, 512),
            Verdict::Fail { errno: EIO }
        );
        assert_eq!(r.check(IoType::Read, 0, 4096), Verdict::Pass);
        assert_eq!(r.check(IoType::Read, 4097, 512), Verdict::Pass);
        assert_eq!(r.check(IoType::Flush, 0, 0), Verdict::Pass);
    }

    #[test]
    fn test_errno_zero_arms_but_fails_nothing_and_after_counts_matches() {
        let zero = InjectError {
            errno: 0,
            once: true,
            ..read_rule(Open)
        };
        let mut r = RuleSet::new(vec![zero], vec![]);
        r.fire(Open);
        assert!(!fails(&mut r, IoType::Read));
        let later = InjectError {
            after: 2,
            ..read_rule(Open)
        };
        let mut r = RuleSet::new(vec![later], vec![]);
        r.fire(Open);
        assert!(!fails(&mut r, IoType::Write));
        assert!(!fails(&mut r, IoType::Read));
        assert!(!fails(&mut r, IoType::Read));
        assert!(fails(&mut r, IoType::Read));
    }
}

//! QEMU's job state machine (job.c): which status may follow which, and
//! which command verbs a job accepts in each status. Plain tables, so the
//! rules are tested here and the job runner only asks.

use qmp::schema::job::JobStatus;

/// A command applied to a job: QEMU's `JobVerb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobVerb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
    Change,
}

impl JobVerb {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::SetSpeed => "set-speed",
            Self::Complete => "complete",
            Self::Finalize => "finalize",
            Self::Dismiss => "dismiss",
            Self::Change => "change",
        }
    }
}

/// A verb refused in the job's status, with QEMU's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Job '{id}' in state '{}' cannot accept command verb '{}'", .status.as_str(), .verb.as_str())]
pub struct VerbRefused {
    pub id: String,
    pub status: JobStatus,
    pub verb: JobVerb,
}

/// The column of `status` in QEMU's tables (U, C, R, P, Y, S, W, D, X, E, N).
fn column(status: JobStatus) -> usize {
    match status {
        JobStatus::Undefined => 0,
        JobStatus::Created => 1,
        JobStatus::Running => 2,
        JobStatus::Paused => 3,
        JobStatus::Ready => 4,
        JobStatus::Standby => 5,
        JobStatus::Waiting => 6,
        JobStatus::Pending => 7,
        JobStatus::Aborting => 8,
        JobStatus::Concluded => 9,
        JobStatus::Null => 10,
    }
}

/// QEMU's JobSTT: row = from, column = to.
const TRANSITIONS: [[bool; 11]; 11] = {
    const O: bool = false;
    const I: bool = true;
    [
        /* U */ [O, I, O, O, O, O, O, O, O, O, O],
        /* C */ [O, O, I, O, O, O, O, O, I, O, I],
        /* R */ [O, O, O, I, I, O, I, O, I, O, O],
        /* P */ [O, O, I, O, O, O, O, O, O, O, O],
        /* Y */ [O, O, O, O, O, I, I, O, I, O, O],
        /* S */ [O, O, O, O, I, O, O, O, O, O, O],
        /* W */ [O, O, O, O, O, O, O, I, I, O, O],
        /* D */ [O, O, O, O, O, O, O, O, I, I, O],
        /* X */ [O, O, O, O, O, O, O, O, I, I, O],
        /* E */ [O, O, O, O, O, O, O, O, O, O, I],
        /* N */ [O, O, O, O, O, O, O, O, O, O, O],
    ]
};

/// Whether a job in `from` may move to `to` (QEMU asserts this; so do we).
pub fn may_transition(from: JobStatus, to: JobStatus) -> bool {
    TRANSITIONS[column(from)][column(to)]
}

/// QEMU's JobVerbTable row for `verb`.
fn verb_row(verb: JobVerb) -> [bool; 11] {
    const O: bool = false;
    const I: bool = true;
    match verb {
        JobVerb::Cancel => [O, I, I, I, I, I, I, I, O, O, O],
        JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed => [O, I, I, I, I, I, O, O, O, O, O],
        JobVerb::Complete => [O, O, O, O, I, O, O, O, O, O, O],
        JobVerb::Finalize => [O, O, O, O, O, O, O, I, O, O, O],
        JobVerb::Dismiss => [O, O, O, O, O, O, O, O, O, I, O],
        JobVerb::Change => [O, O, I, I, I, I, O, O, O, O, O],
    }
}

/// QEMU's `job_apply_verb`: whether job `id` in `status` accepts `verb`.
pub fn apply_verb(id: &str, status: JobStatus, verb: JobVerb) -> Result<(), VerbRefused> {
    match verb_row(verb)[column(status)] {
        true => Ok(()),
        false => Err(VerbRefused {
            id: id.to_string(),
            status,
            verb,
        }),
    }
}

/// Whether the job's work is over (QEMU's `job_is_completed`).
pub fn is_completed(status: JobStatus) -> bool {
    matches!(
        status,
        JobStatus::Waiting
            | JobStatus::Pending
            | JobStatus::Aborting
            | JobStatus::Concluded
            | JobStatus::Null
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobStatus::*;

    const ALL: [JobStatus; 11] = [
        Undefined, Created, Running, Paused, Ready, Standby, Waiting, Pending, Aborting, Concluded,
        Null,
    ];

    /// Every allowed transition, written out as QEMU's job.c lists them.
    #[test]
    fn test_transitions_are_qemus() {
        let allowed = [
            (Undefined, Created),
            (Created, Running),
            (Created, Aborting),
            (Created, Null),
            (Running, Paused),
            (Running, Ready),
            (Running, Waiting),
            (Running, Aborting),
            (Paused, Running),
            (Ready, Standby),
            (Ready, Waiting),
            (Ready, Aborting),
            (Standby, Ready),
            (Waiting, Pending),
            (Waiting, Aborting),
            (Pending, Aborting),
            (Pending, Concluded),
            (Aborting, Aborting),
            (Aborting, Concluded),
            (Concluded, Null),
        ];
        for from in ALL {
            for to in ALL {
                assert_eq!(
                    may_transition(from, to),
                    allowed.contains(&(from, to)),
                    "{} -> {}",
                    from.as_str(),
                    to.as_str()
                );
            }
        }
    }

    #[test]
    fn test_verbs_are_qemus() {
        let accepts = |verb, states: &[JobStatus]| {
            for s in ALL {
                assert_eq!(
                    apply_verb("j", s, verb).is_ok(),
                    states.contains(&s),
                    "{} in {}",
                    verb.as_str(),
                    s.as_str()
                );
            }
        };
        let live = [Created, Running, Paused, Ready, Standby];
        accepts(
            JobVerb::Cancel,
            &[Created, Running, Paused, Ready, Standby, Waiting, Pending],
        );
        accepts(JobVerb::Pause, &live);
        accepts(JobVerb::Resume, &live);
        accepts(JobVerb::SetSpeed, &live);
        accepts(JobVerb::Complete, &[Ready]);
        accepts(JobVerb::Finalize, &[Pending]);
        accepts(JobVerb::Dismiss, &[Concluded]);
        accepts(JobVerb::Change, &[Running, Paused, Ready, Standby]);
    }

    /// The text qemu-storage-daemon 10 answers, e.g. to job-dismiss on a pending job.
    #[test]
    fn test_refusal_text() {
        let e = apply_verb("j1", Pending, JobVerb::Dismiss).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Job 'j1' in state 'pending' cannot accept command verb 'dismiss'"
        );
        let e = apply_verb("j1", Waiting, JobVerb::SetSpeed).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Job 'j1' in state 'waiting' cannot accept command verb 'set-speed'"
        );
        let e = apply_verb("j1", Concluded, JobVerb::Finalize).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Job 'j1' in state 'concluded' cannot accept command verb 'finalize'"
        );
    }

    #[test]
    fn test_completed_states() {
        let done: Vec<_> = ALL.into_iter().filter(|s| is_completed(*s)).collect();
        assert_eq!(done, [Waiting, Pending, Aborting, Concluded, Null]);
    }
}

//! File runs: where a range's bytes lie in a file, in order.
//!
//! A leaf module: the ring reads into runs and drivers map ranges onto them,
//! so it must import neither.

use std::ops::Range;

/// `len` bytes of a file from `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRun {
    pub offset: u64,
    pub len: u64,
}

/// The parts of `runs` (laid end to end from 0) that hold bytes `range`.
pub fn runs_within(runs: &[FileRun], range: Range<u64>) -> impl Iterator<Item = FileRun> + '_ {
    let mut pos = 0u64;
    runs.iter().filter_map(move |run| {
        let (run_start, run_end) = (pos, pos + run.len);
        pos = run_end;
        let (start, end) = (range.start.max(run_start), range.end.min(run_end));
        (start < end).then(|| FileRun {
            offset: run.offset + (start - run_start),
            len: end - start,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(offset: u64, len: u64) -> FileRun {
        FileRun { offset, len }
    }

    #[test]
    fn test_runs_within_maps_a_range_onto_the_runs_it_spans() {
        // Bytes 0..10 at file 100, 10..30 at file 500, 30..35 at file 40.
        let runs = [run(100, 10), run(500, 20), run(40, 5)];
        let got = |r: Range<u64>| runs_within(&runs, r).collect::<Vec<_>>();
        assert_eq!(got(0..35), runs.to_vec());
        assert_eq!(got(3..8), vec![run(103, 5)]);
        assert_eq!(got(8..33), vec![run(108, 2), run(500, 20), run(40, 3)]);
        assert_eq!(got(10..30), vec![run(500, 20)]);
        assert_eq!(got(30..35), vec![run(40, 5)]);
        assert_eq!(got(12..12), vec![]);
    }
}

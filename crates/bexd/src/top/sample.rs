//! One reading of the daemon's per-export counters (`x-query-export-stats`)
//! and the rates between two readings.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::Value;

/// An export's counters at one instant: running totals, as the daemon keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportCounters {
    pub id: String,
    pub node: String,
    pub clients: u64,
    pub in_flight: u64,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ns: u64,
    pub write_ns: u64,
    pub flushes: u64,
    pub discards: u64,
    /// Failed and invalid requests of every kind.
    pub errors: u64,
}

/// Every export's counters, read at `at`.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub exports: Vec<ExportCounters>,
}

/// What the view shows for one export: totals, and rates over the last
/// interval (`None` before a second reading, or for an export that is new).
#[derive(Clone, Debug, PartialEq)]
pub struct ExportRow {
    pub counters: ExportCounters,
    pub rates: Option<Rates>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_mib_s: f64,
    pub write_mib_s: f64,
    /// Mean latency of the reads that completed in the interval, in µs
    /// (`None`: none completed).
    pub read_latency_us: Option<f64>,
    pub write_latency_us: Option<f64>,
}

/// Reads `x-query-export-stats`' reply; a member that is missing or not a
/// count is an error naming it, so a daemon that answers differently is
/// reported rather than shown as zeroes.
pub fn parse(reply: &Value, at: Instant) -> Result<Sample, String> {
    let list = reply
        .as_array()
        .ok_or("x-query-export-stats did not return a list")?;
    let exports = list.iter().map(parse_export).collect::<Result<_, _>>()?;
    Ok(Sample { at, exports })
}

fn parse_export(e: &Value) -> Result<ExportCounters, String> {
    let text = |key: &str| {
        e[key]
            .as_str()
            .map(String::from)
            .ok_or_else(|| format!("an export without '{key}'"))
    };
    let count = |v: &Value, key: &str| {
        v[key]
            .as_u64()
            .ok_or_else(|| format!("an export whose '{key}' is not a count"))
    };
    let stats = &e["stats"];
    let sum = |keys: &[&str]| -> Result<u64, String> { keys.iter().map(|k| count(stats, k)).sum() };
    Ok(ExportCounters {
        id: text("id")?,
        node: text("node-name")?,
        clients: count(e, "connections")?,
        in_flight: count(e, "in-flight")?,
        reads: count(stats, "rd_operations")?,
        writes: count(stats, "wr_operations")?,
        read_bytes: count(stats, "rd_bytes")?,
        write_bytes: count(stats, "wr_bytes")?,
        read_ns: count(stats, "rd_total_time_ns")?,
        write_ns: count(stats, "wr_total_time_ns")?,
        flushes: count(stats, "flush_operations")?,
        discards: count(stats, "unmap_operations")?,
        errors: sum(&[
            "failed_rd_operations",
            "failed_wr_operations",
            "failed_flush_operations",
            "failed_unmap_operations",
            "invalid_rd_operations",
            "invalid_wr_operations",
            "invalid_flush_operations",
            "invalid_unmap_operations",
        ])?,
    })
}

/// The rows for `now`, with rates against `before` where the export was
/// there too. Counters that went backwards (an export deleted and added
/// again under the same id) give no rates rather than nonsense.
pub fn rows(before: Option<&Sample>, now: &Sample) -> Vec<ExportRow> {
    let earlier: HashMap<&str, &ExportCounters> = before
        .map(|b| b.exports.iter().map(|e| (e.id.as_str(), e)).collect())
        .unwrap_or_default();
    let seconds = before.map(|b| now.at.duration_since(b.at).as_secs_f64());
    let mut rows: Vec<ExportRow> = now
        .exports
        .iter()
        .map(|e| ExportRow {
            counters: e.clone(),
            rates: match (earlier.get(e.id.as_str()), seconds) {
                (Some(old), Some(s)) if s > 0.0 => rates(old, e, s),
                _ => None,
            },
        })
        .collect();
    rows.sort_by(|a, b| a.counters.id.cmp(&b.counters.id));
    rows
}

fn rates(old: &ExportCounters, new: &ExportCounters, seconds: f64) -> Option<Rates> {
    let reads = new.reads.checked_sub(old.reads)?;
    let writes = new.writes.checked_sub(old.writes)?;
    let read_bytes = new.read_bytes.checked_sub(old.read_bytes)?;
    let write_bytes = new.write_bytes.checked_sub(old.write_bytes)?;
    let read_ns = new.read_ns.checked_sub(old.read_ns)?;
    let write_ns = new.write_ns.checked_sub(old.write_ns)?;
    let mean_us = |ns: u64, ops: u64| (ops > 0).then(|| ns as f64 / ops as f64 / 1000.0);
    Some(Rates {
        read_iops: reads as f64 / seconds,
        write_iops: writes as f64 / seconds,
        read_mib_s: read_bytes as f64 / seconds / (1024.0 * 1024.0),
        write_mib_s: write_bytes as f64 / seconds / (1024.0 * 1024.0),
        read_latency_us: mean_us(read_ns, reads),
        write_latency_us: mean_us(write_ns, writes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn export(id: &str, reads: u64, read_bytes: u64, read_ns: u64) -> Value {
        json!({"id": id, "node-name": "n", "connections": 2, "in-flight": 1,
               "stats": {"rd_operations": reads, "wr_operations": 0, "rd_bytes": read_bytes,
                         "wr_bytes": 0, "rd_total_time_ns": read_ns, "wr_total_time_ns": 0,
                         "flush_operations": 0, "unmap_operations": 0,
                         "failed_rd_operations": 1, "failed_wr_operations": 0,
                         "failed_flush_operations": 0, "failed_unmap_operations": 0,
                         "invalid_rd_operations": 0, "invalid_wr_operations": 2,
                         "invalid_flush_operations": 0, "invalid_unmap_operations": 0}})
    }

    #[test]
    fn test_rows_give_rates_over_the_interval_and_none_for_new_exports() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        let before = parse(&json!([export("a", 100, 1 << 20, 1_000_000)]), t0).unwrap();
        let now = parse(
            &json!([export("b", 5, 0, 0), export("a", 300, 5 << 20, 3_000_000)]),
            t1,
        )
        .unwrap();
        let rows = rows(Some(&before), &now);
        assert_eq!(rows[0].counters.id, "a");
        assert_eq!(rows[0].counters.errors, 3);
        assert_eq!(rows[0].counters.clients, 2);
        let r = rows[0].rates.expect("a was there before");
        assert_eq!(r.read_iops, 100.0);
        assert_eq!(r.read_mib_s, 2.0);
        assert_eq!(r.read_latency_us, Some(10.0));
        assert_eq!(r.write_latency_us, None);
        assert_eq!(rows[1].counters.id, "b");
        assert_eq!(rows[1].rates, None);
    }

    #[test]
    fn test_counters_that_go_backwards_give_no_rates() {
        let t0 = Instant::now();
        let before = parse(&json!([export("a", 100, 0, 0)]), t0).unwrap();
        let now = parse(&json!([export("a", 3, 0, 0)]), t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(rows(Some(&before), &now)[0].rates, None);
    }

    #[test]
    fn test_parse_names_a_missing_member() {
        let mut e = export("a", 1, 0, 0);
        e["stats"].as_object_mut().unwrap().remove("wr_bytes");
        let err = parse(&json!([e]), Instant::now()).unwrap_err();
        assert!(err.contains("'wr_bytes'"), "{err}");
        assert!(parse(&json!({}), Instant::now()).is_err());
    }
}

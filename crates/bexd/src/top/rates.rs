//! From two `x-query-export-stats` answers to the rows `bexd top` shows:
//! rates over the interval between them, and totals since each export was
//! added. Plain arithmetic on JSON, so it is tested without a terminal.

use serde_json::Value;

/// One export's line.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub id: String,
    pub node: String,
    pub clients: u64,
    pub in_flight: u64,
    /// Requests (reads, writes, flushes, trims) per second over the interval.
    pub iops: f64,
    pub read_mib_s: f64,
    pub write_mib_s: f64,
    /// Mean time per request finished in the interval, in microseconds
    /// (`None`: none finished).
    pub latency_us: Option<f64>,
    /// Totals since the export was added.
    pub read_ops: u64,
    pub write_ops: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
}

const KINDS: [&str; 4] = ["rd", "wr", "flush", "unmap"];

fn counter(stats: &Value, key: &str) -> u64 {
    stats.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Finished requests (successful and failed) and their time, over every kind.
fn finished(stats: &Value) -> (u64, u64) {
    KINDS.iter().fold((0, 0), |(n, t), k| {
        let ops = counter(stats, &format!("{k}_operations"))
            + counter(stats, &format!("failed_{k}_operations"));
        (n + ops, t + counter(stats, &format!("{k}_total_time_ns")))
    })
}

/// The rows for `now`, with rates against `before` (the answer `seconds`
/// earlier; an export new since then counts from zero).
pub fn rows(before: Option<&Value>, now: &Value, seconds: f64) -> Vec<Row> {
    let empty = Value::Null;
    let exports = now.as_array().map(Vec::as_slice).unwrap_or_default();
    exports
        .iter()
        .map(|e| {
            let id = e["id"].as_str().unwrap_or("").to_string();
            let stats = &e["stats"];
            let old = before
                .and_then(Value::as_array)
                .and_then(|list| list.iter().find(|o| o["id"] == e["id"]))
                .map_or(&empty, |o| &o["stats"]);
            let delta = |key: &str| counter(stats, key).saturating_sub(counter(old, key));
            let (n_now, t_now) = finished(stats);
            let (n_old, t_old) = finished(old);
            let (n, t) = (n_now.saturating_sub(n_old), t_now.saturating_sub(t_old));
            let per_second = |v: u64| match seconds > 0.0 {
                true => v as f64 / seconds,
                false => 0.0,
            };
            Row {
                node: e["node-name"].as_str().unwrap_or("").to_string(),
                clients: e["connections"].as_u64().unwrap_or(0),
                in_flight: e["in-flight"].as_u64().unwrap_or(0),
                iops: per_second(n),
                read_mib_s: per_second(delta("rd_bytes")) / (1 << 20) as f64,
                write_mib_s: per_second(delta("wr_bytes")) / (1 << 20) as f64,
                latency_us: (n > 0).then(|| t as f64 / n as f64 / 1e3),
                read_ops: counter(stats, "rd_operations"),
                write_ops: counter(stats, "wr_operations"),
                read_bytes: counter(stats, "rd_bytes"),
                written_bytes: counter(stats, "wr_bytes"),
                id,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn export(id: &str, rd_ops: u64, rd_bytes: u64, rd_ns: u64, clients: u64) -> Value {
        json!({"id": id, "node-name": "n", "connections": clients, "in-flight": 1,
               "stats": {"rd_operations": rd_ops, "rd_bytes": rd_bytes,
                         "rd_total_time_ns": rd_ns, "wr_operations": 0, "wr_bytes": 0}})
    }

    #[test]
    fn test_rates_are_deltas_over_the_interval_and_totals_are_absolute() {
        let before = json!([export("e0", 100, 409600, 1_000_000, 1)]);
        let now = json!([export("e0", 300, 409600 + 2 * 1048576, 5_000_000, 2)]);
        let rows = rows(Some(&before), &now, 2.0);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.id.as_str(), r.clients, r.in_flight), ("e0", 2, 1));
        assert_eq!(r.iops, 100.0);
        assert_eq!(r.read_mib_s, 1.0);
        assert_eq!(r.latency_us, Some(20.0));
        assert_eq!((r.read_ops, r.read_bytes), (300, 409600 + 2 * 1048576));
    }

    #[test]
    fn test_a_new_or_idle_export_has_no_latency_and_zero_rates() {
        let now = json!([export("e1", 0, 0, 0, 0)]);
        let r = &rows(None, &now, 1.0)[0];
        assert_eq!((r.iops, r.latency_us), (0.0, None));
        assert!(rows(None, &json!("junk"), 1.0).is_empty());
    }
}

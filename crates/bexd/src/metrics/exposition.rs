//! Writes the Prometheus text exposition format (version 0.0.4, what
//! `promtool check metrics` reads): each family's HELP and TYPE, then its
//! samples, label values escaped.

use std::fmt::Write;

use block::stats::{latency_bucket_bound, KindSnapshot};

/// The exposition being written.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// A metric family's type.
#[derive(Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Exposition {
    /// Starts a family; its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample of `name` with `labels`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A latency histogram's samples (the family was started as `name`):
    /// cumulative buckets, the sum in seconds and the count.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], kind: &KindSnapshot) {
        let mut cumulative = 0u64;
        let bucket = format!("{name}_bucket");
        for (i, count) in kind.latency.iter().enumerate() {
            cumulative += count;
            let le = latency_bucket_bound(i).map_or("+Inf".to_string(), |b| b.to_string());
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative);
        }
        let seconds = kind.total_ns as f64 / 1e9;
        self.sample(&format!("{name}_sum"), labels, seconds);
        self.sample(&format!("{name}_count"), labels, cumulative);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value as the format writes it: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_samples_escape_label_values() {
        let mut e = Exposition::default();
        e.family("x_total", Kind::Counter, "Things.");
        e.sample("x_total", &[("id", "a\"b\\c\nd")], 3);
        assert_eq!(
            e.finish(),
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{id=\"a\\\"b\\\\c\\nd\"} 3\n"
        );
    }

    #[test]
    fn test_histogram_buckets_are_cumulative_and_end_at_inf() {
        let mut kind = KindSnapshot::default();
        kind.latency[0] = 2;
        kind.latency[3] = 1;
        kind.total_ns = 1_500_000_000;
        let mut e = Exposition::default();
        e.histogram("h_seconds", &[("op", "read")], &kind);
        let text = e.finish();
        assert!(text.contains("h_seconds_bucket{op=\"read\",le=\"0.000001\"} 2\n"));
        assert!(text.contains("h_seconds_bucket{op=\"read\",le=\"0.000008\"} 3\n"));
        assert!(text.contains("h_seconds_bucket{op=\"read\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("h_seconds_sum{op=\"read\"} 1.5\n"));
        assert!(text.contains("h_seconds_count{op=\"read\"} 3\n"));
    }
}

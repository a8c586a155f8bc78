//! The daemon's counters as metric families: per export and per node
//! (requests, bytes, failures and invalid requests by kind, errors by errno,
//! latency histograms, requests in flight), export connections, and the NBD
//! server's TLS handshakes and payload budget.

use block::stats::{KindSnapshot, StatsSnapshot};
use block::IoKind;

use super::exposition::{Exposition, Kind};
use crate::daemon::Daemon;

/// One labelled set of counters: an export or a node.
struct Subject {
    label: &'static str,
    name: String,
    snap: StatsSnapshot,
}

/// Every family, rendered from one snapshot of each export and node.
pub fn render(daemon: &Daemon) -> String {
    let exports = daemon.exports.all();
    let export_subjects: Vec<Subject> = exports
        .iter()
        .map(|e| Subject {
            label: "export",
            name: e.id().to_string(),
            snap: e.stats.snapshot(),
        })
        .collect();
    let node_subjects: Vec<Subject> = daemon
        .nodes
        .all()
        .iter()
        .map(|n| Subject {
            label: "node",
            name: n.node_name().to_string(),
            snap: n.stats().snapshot(),
        })
        .collect();
    let mut e = Exposition::default();
    io_families(&mut e, "bexd_export", &export_subjects);
    io_families(&mut e, "bexd_node", &node_subjects);

    e.family(
        "bexd_export_connections",
        Kind::Gauge,
        "NBD clients attached to the export now.",
    );
    for x in &exports {
        e.sample(
            "bexd_export_connections",
            &[("export", x.id())],
            x.connection_count(),
        );
    }
    e.family(
        "bexd_export_connections_accepted_total",
        Kind::Counter,
        "NBD clients ever attached to the export.",
    );
    for x in &exports {
        e.sample(
            "bexd_export_connections_accepted_total",
            &[("export", x.id())],
            x.connections_total(),
        );
    }
    server_families(&mut e, daemon);
    e.finish()
}

/// A per-kind counter family: its name suffix, help, and the counter it shows.
type KindFamily = (&'static str, &'static str, fn(&KindSnapshot) -> u64);

/// The request families of exports or nodes (`prefix` bexd_export or bexd_node).
fn io_families(e: &mut Exposition, prefix: &str, subjects: &[Subject]) {
    let per_kind: [KindFamily; 4] = [
        ("requests_total", "Requests that succeeded, by kind.", |k| {
            k.ops
        }),
        (
            "bytes_total",
            "Bytes of requests that succeeded, by kind.",
            |k| k.bytes,
        ),
        (
            "failed_requests_total",
            "Requests that reached the image and failed, by kind.",
            |k| k.failed,
        ),
        (
            "invalid_requests_total",
            "Requests refused before reaching the image, by kind.",
            |k| k.invalid,
        ),
    ];
    for (suffix, help, value) in per_kind {
        let name = format!("{prefix}_{suffix}");
        e.family(&name, Kind::Counter, help);
        for s in subjects {
            for kind in IoKind::ALL {
                let labels = [(s.label, s.name.as_str()), ("op", kind.label())];
                e.sample(&name, &labels, value(s.snap.kind(kind)));
            }
        }
    }
    let name = format!("{prefix}_request_errors_total");
    e.family(
        &name,
        Kind::Counter,
        "Failed and invalid requests by the errno they got.",
    );
    for s in subjects {
        for (errno, count) in s.snap.errno_counts() {
            e.sample(
                &name,
                &[(s.label, s.name.as_str()), ("errno", errno)],
                count,
            );
        }
    }
    let name = format!("{prefix}_requests_in_flight");
    e.family(
        &name,
        Kind::Gauge,
        "Requests received and not yet answered.",
    );
    for s in subjects {
        e.sample(&name, &[(s.label, s.name.as_str())], s.snap.in_flight);
    }
    let name = format!("{prefix}_request_duration_seconds");
    e.family(
        &name,
        Kind::Histogram,
        "Time from a request's arrival until its reply is ready to send, by kind.",
    );
    for s in subjects {
        for kind in IoKind::ALL {
            let labels = [(s.label, s.name.as_str()), ("op", kind.label())];
            e.histogram(&name, &labels, s.snap.kind(kind));
        }
    }
}

/// The NBD server's families (samples only while a server runs).
fn server_families(e: &mut Exposition, daemon: &Daemon) {
    let server = daemon.nbd_server_gauges().map(|g| g.snapshot());
    let families: [(&str, Kind, &str, Option<u64>); 4] = [
        (
            "bexd_nbd_tls_handshakes_total",
            Kind::Counter,
            "STARTTLS upgrades attempted.",
            server.map(|s| s.tls_handshakes),
        ),
        (
            "bexd_nbd_tls_handshake_failures_total",
            Kind::Counter,
            "STARTTLS upgrades that failed (TLS handshake or tls-authz).",
            server.map(|s| s.tls_failures),
        ),
        (
            "bexd_nbd_payload_budget_in_use_bytes",
            Kind::Gauge,
            "Bytes of the server-wide payload budget held by requests in flight.",
            server.map(|s| s.budget_in_use),
        ),
        (
            "bexd_nbd_payload_budget_bytes",
            Kind::Gauge,
            "The server-wide payload budget (x-payload-budget).",
            server.map(|s| s.budget_total),
        ),
    ];
    for (name, kind, help, value) in families {
        e.family(name, kind, help);
        if let Some(v) = value {
            e.sample(name, &[], v);
        }
    }
}

//! qapi/block-core.json's statistics: `query-blockstats` (BlockStats,
//! BlockDeviceStats) and bexd's own per-export statistics.

use serde_json::Value;

use crate::{qapi_object, qapi_struct};

qapi_struct! {
    /// query-blockstats' arguments.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct QueryBlockstatsArgs {
        opt "query-nodes" query_nodes: bool,
    }
}

qapi_object! {
    /// QEMU's BlockDeviceStats: one node's (or one export's) counters. The
    /// latency histograms are absent, as they are until
    /// `block-latency-histogram-set`, which qemu-storage-daemon does not have.
    pub BlockDeviceStats {
        req "rd_bytes": i64,
        req "wr_bytes": i64,
        req "zone_append_bytes": i64,
        req "unmap_bytes": i64,
        req "rd_operations": i64,
        req "wr_operations": i64,
        req "zone_append_operations": i64,
        req "flush_operations": i64,
        req "unmap_operations": i64,
        req "rd_total_time_ns": i64,
        req "wr_total_time_ns": i64,
        req "zone_append_total_time_ns": i64,
        req "flush_total_time_ns": i64,
        req "unmap_total_time_ns": i64,
        req "wr_highest_offset": i64,
        req "rd_merged": i64,
        req "wr_merged": i64,
        req "zone_append_merged": i64,
        req "unmap_merged": i64,
        opt "idle_time_ns": i64,
        req "failed_rd_operations": i64,
        req "failed_wr_operations": i64,
        req "failed_zone_append_operations": i64,
        req "failed_flush_operations": i64,
        req "failed_unmap_operations": i64,
        req "invalid_rd_operations": i64,
        req "invalid_wr_operations": i64,
        req "invalid_zone_append_operations": i64,
        req "invalid_flush_operations": i64,
        req "invalid_unmap_operations": i64,
        req "account_invalid": bool,
        req "account_failed": bool,
        req "timed_stats": Vec<Value>,
    }
}

qapi_object! {
    /// QEMU's BlockStats. `parent` and `backing` are BlockStats themselves
    /// (described as `any` here, since the description cannot nest itself);
    /// `driver-specific` is QEMU's BlockStatsSpecific (file nodes).
    pub BlockStats {
        opt "device": String,
        opt "qdev": String,
        opt "node-name": String,
        req "stats": BlockDeviceStats,
        opt "driver-specific": Value,
        opt "parent": Value,
        opt "backing": Value,
    }
}

qapi_object! {
    /// bexd's `x-query-export-stats` entry: an export's own counters (QEMU
    /// counts nothing for exports) and its clients.
    pub ExportStats {
        req "id": String,
        req "node-name": String,
        req "connections": i64,
        req "connections-total": i64,
        req "in-flight": i64,
        req "stats": BlockDeviceStats,
    }
}

//! Draws `bexd top`'s table with ratatui: one line per export.

use ratatui::layout::Constraint;
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Row as TableRow, Table};
use ratatui::Frame;

use super::rates::Row;

const HEADER: [&str; 11] = [
    "EXPORT", "NODE", "CLIENTS", "INFLIGHT", "IOPS", "RD MiB/s", "WR MiB/s", "LAT us", "READS",
    "WRITES", "WRITTEN",
];

/// A byte count with an exact binary unit when it has one (tests read it).
pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.2} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn cells(r: &Row) -> Vec<String> {
    vec![
        r.id.clone(),
        r.node.clone(),
        r.clients.to_string(),
        r.in_flight.to_string(),
        format!("{:.0}", r.iops),
        format!("{:.1}", r.read_mib_s),
        format!("{:.1}", r.write_mib_s),
        r.latency_us.map_or("-".into(), |l| format!("{l:.1}")),
        r.read_ops.to_string(),
        r.write_ops.to_string(),
        bytes(r.written_bytes),
    ]
}

/// The whole screen: the table, titled with where it looks and how to quit.
pub fn draw(frame: &mut Frame, target: &str, rows: &[Row], status: &str) {
    let widths = [
        Constraint::Min(8),
        Constraint::Min(8),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(11),
    ];
    let header = TableRow::new(HEADER).style(Style::default().add_modifier(Modifier::BOLD));
    let table = Table::new(rows.iter().map(|r| TableRow::new(cells(r))), widths)
        .header(header)
        .block(Block::bordered().title(format!(" bexd top: {target}  {status}  (q quits) ")));
    frame.render_widget(table, frame.area());
}

//! How `bexd top` shows its rows: a table for the terminal (ratatui) and
//! the same cells as plain text for `--batch`.

use ratatui::layout::Constraint;
use ratatui::style::{Modifier, Style};
use ratatui::text::Text;
use ratatui::widgets::{Block, Borders, Cell, Row, Table};
use ratatui::Frame;

use super::sample::ExportRow;

/// Column titles, in order; every row gives a cell for each.
pub const COLUMNS: [&str; 15] = [
    "EXPORT", "NODE", "CLIENTS", "INFLIGHT", "R/s", "W/s", "R MiB/s", "W MiB/s", "R LAT us",
    "W LAT us", "READS", "WRITES", "FLUSHES", "TRIMS", "ERRORS",
];

/// The line above the table: what is watched, how often, and the totals.
pub fn title(target: &str, delay_s: f64, rows: &[ExportRow]) -> String {
    let clients: u64 = rows.iter().map(|r| r.counters.clients).sum();
    format!(
        "bexd top: {target}, every {delay_s} s, {} exports, {clients} clients",
        rows.len()
    )
}

/// One row's cells, under [`COLUMNS`]. Rates read "-" until there are two
/// readings; a latency with no completed request reads "-" too.
pub fn cells(row: &ExportRow) -> [String; 15] {
    let c = &row.counters;
    let rate = |v: Option<f64>, decimals: usize| match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "-".to_string(),
    };
    let r = row.rates;
    [
        c.id.clone(),
        c.node.clone(),
        c.clients.to_string(),
        c.in_flight.to_string(),
        rate(r.map(|r| r.read_iops), 0),
        rate(r.map(|r| r.write_iops), 0),
        rate(r.map(|r| r.read_mib_s), 1),
        rate(r.map(|r| r.write_mib_s), 1),
        rate(r.and_then(|r| r.read_latency_us), 0),
        rate(r.and_then(|r| r.write_latency_us), 0),
        c.reads.to_string(),
        c.writes.to_string(),
        c.flushes.to_string(),
        c.discards.to_string(),
        c.errors.to_string(),
    ]
}

/// The batch form: the title, then the table in aligned columns.
pub fn text(title: &str, rows: &[ExportRow]) -> String {
    let body: Vec<[String; 15]> = rows.iter().map(cells).collect();
    let widths: Vec<usize> = (0..COLUMNS.len())
        .map(|i| {
            body.iter()
                .map(|r| r[i].len())
                .chain([COLUMNS[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let padded: Vec<String> = cells
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| match i {
                // Names to the left, numbers to the right.
                0 | 1 => format!("{c:<w$}"),
                _ => format!("{c:>w$}"),
            })
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = format!("{title}\n{}\n", line(&mut COLUMNS.iter().copied()));
    for row in &body {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
        out.push('\n');
    }
    out
}

/// The terminal form: the table in a box titled with [`title`], and how to quit.
pub fn draw(frame: &mut Frame, title: &str, rows: &[ExportRow]) {
    let header = Row::new(COLUMNS.iter().enumerate().map(|(i, c)| match i {
        0 | 1 => Cell::from(*c),
        _ => Cell::from(Text::from(*c).right_aligned()),
    }))
    .style(Style::default().add_modifier(Modifier::BOLD));
    let body = rows.iter().map(|r| {
        Row::new(cells(r).into_iter().enumerate().map(|(i, c)| match i {
            0 | 1 => Cell::from(c),
            _ => Cell::from(Text::from(c).right_aligned()),
        }))
    });
    let widths = COLUMNS.iter().enumerate().map(|(i, c)| match i {
        0 | 1 => Constraint::Min(12),
        _ => Constraint::Length(c.len().max(8) as u16),
    });
    let table = Table::new(body, widths).header(header).block(
        Block::default()
            .borders(Borders::ALL)
            .title(title.to_string())
            .title_bottom(" q: quit "),
    );
    frame.render_widget(table, frame.area());
}

#[cfg(test)]
mod tests {
    use super::super::sample::{ExportCounters, Rates};
    use super::*;

    #[test]
    fn test_text_aligns_columns_and_shows_dashes_before_rates() {
        let rows = vec![
            ExportRow {
                counters: ExportCounters {
                    id: "disk0".into(),
                    node: "fmt0".into(),
                    clients: 1,
                    reads: 7,
                    writes: 10,
                    ..Default::default()
                },
                rates: None,
            },
            ExportRow {
                counters: ExportCounters {
                    id: "e1".into(),
                    node: "n".into(),
                    ..Default::default()
                },
                rates: Some(Rates {
                    read_iops: 1500.4,
                    write_iops: 0.0,
                    read_mib_s: 5.86,
                    write_mib_s: 0.0,
                    read_latency_us: Some(41.6),
                    write_latency_us: None,
                }),
            },
        ];
        let out = text(&title("/run/qmp.sock", 1.0, &rows), &rows);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "bexd top: /run/qmp.sock, every 1 s, 2 exports, 1 clients"
        );
        assert!(
            lines[1].starts_with("EXPORT  NODE  CLIENTS"),
            "{}",
            lines[1]
        );
        let first: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(first[..6], ["disk0", "fmt0", "1", "0", "-", "-"]);
        assert_eq!(first[10..], ["7", "10", "0", "0", "0"]);
        let second: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(second[4..10], ["1500", "0", "5.9", "0.0", "42", "-"]);
        // Right-aligned numbers end where their titles end.
        let end = lines[1].find("READS").unwrap() + "READS".len();
        assert_eq!(&lines[2][end - 1..end], "7");
    }
}

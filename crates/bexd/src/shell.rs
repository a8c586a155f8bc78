//! `bexd qmp SOCKET|HOST:PORT`: an interactive QMP shell for people.
//!
//! Type `command key=value ...` (values are JSON when they parse as JSON,
//! strings otherwise; dotted keys nest: `addr.type=unix`) or a raw JSON
//! command. Tab completes command names, history persists in
//! `~/.bexd_qmp_history`, replies are pretty-printed and events show up as
//! they arrive. Plain stdin works too, so it scripts like qemu.qmp's qmp-shell.

use std::time::Duration;

use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};
use serde_json::{json, Map, Value};

use crate::qmp_client::{ClientError, QmpClient};

/// How long a prompt waits for events that arrived meanwhile.
const EVENT_POLL: Duration = Duration::from_millis(20);

/// Runs the shell; returns the exit code.
pub fn main(args: &[String]) -> i32 {
    let target = match args {
        [t] if t != "-h" && t != "--help" => t,
        _ => {
            eprintln!("usage: bexd qmp SOCKET|HOST:PORT");
            return if args.iter().any(|a| a == "-h" || a == "--help") {
                0
            } else {
                1
            };
        }
    };
    match run(target) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bexd qmp: {e}");
            1
        }
    }
}

fn print_event(m: &Value) {
    let name = m["event"].as_str().unwrap_or("?");
    let data = m.get("data").map(|d| d.to_string()).unwrap_or_default();
    println!("event {name} {data}");
}

/// Completes command names; no hints, highlighting or validation.
struct CommandNames(Vec<String>);

impl Helper for CommandNames {}
impl Highlighter for CommandNames {}
impl Validator for CommandNames {}

impl Hinter for CommandNames {
    type Hint = String;
}

impl Completer for CommandNames {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let word = &line[..pos];
        if word.contains(char::is_whitespace) {
            return Ok((pos, Vec::new()));
        }
        let matches = self
            .0
            .iter()
            .filter(|c| c.starts_with(word))
            .map(|c| Pair {
                display: c.clone(),
                replacement: format!("{c} "),
            })
            .collect();
        Ok((0, matches))
    }
}

fn run(target: &str) -> Result<(), String> {
    let mut conn = QmpClient::connect(target).map_err(|e| e.to_string())?;
    let v = &conn.greeting["version"];
    println!(
        "Connected to {} ({}.{}.{})",
        v["package"].as_str().unwrap_or("?"),
        v["qemu"]["major"],
        v["qemu"]["minor"],
        v["qemu"]["micro"]
    );
    conn.execute(&json!({"execute": "qmp_capabilities"}), print_event)
        .map_err(|e| e.to_string())?;
    let names = command_names(&mut conn);
    let mut editor = Editor::new().map_err(|e| e.to_string())?;
    editor.set_helper(Some(CommandNames(names)));
    let history =
        std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".bexd_qmp_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    let outcome = repl(&mut conn, &mut editor);
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    outcome
}

fn command_names(conn: &mut QmpClient) -> Vec<String> {
    let reply = conn.command("query-commands", json!({})).ok();
    let list = reply.as_ref().and_then(|r| r.as_array());
    list.into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect()
}

fn repl(
    conn: &mut QmpClient,
    editor: &mut Editor<CommandNames, rustyline::history::DefaultHistory>,
) -> Result<(), String> {
    loop {
        conn.drain_events(EVENT_POLL, print_event)
            .map_err(|e| e.to_string())?;
        let line = match editor.readline("(bexd) ") {
            Ok(l) => l,
            Err(ReadlineError::Eof | ReadlineError::Interrupted) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        let request = match parse_line(line) {
            Ok(r) => r,
            Err(e) => {
                println!("error: {e}");
                continue;
            }
        };
        match conn.execute(&request, print_event) {
            Ok(reply) => print_reply(&reply),
            Err(ClientError::Closed) => {
                println!("connection closed");
                return Ok(());
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn print_reply(reply: &Value) {
    if let Some(err) = reply.get("error") {
        println!(
            "error: {}: {}",
            err["class"].as_str().unwrap_or("?"),
            err["desc"].as_str().unwrap_or("?")
        );
        return;
    }
    let shown = reply.get("return").unwrap_or(reply);
    println!(
        "{}",
        serde_json::to_string_pretty(shown).unwrap_or_default()
    );
}

/// `cmd a=1 b.c=x` or a raw JSON object.
pub fn parse_line(line: &str) -> Result<Value, String> {
    if line.starts_with('{') {
        return serde_json::from_str(line).map_err(|e| format!("bad JSON: {e}"));
    }
    let mut words = line.split_whitespace();
    let command = words.next().ok_or("empty command")?;
    let mut arguments = Map::new();
    for word in words {
        let (key, raw) = word
            .split_once('=')
            .ok_or_else(|| format!("expected key=value, got '{word}'"))?;
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
        insert_dotted(&mut arguments, key, value)?;
    }
    Ok(json!({"execute": command, "arguments": arguments}))
}

fn insert_dotted(map: &mut Map<String, Value>, key: &str, value: Value) -> Result<(), String> {
    match key.split_once('.') {
        None => {
            map.insert(key.to_string(), value);
            Ok(())
        }
        Some((head, rest)) => {
            let child = map.entry(head).or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(child) = child else {
                return Err(format!("'{head}' is both a value and an object"));
            };
            insert_dotted(child, rest, value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_line_types_values_and_nests_dotted_keys() {
        let v = parse_line("nbd-server-start addr.type=unix addr.data.path=/s max-connections=4")
            .unwrap();
        assert_eq!(
            v,
            json!({"execute": "nbd-server-start", "arguments": {
                "addr": {"type": "unix", "data": {"path": "/s"}}, "max-connections": 4}})
        );
    }

    #[test]
    fn test_parse_line_passes_raw_json_through() {
        let v = parse_line("{\"execute\": \"quit\"}").unwrap();
        assert_eq!(v, json!({"execute": "quit"}));
    }

    #[test]
    fn test_parse_line_rejects_bare_words() {
        assert!(parse_line("block-export-del e0").is_err());
    }
}

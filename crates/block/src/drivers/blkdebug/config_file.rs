//! QEMU's blkdebug configuration file (`config=FILE`), read as QEMU reads it:
//!
//! ```text
//! # a comment
//! [inject-error]
//! event = "l2_load"
//! errno = "5"
//! once = "on"
//!
//! [set-state]
//! event = "write_aio"
//! state = "1"
//! new_state = "2"
//! ```
//!
//! A line is empty, a comment (`#` first), a group header (`[name]` or
//! `[name "id"]`), or `key = "value"`; an unquoted value reads as empty, as
//! in QEMU. A group's keys are checked when the group ends, then the rules
//! are built, inject-error groups first; the errors are QEMU's texts.

use std::collections::HashSet;

use super::rules::{InjectError, IoType, SetState};
use crate::debug_event::DebugEvent;

const INJECT_KEYS: &[&str] = &[
    "event",
    "state",
    "iotype",
    "errno",
    "sector",
    "once",
    "immediately",
];
const SET_STATE_KEYS: &[&str] = &["event", "state", "new_state"];
const NUMBERS: &[&str] = &["state", "errno", "sector", "new_state"];
const BOOLS: &[&str] = &["once", "immediately"];

/// The rules of one file, in file order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FileRules {
    pub inject: Vec<InjectError>,
    pub set_state: Vec<SetState>,
}

#[derive(Debug)]
struct Group {
    name: String,
    keys: Vec<(String, String)>,
}

impl Group {
    fn get(&self, key: &str) -> Option<&str> {
        // QEMU keeps the last value of a key given twice.
        self.keys
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the text of a configuration file into rules.
pub fn parse(text: &str) -> Result<FileRules, String> {
    let mut groups: Vec<Group> = Vec::new();
    let mut ids = HashSet::new();
    let mut open: Option<Group> = None;
    for raw in text.split_inclusive('\n') {
        if raw.starts_with('\n') || raw.starts_with('#') {
            continue;
        }
        let line = raw.trim_end_matches('\n');
        if let Some(header) = line.strip_prefix('[') {
            if let Some((name, id)) = group_header(header) {
                if let Some(done) = open.take() {
                    check_group(&done)?;
                    groups.push(done);
                }
                if let Some(id) = id {
                    check_id(&name, &id, &mut ids)?;
                }
                open = Some(Group {
                    name,
                    keys: Vec::new(),
                });
                continue;
            }
        }
        let Some((key, value)) = key_value(line) else {
            return Err("parse error".into());
        };
        match open.as_mut() {
            Some(g) => g.keys.push((key, value)),
            None => return Err("no group defined".into()),
        }
    }
    if let Some(done) = open.take() {
        check_group(&done)?;
        groups.push(done);
    }
    let mut rules = FileRules::default();
    for g in groups.iter().filter(|g| g.name == "inject-error") {
        rules.inject.push(inject_rule(g)?);
    }
    for g in groups.iter().filter(|g| g.name == "set-state") {
        rules.set_state.push(SetState {
            event: event(g)?,
            state: number(g, "state").map_or(0, as_c_int),
            new_state: number(g, "new_state").map_or(0, as_c_int),
        });
    }
    Ok(rules)
}

/// `name]` or `name "id"]` (the text after `[`): the group and its id.
fn group_header(rest: &str) -> Option<(String, Option<String>)> {
    let name_end = rest.find(char::is_whitespace);
    if let Some(end) = name_end {
        let after = rest[end..].trim_start();
        if let Some(quoted) = after.strip_prefix('"') {
            if let Some(close) = quoted.find('"') {
                if close > 0 && quoted[close + 1..].starts_with(']') {
                    return Some((rest[..end].to_string(), Some(quoted[..close].to_string())));
                }
            }
        }
    }
    let close = rest.find(']')?;
    (close > 0).then(|| (rest[..close].to_string(), None))
}

/// `key = "value"`, `key = ""`, or `key = anything` (value ""); the key is
/// the first word, so `key="v"` is a key of its own with an empty value.
fn key_value(line: &str) -> Option<(String, String)> {
    let line = line.trim_start();
    let key_end = line.find(char::is_whitespace).unwrap_or(line.len());
    if key_end == 0 {
        return None;
    }
    let key = line[..key_end].to_string();
    let rest = line[key_end..].trim_start();
    let value = rest
        .strip_prefix('=')
        .map(str::trim_start)
        .and_then(|v| v.strip_prefix('"'))
        .and_then(|v| v.find('"').map(|end| v[..end].to_string()))
        .unwrap_or_default();
    Some((key, value))
}

fn check_id(group: &str, id: &str, seen: &mut HashSet<(String, String)>) -> Result<(), String> {
    let well_formed = id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !well_formed {
        return Err("Parameter 'id' expects an identifier".into());
    }
    if !seen.insert((group.to_string(), id.to_string())) {
        return Err(format!("Duplicate ID '{id}' for {group}"));
    }
    Ok(())
}

fn check_group(g: &Group) -> Result<(), String> {
    let allowed = match g.name.as_str() {
        "inject-error" => INJECT_KEYS,
        "set-state" => SET_STATE_KEYS,
        other => return Err(format!("There is no option group '{other}'")),
    };
    for (key, value) in &g.keys {
        if !allowed.contains(&key.as_str()) {
            return Err(format!("Invalid parameter '{key}'"));
        }
        if NUMBERS.contains(&key.as_str()) && parse_number(value).is_none() {
            return Err(format!("Parameter '{key}' expects a number"));
        }
        if BOOLS.contains(&key.as_str()) && parse_bool(value).is_none() {
            return Err(format!("Parameter '{key}' expects 'on' or 'off'"));
        }
    }
    Ok(())
}

fn inject_rule(g: &Group) -> Result<InjectError, String> {
    let event = event(g)?;
    let iotypes =
        match g.get("iotype") {
            None => IoType::DEFAULT.to_vec(),
            Some(name) => vec![IoType::from_name(name)
                .ok_or_else(|| format!("invalid parameter value: {name}"))?],
        };
    let errno = number(g, "errno").map_or(i64::from(libc::EIO), as_c_int);
    let errno = i32::try_from(errno)
        .ok()
        .filter(|e| (0..4096).contains(e))
        .ok_or_else(|| format!("Parameter 'errno' expects an errno from 0 to 4095, not {errno}"))?;
    let sector = match number(g, "sector").map(|s| s as i64) {
        None | Some(-1) => None,
        Some(s) => Some(u64::try_from(s).map_err(|_| {
            format!("Parameter 'sector' must be a sector number or -1 (any), not {s}")
        })?),
    };
    Ok(InjectError {
        event,
        state: number(g, "state").map_or(0, as_c_int),
        iotypes,
        errno,
        sector,
        once: flag(g, "once"),
        immediately: flag(g, "immediately"),
        after: 0,
    })
}

fn event(g: &Group) -> Result<DebugEvent, String> {
    let name = g.get("event").ok_or("Missing event name for rule")?;
    DebugEvent::from_name(name).ok_or_else(|| format!("invalid parameter value: {name}"))
}

fn number(g: &Group, key: &str) -> Option<u64> {
    g.get(key).and_then(parse_number)
}

fn flag(g: &Group, key: &str) -> bool {
    g.get(key).and_then(parse_bool).unwrap_or(false)
}

/// QEMU stores `state`, `errno` and `new_state` in a C `int`.
fn as_c_int(v: u64) -> i64 {
    i64::from(v as i32)
}

/// QEMU's number syntax (`strtoull` base 0: decimal, 0x hex, 0 octal, a
/// leading minus wraps around), the whole value.
fn parse_number(s: &str) -> Option<u64> {
    let t = s.trim_start();
    let (negative, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let v = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()?
    } else if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse().ok()?
    } else {
        return None;
    };
    Some(if negative { v.wrapping_neg() } else { v })
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_sections_keys_and_defaults() {
        let text = "# c\n[inject-error]\nevent = \"read_aio\"\nerrno = \"28\"\nonce = \"on\"\n\n\
                    [set-state]\nevent = \"write_aio\"\nnew_state = \"2\"\n\
                    [inject-error \"x\"]\n  event = \"l2_load\"\n  iotype = \"flush\"\n  sector = \"0x10\"\n  state = \"2\"\n";
        let r = parse(text).unwrap();
        assert_eq!(r.inject.len(), 2);
        let a = &r.inject[0];
        assert_eq!(
            (a.event, a.errno, a.once, a.state, a.sector),
            (DebugEvent::ReadAio, 28, true, 0, None)
        );
        assert_eq!(a.iotypes, IoType::DEFAULT.to_vec());
        let b = &r.inject[1];
        assert_eq!(
            (b.event, b.errno, b.sector, b.state),
            (DebugEvent::L2Load, libc::EIO, Some(16), 2)
        );
        assert_eq!(b.iotypes, vec![IoType::Flush]);
        assert_eq!(
            r.set_state,
            vec![SetState {
                event: DebugEvent::WriteAio,
                state: 0,
                new_state: 2
            }]
        );
    }

    #[test]
    fn test_qemu_errors() {
        let err = |t: &str| parse(t).unwrap_err();
        assert_eq!(
            err("[inject-error]\nevent = read_aio\n"),
            "invalid parameter value: "
        );
        assert_eq!(
            err("[inject-error]\nevent = \"bogus\"\n"),
            "invalid parameter value: bogus"
        );
        assert_eq!(
            err("[nosuch]\nevent = \"read_aio\"\n"),
            "There is no option group 'nosuch'"
        );
        assert_eq!(
            err("[inject-error]\nfoo = \"1\"\n"),
            "Invalid parameter 'foo'"
        );
        assert_eq!(
            err("[inject-error]\nerrno = \"x\"\nevent = \"read_aio\"\n"),
            "Parameter 'errno' expects a number"
        );
        assert_eq!(err("event = \"read_aio\"\n"), "no group defined");
        assert_eq!(
            err("[inject-error]\nerrno = \"5\"\n"),
            "Missing event name for rule"
        );
        assert_eq!(
            err("[inject-error]\nevent = \"read_aio\"\niotype = \"bogus\"\n"),
            "invalid parameter value: bogus"
        );
        assert_eq!(
            err("[inject-error]\nevent = \"read_aio\"\nonce = \"maybe\"\n"),
            "Parameter 'once' expects 'on' or 'off'"
        );
        assert_eq!(err("[inject-error]\n   \n"), "parse error");
        assert_eq!(
            err("[inject-error \"a\"]\nevent = \"none\"\n[inject-error \"a\"]\n"),
            "Duplicate ID 'a' for inject-error"
        );
        // A group's keys are checked when it ends, before a later parse error.
        assert_eq!(
            err("[nosuch]\n[inject-error]\n  \n"),
            "There is no option group 'nosuch'"
        );
    }

    #[test]
    fn test_set_state_without_new_state_and_sector_minus_one() {
        let r = parse("[set-state]\nevent = \"read_aio\"\n[inject-error]\nevent = \"none\"\nsector = \"-1\"\n")
            .unwrap();
        assert_eq!(r.set_state[0].new_state, 0);
        assert_eq!(r.inject[0].sector, None);
        assert!(parse("[inject-error]\nevent = \"none\"\nsector = \"-5\"\n").is_err());
    }
}

//! QEMU's keyval syntax (util/keyval.c), as the command line uses it:
//!
//! ```text
//! key-vals = [ key-val { ',' key-val } [ ',' ] ]
//! key-val  = key '=' val          (the first may be a bare val for the implied key)
//! key      = fragment { '.' fragment }   fragment: letters, digits, '-', '_'
//! val      = any characters, with ',,' standing for ','
//! ```
//! Dotted keys build nested objects; when every key of an object is a
//! decimal index the object becomes an array. Leaves are strings: the
//! visitor converts them by the type it expects. A repeated key: the last wins.

use serde_json::{Map, Value};
use thiserror::Error;

/// A syntax error, worded as QEMU words it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyvalError {
    #[error("Expected '=' after parameter '{0}'")]
    ExpectedEquals(String),
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    #[error("Parameters '{0}.*' used inconsistently")]
    Inconsistent(String),
    #[error("Parameter '{0}' missing")]
    MissingIndex(String),
}

/// Parses `input`; `implied_key` names the key of a leading bare value.
pub fn parse_keyval(input: &str, implied_key: Option<&str>) -> Result<Value, KeyvalError> {
    let mut root = Value::Object(Map::new());
    for (i, item) in split_items(input).into_iter().enumerate() {
        let (key, value) = match split_key(&item) {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match implied_key {
                Some(implied) if i == 0 => (implied.to_string(), item.clone()),
                _ => return Err(no_equals(&item)),
            },
        };
        insert(&mut root, &key, value)?;
    }
    listify(root, "")
}

/// Splits on single commas; ',,' is a literal comma. A trailing comma ends the list.
fn split_items(input: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            current.push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            current.push(',');
        } else {
            items.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() || items.is_empty() && !input.is_empty() {
        items.push(current);
    }
    items
}

/// `key=value`: the key ends at the first '=' (keys cannot contain one).
fn split_key(item: &str) -> Option<(&str, &str)> {
    let eq = item.find('=')?;
    let key = &item[..eq];
    key.chars()
        .all(is_key_char)
        .then_some((key, &item[eq + 1..]))
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn no_equals(item: &str) -> KeyvalError {
    match item.find('=') {
        Some(eq) => KeyvalError::InvalidParameter(item[..eq].to_string()),
        None if !item.is_empty() && item.chars().all(is_key_char) => {
            KeyvalError::ExpectedEquals(item.to_string())
        }
        None => KeyvalError::InvalidParameter(item.to_string()),
    }
}

fn insert(root: &mut Value, key: &str, value: String) -> Result<(), KeyvalError> {
    let fragments: Vec<&str> = key.split('.').collect();
    if fragments.iter().any(|f| f.is_empty()) {
        return Err(KeyvalError::InvalidParameter(key.to_string()));
    }
    let mut node = root;
    for (depth, fragment) in fragments.iter().enumerate() {
        let prefix = fragments[..=depth].join(".");
        let Value::Object(map) = node else {
            return Err(KeyvalError::Inconsistent(fragments[..depth].join(".")));
        };
        if depth + 1 == fragments.len() {
            if matches!(map.get(*fragment), Some(Value::Object(_))) {
                return Err(KeyvalError::Inconsistent(prefix));
            }
            map.insert(fragment.to_string(), Value::String(value));
            return Ok(());
        }
        let child = map
            .entry(fragment.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if child.is_string() {
            return Err(KeyvalError::Inconsistent(prefix));
        }
        node = child;
    }
    Ok(())
}

/// Turns objects whose keys are all indices into arrays (0..n, no gaps).
fn listify(value: Value, path: &str) -> Result<Value, KeyvalError> {
    let Value::Object(map) = value else {
        return Ok(value);
    };
    let indexed = map.keys().filter(|k| is_index(k)).count();
    if indexed > 0 && indexed != map.len() {
        return Err(KeyvalError::Inconsistent(path.to_string()));
    }
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    if indexed == 0 {
        let mut out = Map::new();
        for (k, v) in map {
            let child = listify(v, &join(&k))?;
            out.insert(k, child);
        }
        return Ok(Value::Object(out));
    }
    let mut entries: Vec<(usize, Value)> = Vec::with_capacity(map.len());
    for (k, v) in map {
        let index = k
            .parse::<usize>()
            .map_err(|_| KeyvalError::Inconsistent(path.to_string()))?;
        entries.push((index, listify(v, &join(&k))?));
    }
    entries.sort_by_key(|(i, _)| *i);
    for (expected, (index, _)) in entries.iter().enumerate() {
        if *index != expected {
            return Err(KeyvalError::MissingIndex(join(&expected.to_string())));
        }
    }
    Ok(Value::Array(entries.into_iter().map(|(_, v)| v).collect()))
}

fn is_index(key: &str) -> bool {
    !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_parse_keyval_flat_pairs() {
        let v = parse_keyval("driver=file,node-name=n0", None).unwrap();
        assert_eq!(v, json!({"driver": "file", "node-name": "n0"}));
    }

    #[test]
    fn test_parse_keyval_double_comma_escapes_comma() {
        let v = parse_keyval("filename=/a,,b.img", None).unwrap();
        assert_eq!(v, json!({"filename": "/a,b.img"}));
    }

    #[test]
    fn test_parse_keyval_dotted_keys_nest() {
        let v = parse_keyval("addr.type=inet,addr.port=10809", None).unwrap();
        assert_eq!(v, json!({"addr": {"type": "inet", "port": "10809"}}));
    }

    #[test]
    fn test_parse_keyval_indices_make_arrays() {
        let v = parse_keyval("bitmaps.1=b,bitmaps.0=a", None).unwrap();
        assert_eq!(v, json!({"bitmaps": ["a", "b"]}));
    }

    #[test]
    fn test_parse_keyval_implied_key_for_first_item() {
        let v = parse_keyval("nbd,id=e0", Some("type")).unwrap();
        assert_eq!(v, json!({"type": "nbd", "id": "e0"}));
    }

    #[test]
    fn test_parse_keyval_bare_item_without_implied_key_is_an_error() {
        let e = parse_keyval("driver=x,node-name", None).unwrap_err();
        assert_eq!(e.to_string(), "Expected '=' after parameter 'node-name'");
    }

    #[test]
    fn test_parse_keyval_empty_key_is_invalid() {
        let e = parse_keyval("=x", None).unwrap_err();
        assert_eq!(e.to_string(), "Invalid parameter ''");
    }

    #[test]
    fn test_parse_keyval_scalar_and_object_conflict() {
        let e = parse_keyval("cache=x,cache.direct=on", None).unwrap_err();
        assert_eq!(e.to_string(), "Parameters 'cache.*' used inconsistently");
    }

    #[test]
    fn test_parse_keyval_index_gap_is_reported() {
        let e = parse_keyval("bitmaps.1=a", None).unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'bitmaps.0' missing");
    }

    #[test]
    fn test_parse_keyval_trailing_comma_is_allowed() {
        let v = parse_keyval("a=1,", None).unwrap();
        assert_eq!(v, json!({"a": "1"}));
    }

    #[test]
    fn test_parse_keyval_last_duplicate_wins() {
        let v = parse_keyval("a=1,a=2", None).unwrap();
        assert_eq!(v, json!({"a": "2"}));
    }

    #[test]
    fn test_parse_keyval_value_may_contain_equals() {
        let v = parse_keyval("identity=C=GB,,O=Example", None).unwrap();
        assert_eq!(v, json!({"identity": "C=GB,O=Example"}));
    }
}

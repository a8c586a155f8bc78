//! Tests that a hand-written reader and the description beside it agree:
//! a value with every described member (one per union branch) is accepted,
//! and the same value (when an object) with one more member is refused.

use serde_json::{json, Map, Value};

use super::{Def, Describe, Schema, Ty};
use crate::visitor::{from_value, FromQapi, InputMode};

/// Beyond this depth an alternate picks its scalar form (BlockdevRef refers to itself).
const MAX_DEPTH: usize = 3;

/// Panics (in a test) when `T`'s reader and description disagree.
pub(crate) fn check<T: FromQapi + Describe>() {
    let mut s = Schema::new();
    T::define(&mut s);
    let values = samples(&s, &T::ty(), 0, true);
    assert!(!values.is_empty(), "no sample for {:?}", T::ty());
    for value in values {
        if let Err(e) = from_value::<T>(value.clone(), InputMode::Json) {
            panic!(
                "{value} has only described members but is refused: {}",
                e.desc
            );
        }
        let Value::Object(mut extra) = value.clone() else {
            continue;
        };
        extra.insert("x-undescribed".into(), json!(1));
        match from_value::<T>(Value::Object(extra), InputMode::Json) {
            Ok(_) => panic!("{value} plus an undescribed member is accepted"),
            Err(e) => assert_eq!(e.desc, "Parameter 'x-undescribed' is unexpected"),
        }
    }
}

/// Values of `ty` with every member present; `all_branches` gives one per
/// union case or alternative.
fn samples(s: &Schema, ty: &Ty, depth: usize, all_branches: bool) -> Vec<Value> {
    match ty {
        Ty::Builtin("str") => vec![json!("x")],
        Ty::Builtin("int") => vec![json!(1)],
        Ty::Builtin("bool") => vec![json!(true)],
        Ty::Builtin("null") => vec![Value::Null],
        Ty::Builtin(_) => vec![json!({})],
        Ty::Array(inner) => vec![Value::Array(samples(s, inner, depth + 1, false))],
        Ty::Named(key) => match s.defs.get(key) {
            Some(Def::Enum(values)) => values.first().map(|v| json!(v)).into_iter().collect(),
            Some(Def::Alternate(members)) if all_branches => members
                .iter()
                .flat_map(|m| samples(s, m, depth + 1, false))
                .collect(),
            Some(Def::Alternate(members)) => {
                let pick = match depth >= MAX_DEPTH {
                    true => members.iter().find(|m| matches!(m, Ty::Builtin(_))),
                    false => members.first(),
                };
                pick.map(|m| samples(s, m, depth + 1, false))
                    .unwrap_or_default()
            }
            Some(Def::Object {
                members,
                tag,
                variants,
            }) => {
                let mut base = Map::new();
                for m in members {
                    if let Some(v) = samples(s, &m.1, depth + 1, false).into_iter().next() {
                        base.insert(m.0.to_string(), v);
                    }
                }
                let Some(tag) = tag else {
                    return vec![Value::Object(base)];
                };
                let take = if all_branches { variants.len() } else { 1 };
                variants
                    .iter()
                    .take(take)
                    .map(|(case, branch)| {
                        let mut v = base.clone();
                        v.insert(tag.to_string(), json!(case));
                        for b in samples(s, branch, depth, false) {
                            v.extend(b.as_object().cloned().unwrap_or_default());
                        }
                        Value::Object(v)
                    })
                    .collect()
            }
            None => vec![],
        },
    }
}

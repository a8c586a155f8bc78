//! `throttle-group` objects: made from `limits` and the `x-*` properties,
//! read and changed with `qom-get`/`qom-set` as QEMU allows (the `limits`
//! struct at any time, the `x-*` properties only while the object is made).

use std::sync::Arc;

use block::throttle::{LimitMember, ThrottleConfig, ThrottleConfigError, ThrottleGroup};
use qmp::schema::block_core::ThrottleLimits;
use qmp::visitor::{Ctx, FromQapi, InputMode};
use serde_json::{Map, Value};

use crate::error::QomError;

const QOM_TYPE: &str = "throttle-group";

/// A member's name (without `x-`) as the `&'static str` the config wants.
fn member(name: &str) -> Option<(&'static str, LimitMember)> {
    LimitMember::ALL.iter().copied().find(|(n, _)| *n == name)
}

/// Applies the `ThrottleLimits` members given onto `config` and checks the
/// whole, as QEMU's `limits` setter does.
fn apply_limits(
    config: &mut ThrottleConfig,
    limits: &ThrottleLimits,
) -> Result<(), ThrottleConfigError> {
    for (name, value) in limits.given() {
        if let Some((name, m)) = member(name) {
            config.set_limit(name, m, value)?;
        }
    }
    config.validate()
}

/// A new group `id`: the `x-*` properties first, then `limits` (checked as
/// its setter checks it), then the whole once more (QEMU's `complete`).
/// qemu-storage-daemon sets them in that order (`x-iops-total=10` with
/// `limits.iops-total-max=20` is accepted, whichever comes first).
pub fn create(
    id: &str,
    limits: Option<&ThrottleLimits>,
    properties: &[(&'static str, i64)],
) -> Result<Arc<ThrottleGroup>, ThrottleConfigError> {
    let mut config = ThrottleConfig::default();
    for (name, value) in properties {
        if let Some((name, m)) = member(name) {
            config.set_property(name, m, *value)?;
        }
    }
    if let Some(limits) = limits {
        apply_limits(&mut config, limits)?;
    }
    config.validate()?;
    Ok(ThrottleGroup::new(id.to_string(), config))
}

fn no_such(property: &str) -> QomError {
    QomError::NoSuchProperty {
        qom_type: QOM_TYPE.into(),
        property: property.into(),
    }
}

/// `qom-get`: `type`, `limits` (every member), or one `x-*` property.
pub fn get(group: &ThrottleGroup, property: &str) -> Result<Value, QomError> {
    let config = group.config();
    match property {
        "type" => Ok(QOM_TYPE.into()),
        "limits" => {
            let all: Map<String, Value> = LimitMember::ALL
                .iter()
                .map(|(name, m)| (name.to_string(), config.get(*m).into()))
                .collect();
            Ok(Value::Object(all))
        }
        _ => property
            .strip_prefix("x-")
            .and_then(member)
            .map(|(_, m)| config.get(m).into())
            .ok_or_else(|| no_such(property)),
    }
}

/// `qom-set`: `limits` changes the members given (the others keep their
/// values) and empties the buckets; the `x-*` properties are fixed once the
/// object exists, and `type` is read-only.
pub fn set(group: &ThrottleGroup, property: &str, value: Value) -> Result<(), QomError> {
    match property {
        "type" => Err(QomError::NotWritable {
            qom_type: QOM_TYPE.into(),
            property: property.into(),
        }),
        "limits" => {
            let ctx = Ctx::root(InputMode::Json).member("limits");
            let limits = ThrottleLimits::from_qapi(value, &ctx).map_err(QomError::Value)?;
            let mut config = group.config();
            apply_limits(&mut config, &limits)?;
            group.set_config(config);
            Ok(())
        }
        p if p.strip_prefix("x-").and_then(member).is_some() => Err(QomError::SetAfterInit),
        _ => Err(no_such(property)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits(v: Value) -> ThrottleLimits {
        qmp::visitor::from_value(v, InputMode::Json).unwrap()
    }

    #[test]
    fn test_x_properties_are_set_before_limits() {
        let g = create(
            "g",
            Some(&limits(json!({"iops-total-max": 20}))),
            &[("iops-total", 10)],
        )
        .unwrap();
        assert_eq!(get(&g, "x-iops-total-max").unwrap(), json!(20));
        assert_eq!(
            create("g", None, &[("iops-total", -1)]).unwrap_err(),
            ThrottleConfigError::NegativeProperty
        );
    }

    #[test]
    fn test_qom_set_changes_only_the_members_given() {
        let g = create("g", None, &[("iops-total", 10), ("iops-size", 4096)]).unwrap();
        set(&g, "limits", json!({"bps-total": 1000})).unwrap();
        let all = get(&g, "limits").unwrap();
        assert_eq!(
            (&all["iops-total"], &all["iops-size"], &all["bps-total"]),
            (&json!(10), &json!(4096), &json!(1000))
        );
        assert_eq!(all.as_object().unwrap().len(), 19);
        let e = set(&g, "limits", json!({"iops-read": 1})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(get(&g, "x-iops-read").unwrap(), json!(0));
    }

    #[test]
    fn test_qom_set_refusals_name_the_property() {
        let g = create("g", None, &[]).unwrap();
        assert_eq!(
            set(&g, "x-iops-total", json!(5)).unwrap_err(),
            QomError::SetAfterInit
        );
        assert_eq!(
            set(&g, "type", json!("x")).unwrap_err().to_string(),
            "Property 'throttle-group.type' is not writable"
        );
        assert_eq!(
            get(&g, "bogus").unwrap_err().to_string(),
            "Property 'throttle-group.bogus' not found"
        );
        assert_eq!(
            set(&g, "limits", json!(5)).unwrap_err().to_string(),
            "Invalid parameter type for 'limits', expected: object"
        );
        assert_eq!(
            set(&g, "limits", json!({"bogus": 1}))
                .unwrap_err()
                .to_string(),
            "Parameter 'limits.bogus' is unexpected"
        );
    }
}

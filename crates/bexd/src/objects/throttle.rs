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

//! Typed QAPI values from a JSON tree, the way QEMU's input visitors read them.
//!
//! Arguments arrive either as JSON (QMP, `--opt '{...}'`: types must match)
//! or as keyval (`--opt a=1,b=on`: every leaf is a string, converted by the
//! type the schema expects). Struct types read their members in schema order
//! with [`Fields`], so a missing member is reported before an unexpected one,
//! and every message names the member by its full path, as QEMU does.
//!
//! This is deliberately not serde: keyval's conversions depend on the
//! expected type, and QEMU's error texts need the member path.

use serde_json::{Map, Value};

use crate::QmpError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputMode {
    Json,
    Keyval,
}

/// Where in the input a value sits: the mode and the member path.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub mode: InputMode,
    pub path: String,
}

impl Ctx {
    pub fn root(mode: InputMode) -> Self {
        Self {
            mode,
            path: String::new(),
        }
    }

    pub fn member(&self, key: &str) -> Self {
        let path = match self.path.is_empty() {
            true => key.to_string(),
            false => format!("{}.{key}", self.path),
        };
        Self {
            mode: self.mode,
            path,
        }
    }

    pub fn element(&self, index: usize) -> Self {
        Self {
            mode: self.mode,
            path: format!("{}[{index}]", self.path),
        }
    }

    fn shown(&self) -> &str {
        if self.path.is_empty() {
            "null"
        } else {
            &self.path
        }
    }

    pub fn invalid_type(&self, expected: &str) -> QmpError {
        QmpError::generic(format!(
            "Invalid parameter type for '{}', expected: {expected}",
            self.shown()
        ))
    }

    pub fn expects(&self, what: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{}' expects {what}", self.shown()))
    }

    pub fn bad_value(&self, value: &str) -> QmpError {
        QmpError::generic(format!(
            "Parameter '{}' does not accept value '{value}'",
            self.shown()
        ))
    }
}

/// A type that can be read from QAPI input.
pub trait FromQapi: Sized {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError>;
}

/// Reads a whole argument tree as `T`.
pub fn from_value<T: FromQapi>(value: Value, mode: InputMode) -> Result<T, QmpError> {
    T::from_qapi(value, &Ctx::root(mode))
}

/// The members of one struct, consumed in schema order.
#[derive(Debug)]
pub struct Fields {
    map: Map<String, Value>,
    ctx: Ctx,
}

impl Fields {
    pub fn new(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        match value {
            Value::Object(map) => Ok(Self {
                map,
                ctx: ctx.clone(),
            }),
            _ => Err(ctx.invalid_type("object")),
        }
    }

    pub fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    pub fn required<T: FromQapi>(&mut self, key: &str) -> Result<T, QmpError> {
        let ctx = self.ctx.member(key);
        match self.map.remove(key) {
            Some(v) => T::from_qapi(v, &ctx),
            None => Err(QmpError::generic(format!(
                "Parameter '{}' is missing",
                ctx.path
            ))),
        }
    }

    pub fn optional<T: FromQapi>(&mut self, key: &str) -> Result<Option<T>, QmpError> {
        let ctx = self.ctx.member(key);
        self.map
            .remove(key)
            .map(|v| T::from_qapi(v, &ctx))
            .transpose()
    }

    /// A discriminator's value without consuming it (flat unions read it first).
    pub fn peek_str(&self, key: &str) -> Option<&str> {
        self.map.get(key).and_then(Value::as_str)
    }

    /// The first member not read yet, if any.
    pub fn first_left(&self) -> Option<&str> {
        self.map.keys().next().map(String::as_str)
    }

    /// Everything left over is an unexpected member.
    pub fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            Some(key) => Err(QmpError::generic(format!(
                "Parameter '{}' is unexpected",
                self.ctx.member(key).path
            ))),
            None => Ok(()),
        }
    }

    /// Drops the remaining members (for branches bexd does not implement).
    pub fn discard_rest(self) {}
}

impl FromQapi for Value {
    fn from_qapi(value: Value, _ctx: &Ctx) -> Result<Self, QmpError> {
        Ok(value)
    }
}

impl FromQapi for String {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        match value {
            Value::String(s) => Ok(s),
            _ => Err(ctx.invalid_type("string")),
        }
    }
}

impl FromQapi for bool {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        match (ctx.mode, value) {
            (_, Value::Bool(b)) => Ok(b),
            (InputMode::Keyval, Value::String(s)) => match s.as_str() {
                "on" | "yes" | "true" => Ok(true),
                "off" | "no" | "false" => Ok(false),
                _ => Err(ctx.expects("'on' or 'off'")),
            },
            _ => Err(ctx.invalid_type("boolean")),
        }
    }
}

/// Reads an integer in i128 so every QAPI integer type can range-check it.
fn integer(value: Value, ctx: &Ctx) -> Result<i128, QmpError> {
    match (ctx.mode, value) {
        (_, Value::Number(n)) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .ok_or_else(|| ctx.invalid_type("integer")),
        (InputMode::Keyval, Value::String(s)) => {
            parse_int(&s).ok_or_else(|| ctx.expects("integer"))
        }
        _ => Err(ctx.invalid_type("integer")),
    }
}

fn parse_int(s: &str) -> Option<i128> {
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let magnitude = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => i128::from_str_radix(hex, 16).ok()?,
        None if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse().ok()?
        }
        None => return None,
    };
    Some(if negative { -magnitude } else { magnitude })
}

/// A JSON value as QEMU's input visitor reads every unsigned type first,
/// as uint64: a number that fits, or one that fits int64 taken as its
/// two's complement (QEMU keeps accepting negative values "for backward
/// compatibility": -1 is 2^64-1); anything else (not a number, a fraction,
/// out of both ranges) "expects uint64".
fn json_uint64(value: &Value, ctx: &Ctx) -> Result<u64, QmpError> {
    value
        .as_u64()
        .or_else(|| value.as_i64().map(|n| n as u64))
        .ok_or_else(|| ctx.expects("uint64"))
}

macro_rules! int_type {
    ($t:ty, $name:expr, $unsigned:expr) => {
        impl FromQapi for $t {
            fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
                // QEMU reads every unsigned type as uint64 first, then checks
                // the narrower type's range ("expects uint32_t").
                let n = match $unsigned && ctx.mode == InputMode::Json {
                    true => i128::from(json_uint64(&value, ctx)?),
                    false => integer(value, ctx)?,
                };
                <$t>::try_from(n).map_err(|_| ctx.expects($name))
            }
        }
    };
}

int_type!(u16, "uint16_t", true);
int_type!(u32, "uint32_t", true);
int_type!(u64, "uint64_t", true);
int_type!(i32, "int32_t", false);
int_type!(i64, "int64_t", false);

/// QAPI's `size`: bytes; keyval accepts k/M/G/T/P/E suffixes (powers of 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromQapi for Size {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let expects = || {
            ctx.expects(
                "a non-negative number below 2^64 with an optional k, M, G, T, P or E suffix",
            )
        };
        match (ctx.mode, value) {
            (InputMode::Keyval, Value::String(s)) => parse_size(&s).map(Size).ok_or_else(expects),
            (_, Value::Number(n)) => n.as_u64().map(Size).ok_or_else(expects),
            _ => Err(ctx.invalid_type("integer")),
        }
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        "E" => 60,
        _ => return None,
    };
    if number.contains('.') {
        let v: f64 = number.parse().ok()?;
        let bytes = v * (1u64 << shift) as f64;
        return (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64)
            .then_some(bytes as u64);
    }
    number.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

impl<T: FromQapi> FromQapi for Vec<T> {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        match value {
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| T::from_qapi(v, &ctx.element(i)))
                .collect(),
            _ => Err(ctx.invalid_type("array")),
        }
    }
}

/// Reads an enum member's string and checks it against the allowed values.
pub fn enum_str(value: Value, ctx: &Ctx, allowed: &[&str]) -> Result<String, QmpError> {
    let s = String::from_qapi(value, ctx)?;
    match allowed.contains(&s.as_str()) {
        true => Ok(s),
        false => Err(ctx.bad_value(&s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keyval() -> Ctx {
        Ctx::root(InputMode::Keyval).member("x")
    }

    fn json_ctx() -> Ctx {
        Ctx::root(InputMode::Json).member("x")
    }

    #[test]
    fn test_bool_from_keyval_on() {
        assert_eq!(bool::from_qapi(json!("on"), &keyval()), Ok(true));
    }

    #[test]
    fn test_bool_from_keyval_garbage_expects_on_or_off() {
        let e = bool::from_qapi(json!("maybe"), &keyval()).unwrap_err();
        assert_eq!(e.desc, "Parameter 'x' expects 'on' or 'off'");
    }

    #[test]
    fn test_bool_from_json_string_is_a_type_error() {
        let e = bool::from_qapi(json!("yes"), &json_ctx()).unwrap_err();
        assert_eq!(e.desc, "Invalid parameter type for 'x', expected: boolean");
    }

    #[test]
    fn test_u32_out_of_range() {
        let e = u32::from_qapi(json!("99999999999"), &keyval()).unwrap_err();
        assert_eq!(e.desc, "Parameter 'x' expects uint32_t");
    }

    /// As qemu-storage-daemon 10.0 answers block-set-write-threshold.
    #[test]
    fn test_json_unsigned_reads_as_qemus_uint64() {
        let ctx = json_ctx();
        assert_eq!(u64::from_qapi(json!(-1), &ctx).unwrap(), u64::MAX);
        assert_eq!(u64::from_qapi(json!(i64::MIN), &ctx).unwrap(), 1 << 63);
        assert_eq!(u64::from_qapi(json!(u64::MAX), &ctx).unwrap(), u64::MAX);
        for bad in [json!(1.5), json!(18446744073709551616.0), json!("1")] {
            let e = u64::from_qapi(bad, &ctx).unwrap_err();
            assert_eq!(e.desc, "Parameter 'x' expects uint64");
        }
        let e = u32::from_qapi(json!(-1), &ctx).unwrap_err();
        assert_eq!(e.desc, "Parameter 'x' expects uint32_t");
    }

    #[test]
    fn test_u32_keyval_not_a_number() {
        let e = u32::from_qapi(json!("abc"), &keyval()).unwrap_err();
        assert_eq!(e.desc, "Parameter 'x' expects integer");
    }

    #[test]
    fn test_u64_keyval_hex() {
        assert_eq!(u64::from_qapi(json!("0x10"), &keyval()), Ok(16));
    }

    #[test]
    fn test_size_suffixes() {
        assert_eq!(Size::from_qapi(json!("1G"), &keyval()), Ok(Size(1 << 30)));
        assert_eq!(Size::from_qapi(json!("1.5k"), &keyval()), Ok(Size(1536)));
    }

    #[test]
    fn test_fields_missing_member_has_full_path() {
        let ctx = Ctx::root(InputMode::Json).member("addr");
        let mut f = Fields::new(json!({}), &ctx).unwrap();
        let e = f.required::<String>("path").unwrap_err();
        assert_eq!(e.desc, "Parameter 'addr.path' is missing");
    }

    #[test]
    fn test_fields_leftover_is_unexpected() {
        let mut f =
            Fields::new(json!({"a": "1", "bogus": 1}), &Ctx::root(InputMode::Json)).unwrap();
        let _: String = f.required("a").unwrap();
        assert_eq!(
            f.finish().unwrap_err().desc,
            "Parameter 'bogus' is unexpected"
        );
    }

    #[test]
    fn test_vec_elements_have_indexed_paths() {
        let e = Vec::<String>::from_qapi(json!(["a", 1]), &json_ctx()).unwrap_err();
        assert_eq!(
            e.desc,
            "Invalid parameter type for 'x[1]', expected: string"
        );
    }
}

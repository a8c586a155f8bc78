//! The macros that declare a QAPI type once: from one member list they give
//! the Rust type, its reader ([`FromQapi`](crate::visitor::FromQapi)) and its
//! introspection entry ([`Describe`](crate::introspect::Describe)).
//!
//! Members are listed in QEMU's schema order, which is the order they are read
//! in (a missing member is reported before an unexpected one, and the first
//! bad member wins) and the order `query-qmp-schema` lists them in. Each is
//! `req "wire-name" field: Type` or `opt "wire-name" field: Type` (the field
//! is then an `Option<Type>`).
//!
//! Types whose readers are irregular (flat unions, alternates, legacy forms)
//! implement the two traits by hand, side by side, with a test that the
//! reader accepts every described member (see `introspect::samples`).

/// Declares a QAPI struct: the Rust struct, its reader and its description.
#[macro_export]
macro_rules! qapi_struct {
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$fattr:meta])* $kind:ident $wire:literal $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$attr])*
        $vis struct $name {
            $( $(#[$fattr])* pub $field: $crate::__qapi_field_type!($kind $ty), )*
        }

        impl $name {
            /// Reads the members from `f` in schema order, leaving the rest
            /// (a flat union reads its branch this way).
            pub fn read_members(
                f: &mut $crate::visitor::Fields,
            ) -> Result<Self, $crate::QmpError> {
                Ok(Self { $( $field: $crate::__qapi_read!($kind f, $wire), )* })
            }
        }

        impl $crate::visitor::FromQapi for $name {
            fn from_qapi(
                value: serde_json::Value,
                ctx: &$crate::visitor::Ctx,
            ) -> Result<Self, $crate::QmpError> {
                let mut f = $crate::visitor::Fields::new(value, ctx)?;
                let r = Self::read_members(&mut f)?;
                f.finish()?;
                Ok(r)
            }
        }

        $crate::__qapi_describe_object!($name { $( $kind $wire : $ty ),* });
    };
}

/// Declares a type only to describe it: the objects bexd returns or emits
/// (built with `json!`) are named in the schema but never read. The Rust type
/// is uninhabited: it exists to carry the description.
#[macro_export]
macro_rules! qapi_object {
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident { $( $kind:ident $wire:literal : $ty:ty ),* $(,)? }
    ) => {
        $(#[$attr])*
        $vis enum $name {}

        $crate::__qapi_describe_object!($name { $( $kind $wire : $ty ),* });
    };
}

/// Declares a QAPI enum as a Rust enum with its wire names. `advertises [..]`
/// limits what introspection lists to the values bexd implements, when the
/// reader knows more (to refuse them with a clearer message than QEMU's
/// "does not accept value").
#[macro_export]
macro_rules! qapi_enum {
    (
        $(#[$doc:meta])* $name:ident { $($variant:ident = $wire:expr),* $(,)? }
        $(advertises [$($adv:expr),* $(,)?])?
    ) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($variant),* }

        impl $name {
            pub const NAMES: &'static [&'static str] = &[$($wire),*];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $wire),* }
            }
        }

        impl $crate::visitor::FromQapi for $name {
            fn from_qapi(value: serde_json::Value, ctx: &$crate::visitor::Ctx) -> Result<Self, $crate::QmpError> {
                let s = $crate::visitor::enum_str(value, ctx, Self::NAMES)?;
                match s.as_str() {
                    $($wire => Ok(Self::$variant),)*
                    other => Err(ctx.bad_value(other)),
                }
            }
        }

        impl $crate::introspect::Describe for $name {
            fn ty() -> $crate::introspect::Ty {
                $crate::introspect::Ty::Named(stringify!($name))
            }
            fn define(s: &mut $crate::introspect::Schema) {
                let names: &[&'static str] =
                    $crate::__qapi_advertised!(Self::NAMES $(; $($adv),*)?);
                s.enumeration(stringify!($name), names.to_vec());
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __qapi_describe_object {
    ($name:ident { $( $kind:ident $wire:literal : $ty:ty ),* }) => {
        impl $crate::introspect::Describe for $name {
            fn ty() -> $crate::introspect::Ty {
                $crate::introspect::Ty::Named(stringify!($name))
            }
            fn define(s: &mut $crate::introspect::Schema) {
                if s.defines(stringify!($name)) {
                    return;
                }
                s.object(
                    stringify!($name),
                    vec![$(
                        $crate::introspect::Member(
                            $wire,
                            <$ty as $crate::introspect::Describe>::ty(),
                            $crate::__qapi_optional!($kind),
                        )
                    ),*],
                );
                $( <$ty as $crate::introspect::Describe>::define(s); )*
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __qapi_advertised {
    ($all:expr) => {
        $all
    };
    ($all:expr; $($adv:expr),*) => {
        &[$($adv),*]
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __qapi_field_type {
    (req $ty:ty) => { $ty };
    (opt $ty:ty) => { Option<$ty> };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __qapi_read {
    (req $f:ident, $wire:literal) => {
        $f.required($wire)?
    };
    (opt $f:ident, $wire:literal) => {
        $f.optional($wire)?
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __qapi_optional {
    (req) => {
        false
    };
    (opt) => {
        true
    };
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::introspect::{Describe, Schema};
    use crate::visitor::{from_value, InputMode};

    qapi_struct! {
        #[derive(Debug)]
        struct Pair {
            req "first" first: String,
            opt "second" second: u32,
        }
    }

    #[test]
    fn test_struct_is_read_and_described_in_member_order() {
        let p = from_value::<Pair>(json!({"first": "a"}), InputMode::Json).unwrap();
        assert_eq!((p.first.as_str(), p.second), ("a", None));
        let e = from_value::<Pair>(json!({"second": "x"}), InputMode::Json).unwrap_err();
        assert_eq!(e.desc, "Parameter 'first' is missing");
        let e = from_value::<Pair>(
            json!({"first": "a", "second": "x", "z": 1}),
            InputMode::Json,
        )
        .unwrap_err();
        assert_eq!(e.desc, "Parameter 'second' expects uint64");
        let mut s = Schema::new();
        s.command(
            "c",
            Pair::ty(),
            crate::introspect::named(crate::introspect::EMPTY),
            &[],
        );
        Pair::define(&mut s);
        let v = s.render();
        let pair = v
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["meta-type"] == "object" && e["members"].as_array().unwrap().len() == 2)
            .unwrap();
        assert_eq!(
            pair["members"],
            json!([{"name": "first", "type": "str"}, {"name": "second", "type": "int", "default": null}])
        );
    }
}

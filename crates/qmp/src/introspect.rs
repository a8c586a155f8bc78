//! `query-qmp-schema`: QEMU's introspection format (qapi/introspect.json).
//!
//! A schema is described with readable type keys; [`Schema::render`] emits
//! the SchemaInfo list the way QEMU does, with non-builtin types given
//! opaque numeric names and `default: null` on optional members. Tools such
//! as libvirt probe features by walking it (`block-export-add/arg-type/...`).

#[cfg(test)]
pub(crate) mod agreement;

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// A member's type: a builtin (`str`, `int`, `bool`, `any`...), a named type
/// defined in the schema, or an array of either.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ty {
    Builtin(&'static str),
    Named(&'static str),
    Array(Box<Ty>),
}

pub fn str() -> Ty {
    Ty::Builtin("str")
}
pub fn int() -> Ty {
    Ty::Builtin("int")
}
pub fn bool() -> Ty {
    Ty::Builtin("bool")
}
pub fn any() -> Ty {
    Ty::Builtin("any")
}
pub fn named(key: &'static str) -> Ty {
    Ty::Named(key)
}
pub fn array(t: Ty) -> Ty {
    Ty::Array(Box::new(t))
}

/// An object member: name, type, optional.
#[derive(Clone, Debug)]
pub struct Member(pub &'static str, pub Ty, pub bool);

pub fn req(name: &'static str, ty: Ty) -> Member {
    Member(name, ty, false)
}
pub fn opt(name: &'static str, ty: Ty) -> Member {
    Member(name, ty, true)
}

#[derive(Clone, Debug)]
enum Def {
    Object {
        members: Vec<Member>,
        tag: Option<&'static str>,
        variants: Vec<(&'static str, Ty)>,
    },
    Enum(Vec<&'static str>),
    Alternate(Vec<Ty>),
}

#[derive(Clone, Debug)]
struct Entry {
    name: &'static str,
    kind: &'static str,
    arg: Ty,
    ret: Option<Ty>,
    features: Vec<&'static str>,
}

/// The schema under construction.
#[derive(Debug, Default)]
pub struct Schema {
    defs: BTreeMap<&'static str, Def>,
    entries: Vec<Entry>,
}

/// The key of the empty object, used for commands without arguments or result.
pub const EMPTY: &str = "Empty";

impl Schema {
    pub fn new() -> Self {
        let mut s = Self::default();
        s.object(EMPTY, vec![]);
        s
    }

    pub fn object(&mut self, key: &'static str, members: Vec<Member>) -> &mut Self {
        let def = Def::Object {
            members,
            tag: None,
            variants: vec![],
        };
        self.defs.insert(key, def);
        self
    }

    /// A flat union: base members, the tag member, and per-case variant objects.
    pub fn union(
        &mut self,
        key: &'static str,
        members: Vec<Member>,
        tag: &'static str,
        variants: Vec<(&'static str, Ty)>,
    ) -> &mut Self {
        let def = Def::Object {
            members,
            tag: Some(tag),
            variants,
        };
        self.defs.insert(key, def);
        self
    }

    /// Whether `key` is defined already (a [`Describe::define`] stops there,
    /// which also ends the recursion of self-referring types such as BlockdevRef).
    pub fn defines(&self, key: &str) -> bool {
        self.defs.contains_key(key)
    }

    pub fn enumeration(&mut self, key: &'static str, values: Vec<&'static str>) -> &mut Self {
        self.defs.insert(key, Def::Enum(values));
        self
    }

    pub fn alternate(&mut self, key: &'static str, members: Vec<Ty>) -> &mut Self {
        self.defs.insert(key, Def::Alternate(members));
        self
    }

    pub fn command(
        &mut self,
        name: &'static str,
        arg: Ty,
        ret: Ty,
        features: &[&'static str],
    ) -> &mut Self {
        self.entries.push(Entry {
            name,
            kind: "command",
            arg,
            ret: Some(ret),
            features: features.to_vec(),
        });
        self
    }

    pub fn event(&mut self, name: &'static str, arg: Ty) -> &mut Self {
        self.entries.push(Entry {
            name,
            kind: "event",
            arg,
            ret: None,
            features: vec![],
        });
        self
    }

    /// The SchemaInfo list. Types are numbered in the order they are first reached.
    pub fn render(&self) -> Value {
        let mut r = Renderer {
            schema: self,
            names: BTreeMap::new(),
            out: Vec::new(),
            emitted: Vec::new(),
        };
        for e in &self.entries {
            let mut v = Map::new();
            v.insert("name".into(), json!(e.name));
            v.insert("meta-type".into(), json!(e.kind));
            v.insert("arg-type".into(), json!(r.type_name(&e.arg)));
            if let Some(ret) = &e.ret {
                v.insert("ret-type".into(), json!(r.type_name(ret)));
            }
            if !e.features.is_empty() {
                v.insert("features".into(), json!(e.features));
            }
            r.out.push(Value::Object(v));
        }
        r.finish()
    }
}

/// A QAPI type as introspection describes it. Readers implement it beside
/// their [`FromQapi`](crate::visitor::FromQapi), so a command's schema entry
/// names Rust types and cannot drift from what the command reads.
pub trait Describe {
    /// How a member or command refers to the type.
    fn ty() -> Ty;
    /// Adds the type's definition and those of the types it refers to.
    fn define(_s: &mut Schema) {}
}

/// Defines `T` in `s` and names it: what a command's arg-type or ret-type is.
pub fn describe<T: Describe>(s: &mut Schema) -> Ty {
    T::define(s);
    T::ty()
}

macro_rules! builtin {
    ($name:literal: $($t:ty),*) => {
        $(impl Describe for $t {
            fn ty() -> Ty {
                Ty::Builtin($name)
            }
        })*
    };
}

// QEMU's introspection folds every integer type (and `size`) into `int`.
builtin!("str": String);
builtin!("bool": bool);
builtin!("int": i64, i32, u16, u32, u64, crate::visitor::Size);
builtin!("any": Value);

impl<T: Describe> Describe for Vec<T> {
    fn ty() -> Ty {
        array(T::ty())
    }
    fn define(s: &mut Schema) {
        T::define(s)
    }
}

/// The empty object: the arguments of commands that take none, and the
/// return of commands that return nothing.
pub enum Empty {}

impl Describe for Empty {
    fn ty() -> Ty {
        named(EMPTY)
    }
}

struct Renderer<'a> {
    schema: &'a Schema,
    names: BTreeMap<String, String>,
    out: Vec<Value>,
    emitted: Vec<String>,
}

impl Renderer<'_> {
    /// The wire name of a type, emitting its definition the first time.
    fn type_name(&mut self, ty: &Ty) -> String {
        match ty {
            Ty::Builtin(b) => {
                self.emit_builtin(b);
                b.to_string()
            }
            Ty::Array(inner) => {
                let element = self.type_name(inner);
                let name = format!("[{element}]");
                if !self.emitted.contains(&name) {
                    self.emitted.push(name.clone());
                    self.out
                        .push(json!({"name": name, "meta-type": "array", "element-type": element}));
                }
                name
            }
            Ty::Named(key) => self.named(key),
        }
    }

    fn emit_builtin(&mut self, b: &str) {
        if self.emitted.iter().any(|e| e == b) {
            return;
        }
        self.emitted.push(b.to_string());
        let json_type = match b {
            "str" => "string",
            "int" => "int",
            "bool" => "boolean",
            "number" => "number",
            "null" => "null",
            _ => "value",
        };
        self.out
            .push(json!({"name": b, "meta-type": "builtin", "json-type": json_type}));
    }

    fn named(&mut self, key: &str) -> String {
        if let Some(n) = self.names.get(key) {
            return n.clone();
        }
        let name = self.names.len().to_string();
        self.names.insert(key.to_string(), name.clone());
        let Some(def) = self.schema.defs.get(key).cloned() else {
            return name;
        };
        let entry = match def {
            Def::Enum(values) => json!({
                "name": name, "meta-type": "enum", "values": values,
                "members": values.iter().map(|v| json!({"name": v})).collect::<Vec<_>>(),
            }),
            Def::Alternate(members) => {
                let members: Vec<Value> = members
                    .iter()
                    .map(|t| json!({"type": self.type_name(t)}))
                    .collect();
                json!({"name": name, "meta-type": "alternate", "members": members})
            }
            Def::Object {
                members,
                tag,
                variants,
            } => {
                let members: Vec<Value> = members.iter().map(|m| self.member(m)).collect();
                let mut v = json!({"name": name, "meta-type": "object", "members": members});
                if let Some(tag) = tag {
                    let variants: Vec<Value> = variants
                        .iter()
                        .map(|(case, ty)| json!({"case": case, "type": self.type_name(ty)}))
                        .collect();
                    v["tag"] = json!(tag);
                    v["variants"] = json!(variants);
                }
                v
            }
        };
        self.out.push(entry);
        name
    }

    fn member(&mut self, m: &Member) -> Value {
        let mut v = json!({"name": m.0, "type": self.type_name(&m.1)});
        if m.2 {
            v["default"] = Value::Null;
        }
        v
    }

    fn finish(self) -> Value {
        Value::Array(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_render_numbers_types_and_marks_optional_members() {
        let mut s = Schema::new();
        s.object("Args", vec![req("id", str()), opt("mode", named("Mode"))]);
        s.enumeration("Mode", vec!["safe", "hard"]);
        s.command("del", named("Args"), named(EMPTY), &[]);
        let v = s.render();
        let list = v.as_array().unwrap();
        let cmd = list.iter().find(|e| e["name"] == "del").unwrap();
        let args = list.iter().find(|e| e["name"] == cmd["arg-type"]).unwrap();
        assert_eq!(args["members"][1]["default"], Value::Null);
        assert!(args["members"][0].get("default").is_none());
        let mode = list
            .iter()
            .find(|e| e["name"] == args["members"][1]["type"])
            .unwrap();
        assert_eq!(mode["values"], json!(["safe", "hard"]));
    }

    #[test]
    fn test_render_union_variants_point_at_branch_objects() {
        let mut s = Schema::new();
        s.union(
            "U",
            vec![req("type", named("T"))],
            "type",
            vec![("nbd", named("Nbd"))],
        );
        s.enumeration("T", vec!["nbd"]);
        s.object("Nbd", vec![opt("name", str())]);
        s.command("add", named("U"), named(EMPTY), &["deprecated"]);
        let v = s.render();
        let list = v.as_array().unwrap();
        let u = list.iter().find(|e| e["tag"] == "type").unwrap();
        let branch = list
            .iter()
            .find(|e| e["name"] == u["variants"][0]["type"])
            .unwrap();
        assert_eq!(branch["members"][0]["name"], "name");
        let add = list.iter().find(|e| e["name"] == "add").unwrap();
        assert_eq!(add["features"], json!(["deprecated"]));
    }
}

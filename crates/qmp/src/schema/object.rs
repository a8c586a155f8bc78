//! qapi/qom.json: the user-creatable objects bexd knows (`object-add`, `--object`).

use serde_json::Value;

use crate::introspect::{
    any, bool, describe, int, named, opt, req, str, Describe, Member, Schema, Ty,
};
use crate::schema::block_core::ThrottleLimits;
use crate::visitor::{Ctx, Fields, FromQapi};
use crate::{qapi_enum, qapi_struct, QmpError};

qapi_enum!(QAuthZListPolicy { Deny = "deny", Allow = "allow" });
qapi_enum!(QAuthZListFormat { Exact = "exact", Glob = "glob" });
qapi_enum!(QCryptoSecretFormat { Raw = "raw", Base64 = "base64" });
qapi_enum!(QCryptoTLSCredsEndpoint { Client = "client", Server = "server" });

/// The members every `tls-creds-*` object has (QEMU's `TlsCredsProperties`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCredsCommon {
    pub verify_peer: Option<bool>,
    pub dir: Option<String>,
    pub endpoint: Option<QCryptoTLSCredsEndpoint>,
    /// A GnuTLS priority string: accepted for compatibility, see docs/architecture.md.
    pub priority: Option<String>,
}

impl TlsCredsCommon {
    fn read(f: &mut Fields) -> Result<Self, QmpError> {
        Ok(Self {
            verify_peer: f.optional("verify-peer")?,
            dir: f.optional("dir")?,
            endpoint: f.optional("endpoint")?,
            priority: f.optional("priority")?,
        })
    }
}

qapi_struct! {
    /// One `authz-list` rule.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct QAuthZListRule {
        req "match" r#match: String,
        req "policy" policy: QAuthZListPolicy,
        opt "format" format: QAuthZListFormat,
    }
}

qapi_struct! {
    /// QEMU's InetSocketAddressBase: where `metrics-http` listens (the other
    /// InetSocketAddress members are not taken, so they are refused).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct InetSocketAddressBase {
        req "host" host: String,
        req "port" port: String,
    }
}

/// The object-specific properties, by `qom-type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectProps {
    AuthzSimple {
        identity: String,
    },
    AuthzList {
        policy: Option<QAuthZListPolicy>,
        rules: Option<Vec<QAuthZListRule>>,
    },
    AuthzListFile {
        filename: String,
        refresh: Option<bool>,
    },
    Iothread,
    /// `main-loop`: the event loop's thread pool (QEMU's EventLoopBaseProperties).
    MainLoop {
        thread_pool_min: Option<i64>,
        thread_pool_max: Option<i64>,
        aio_max_batch: Option<i64>,
    },
    /// `tls-creds-x509`: certificates in `dir` (ca-cert.pem, server-cert.pem, ...).
    TlsCredsX509 {
        common: TlsCredsCommon,
        sanity_check: Option<bool>,
        passwordid: Option<String>,
    },
    /// `tls-creds-psk`: pre-shared keys in `dir/keys.psk`.
    TlsCredsPsk {
        common: TlsCredsCommon,
        username: Option<String>,
    },
    /// bexd's own `metrics-http`: a Prometheus endpoint on `addr`.
    MetricsHttp {
        addr: InetSocketAddressBase,
    },
    /// `secret`: a password or key, given inline (`data`) or in a file; with
    /// `keyid` it is itself encrypted with another secret (bexd refuses that).
    Secret {
        data: Option<String>,
        file: Option<String>,
        format: Option<QCryptoSecretFormat>,
        keyid: Option<String>,
        iv: Option<String>,
    },
    /// `throttle-group`: I/O limits shared by throttle nodes, as the
    /// `limits` struct and as the `x-*` properties (their names without
    /// the `x-`, with the values given).
    ThrottleGroup {
        limits: Option<Box<ThrottleLimits>>,
        properties: Vec<(&'static str, i64)>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectOptions {
    pub qom_type: String,
    pub id: String,
    pub props: ObjectProps,
}

/// The `qom-type` values bexd accepts (QEMU spells the list file both ways).
pub const OBJECT_TYPES: &[&str] = &[
    "authz-list",
    "authz-list-file",
    "authz-listfile",
    "authz-simple",
    "iothread",
    "main-loop",
    "metrics-http",
    "secret",
    "throttle-group",
    "tls-creds-psk",
    "tls-creds-x509",
];

/// The iothread properties: accepted and range-checked, not acted on (bexd
/// serves every export from its own runtime).
const IOTHREAD_MEMBERS: &[&str] = &[
    "poll-max-ns",
    "poll-grow",
    "poll-shrink",
    "aio-max-batch",
    "thread-pool-min",
    "thread-pool-max",
];

/// The throttle-group properties after `limits`: ThrottleLimits' members with
/// `x-` in front, in QEMU's order (ThrottleGroupProperties).
const THROTTLE_GROUP_MEMBERS: [&str; 19] = [
    "x-iops-total",
    "x-iops-total-max",
    "x-iops-total-max-length",
    "x-iops-read",
    "x-iops-read-max",
    "x-iops-read-max-length",
    "x-iops-write",
    "x-iops-write-max",
    "x-iops-write-max-length",
    "x-bps-total",
    "x-bps-total-max",
    "x-bps-total-max-length",
    "x-bps-read",
    "x-bps-read-max",
    "x-bps-read-max-length",
    "x-bps-write",
    "x-bps-write-max",
    "x-bps-write-max-length",
    "x-iops-size",
];

/// The main-loop properties, in QEMU's order (EventLoopBaseProperties).
const MAIN_LOOP_MEMBERS: &[&str] = &["aio-max-batch", "thread-pool-min", "thread-pool-max"];

impl FromQapi for ObjectOptions {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let qom_type = crate::visitor::enum_str(
            f.optional::<Value>("qom-type")?
                .ok_or_else(|| QmpError::generic("Parameter 'qom-type' is missing"))?,
            &ctx.member("qom-type"),
            OBJECT_TYPES,
        )?;
        let id: String = f.required("id")?;
        let props = match qom_type.as_str() {
            "authz-simple" => ObjectProps::AuthzSimple {
                identity: f.required("identity")?,
            },
            "authz-list" => ObjectProps::AuthzList {
                policy: f.optional("policy")?,
                rules: f.optional("rules")?,
            },
            "authz-list-file" | "authz-listfile" => ObjectProps::AuthzListFile {
                filename: f.required("filename")?,
                refresh: f.optional("refresh")?,
            },
            "iothread" => {
                for key in IOTHREAD_MEMBERS {
                    let _: Option<i64> = f.optional(key)?;
                }
                ObjectProps::Iothread
            }
            "main-loop" => ObjectProps::MainLoop {
                aio_max_batch: f.optional("aio-max-batch")?,
                thread_pool_min: f.optional("thread-pool-min")?,
                thread_pool_max: f.optional("thread-pool-max")?,
            },
            "metrics-http" => ObjectProps::MetricsHttp {
                addr: f.required("addr")?,
            },
            "secret" => ObjectProps::Secret {
                format: f.optional("format")?,
                keyid: f.optional("keyid")?,
                iv: f.optional("iv")?,
                data: f.optional("data")?,
                file: f.optional("file")?,
            },
            "throttle-group" => {
                let limits = f.optional::<ThrottleLimits>("limits")?.map(Box::new);
                let mut properties = Vec::new();
                for key in THROTTLE_GROUP_MEMBERS {
                    if let Some(v) = f.optional::<i64>(key)? {
                        properties.push((&key[2..], v));
                    }
                }
                ObjectProps::ThrottleGroup { limits, properties }
            }
            "tls-creds-x509" => ObjectProps::TlsCredsX509 {
                common: TlsCredsCommon::read(&mut f)?,
                sanity_check: f.optional("sanity-check")?,
                passwordid: f.optional("passwordid")?,
            },
            _ => ObjectProps::TlsCredsPsk {
                common: TlsCredsCommon::read(&mut f)?,
                username: f.optional("username")?,
            },
        };
        f.finish()?;
        Ok(Self {
            qom_type,
            id,
            props,
        })
    }
}

/// A flat union on `qom-type`; the branches are read inline above, so they
/// are described here, member for member.
impl Describe for ObjectOptions {
    fn ty() -> Ty {
        named("ObjectOptions")
    }
    fn define(s: &mut Schema) {
        s.enumeration("ObjectType", OBJECT_TYPES.to_vec());
        let variants = OBJECT_TYPES
            .iter()
            .map(|t| (*t, object_branch(s, t)))
            .collect();
        s.union(
            "ObjectOptions",
            vec![req("qom-type", named("ObjectType")), req("id", str())],
            "qom-type",
            variants,
        );
    }
}

/// The properties object of one `qom-type`.
fn object_branch(s: &mut Schema, qom_type: &str) -> Ty {
    let (key, members) = match qom_type {
        "authz-simple" => ("AuthZSimpleProperties", vec![req("identity", str())]),
        "authz-list" => (
            "AuthZListProperties",
            vec![
                opt("policy", describe::<QAuthZListPolicy>(s)),
                opt("rules", describe::<Vec<QAuthZListRule>>(s)),
            ],
        ),
        "authz-list-file" | "authz-listfile" => (
            "AuthZListFileProperties",
            vec![req("filename", str()), opt("refresh", bool())],
        ),
        "iothread" => (
            "IothreadProperties",
            IOTHREAD_MEMBERS.iter().map(|m| opt(m, int())).collect(),
        ),
        "main-loop" => (
            "MainLoopProperties",
            MAIN_LOOP_MEMBERS.iter().map(|m| opt(m, int())).collect(),
        ),
        "metrics-http" => (
            "MetricsHttpProperties",
            vec![req("addr", describe::<InetSocketAddressBase>(s))],
        ),
        "secret" => (
            "SecretProperties",
            vec![
                opt("format", describe::<QCryptoSecretFormat>(s)),
                opt("keyid", str()),
                opt("iv", str()),
                opt("data", str()),
                opt("file", str()),
            ],
        ),
        "throttle-group" => {
            let mut m = vec![opt("limits", describe::<ThrottleLimits>(s))];
            m.extend(THROTTLE_GROUP_MEMBERS.iter().map(|k| opt(k, int())));
            ("ThrottleGroupProperties", m)
        }
        "tls-creds-x509" => {
            let mut m = tls_common(s);
            m.extend([opt("sanity-check", bool()), opt("passwordid", str())]);
            ("TlsCredsX509Properties", m)
        }
        _ => {
            let mut m = tls_common(s);
            m.push(opt("username", str()));
            ("TlsCredsPskProperties", m)
        }
    };
    s.object(key, members);
    named(key)
}

/// TlsCredsCommon's members, as `TlsCredsCommon::read` takes them.
fn tls_common(s: &mut Schema) -> Vec<Member> {
    vec![
        opt("verify-peer", bool()),
        opt("dir", str()),
        opt("endpoint", describe::<QCryptoTLSCredsEndpoint>(s)),
        opt("priority", str()),
    ]
}

qapi_struct! {
    /// object-del's arguments.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct ObjectDelArgs {
        req "id" id: String,
    }
}

qapi_struct! {
    /// qom-get's arguments: an object's path (`/objects/ID`, or a unique
    /// partial path such as `ID`) and a property.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct QomGetArgs {
        req "path" path: String,
        req "property" property: String,
    }
}

/// qom-set's arguments: qom-get's, and the value (of any type).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QomSetArgs {
    pub path: String,
    pub property: String,
    pub value: Value,
}

impl FromQapi for QomSetArgs {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let args = Self {
            path: f.required("path")?,
            property: f.required("property")?,
            value: f.required("value")?,
        };
        f.finish()?;
        Ok(args)
    }
}

impl Describe for QomSetArgs {
    fn ty() -> Ty {
        named("QomSetArgs")
    }
    fn define(s: &mut Schema) {
        s.object(
            "QomSetArgs",
            vec![
                req("path", str()),
                req("property", str()),
                req("value", any()),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::visitor::{from_value, InputMode};
    use serde_json::json;

    #[test]
    fn test_reader_accepts_every_described_member_of_every_type() {
        crate::introspect::agreement::check::<ObjectOptions>();
    }

    #[test]
    fn test_authz_list_rule_needs_policy() {
        let v = json!({"qom-type": "authz-list", "id": "l", "rules": [{"match": "x"}]});
        let e = from_value::<ObjectOptions>(v, InputMode::Json).unwrap_err();
        assert_eq!(e.desc, "Parameter 'rules[0].policy' is missing");
    }

    #[test]
    fn test_unknown_qom_type() {
        let e =
            from_value::<ObjectOptions>(json!({"qom-type": "bogus", "id": "b"}), InputMode::Json)
                .unwrap_err();
        assert_eq!(e.desc, "Parameter 'qom-type' does not accept value 'bogus'");
    }

    #[test]
    fn test_tls_creds_x509_members_are_read_in_keyval_form() {
        let v = json!({"qom-type": "tls-creds-x509", "id": "t", "dir": "/d",
                       "endpoint": "server", "verify-peer": "off", "sanity-check": "on"});
        let o = from_value::<ObjectOptions>(v, InputMode::Keyval).unwrap();
        let ObjectProps::TlsCredsX509 {
            common,
            sanity_check,
            ..
        } = o.props
        else {
            panic!("expected x509 credentials");
        };
        assert_eq!(common.verify_peer, Some(false));
        assert_eq!(common.endpoint, Some(QCryptoTLSCredsEndpoint::Server));
        assert_eq!(sanity_check, Some(true));
    }

    #[test]
    fn test_tls_creds_unknown_member_is_unexpected() {
        let v = json!({"qom-type": "tls-creds-psk", "id": "p", "bogus": 1});
        let e = from_value::<ObjectOptions>(v, InputMode::Json).unwrap_err();
        assert_eq!(e.desc, "Parameter 'bogus' is unexpected");
    }

    #[test]
    fn test_metrics_http_takes_host_and_port_and_refuses_other_members() {
        let v = crate::keyval::parse_keyval(
            "metrics-http,id=m,addr.host=127.0.0.1,addr.port=9100",
            Some("qom-type"),
        )
        .unwrap();
        let o = from_value::<ObjectOptions>(v, InputMode::Keyval).unwrap();
        assert_eq!(
            o.props,
            ObjectProps::MetricsHttp {
                addr: InetSocketAddressBase {
                    host: "127.0.0.1".into(),
                    port: "9100".into()
                }
            }
        );
        let bad = json!({"qom-type": "metrics-http", "id": "m",
                         "addr": {"host": "h", "port": "1", "ipv4": true}});
        let e = from_value::<ObjectOptions>(bad, InputMode::Json).unwrap_err();
        assert_eq!(e.desc, "Parameter 'addr.ipv4' is unexpected");
        let missing = json!({"qom-type": "metrics-http", "id": "m"});
        let e = from_value::<ObjectOptions>(missing, InputMode::Json).unwrap_err();
        assert_eq!(e.desc, "Parameter 'addr' is missing");
    }

    #[test]
    fn test_authz_simple_needs_identity() {
        let e = from_value::<ObjectOptions>(
            json!({"qom-type": "authz-simple", "id": "a"}),
            InputMode::Json,
        )
        .unwrap_err();
        assert_eq!(e.desc, "Parameter 'identity' is missing");
    }
}

//! User-created objects (`--object`, `object-add`/`object-del`): the TLS
//! credentials the NBD server's `tls-creds` names, the authorization objects
//! its `tls-authz` names, iothreads, the main loop, `metrics-http`
//! endpoints (whose servers `crate::metrics` runs), and throttle groups
//! (`throttle.rs`; also listed in the block crate's group registry, where
//! throttle nodes find them; `qom-get`/`qom-set` read and change their limits).
//!
//! The NBD server keeps only the *id* of its authz object and looks it up at
//! each connection, so an authz object may be deleted and re-created while the
//! server runs; a missing object denies ([`ObjectTable::authorize`]).

mod secret;
mod throttle;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use block::throttle::{ThrottleGroup, ThrottleGroups};

use qmp::schema::object::{
    ObjectOptions, ObjectProps, QAuthZListFormat, QAuthZListPolicy, QAuthZListRule,
};
use qmp::visitor::{from_value, InputMode};
use qmp::QmpError;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::is_well_formed_id;
use crate::error::{ObjectError, QomError};
use crate::tls::{ClientCreds, TlsCreds};
pub use secret::Secret;

/// An object in the registry.
#[derive(Debug)]
pub enum Object {
    Authz(Authz),
    /// Loaded when created; a running NBD server keeps its own reference, so
    /// deleting the object does not affect it (as in QEMU).
    TlsCreds(Arc<TlsCreds>),
    /// Accepted for compatibility: bexd's runtime serves every export on all
    /// its threads, so placing an export in an iothread changes nothing.
    Iothread,
    /// `main-loop`: `thread-pool-max` sizes the blocking pool where driver
    /// calls that may wait for a device run. The pool is built when the
    /// process starts, so the object exists only from the command line, and
    /// like QEMU's it cannot be deleted.
    MainLoop {
        thread_pool_max: usize,
    },
    /// `metrics-http`: bexd's Prometheus endpoint. The object only says where
    /// it listens and holds the token that stops it; `crate::metrics` runs
    /// the server once the object is in the table.
    MetricsHttp(MetricsHttp),
    /// I/O limits shared by the throttle nodes that name it.
    ThrottleGroup(Arc<ThrottleGroup>),
    /// A key other options name by id (`driver=rbd`'s `key-secret`).
    Secret(Secret),
}

/// A `metrics-http` object. Deleting it (dropping it) stops its server.
#[derive(Debug)]
pub struct MetricsHttp {
    pub host: String,
    pub port: String,
    pub stop: CancellationToken,
}

impl Drop for MetricsHttp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Object {
    /// The object's `qom-type`, as `qom-get ... type` and errors name it.
    fn qom_type(&self) -> &'static str {
        match self {
            Self::Authz(Authz::Simple { .. }) => "authz-simple",
            Self::Authz(Authz::List(_)) => "authz-list",
            Self::Authz(Authz::ListFile { .. }) => "authz-list-file",
            Self::TlsCreds(_) => "tls-creds",
            Self::Iothread => "iothread",
            Self::MainLoop { .. } => "main-loop",
            Self::MetricsHttp(_) => "metrics-http",
            Self::ThrottleGroup(_) => "throttle-group",
            Self::Secret(_) => "secret",
        }
    }
}

/// What a QOM path names in bexd's tree: a container (the root,
/// `/objects`) or a user-created object.
enum QomNode<'a> {
    Container,
    Object(&'a Object),
}

impl QomNode<'_> {
    fn qom_type(&self) -> &'static str {
        match self {
            Self::Container => "container",
            Self::Object(o) => o.qom_type(),
        }
    }

    /// A property other than `type`: a container has none; bexd models
    /// only throttle groups' (refused, not answered wrongly, elsewhere).
    fn cannot(&self, property: &str) -> QomError {
        let qom_type = self.qom_type().to_string();
        let property = property.to_string();
        match self {
            Self::Container => QomError::NoSuchProperty { qom_type, property },
            Self::Object(_) => QomError::Unsupported { qom_type, property },
        }
    }
}

/// QEMU's QAuthZ family: decides whether an identity (an x509 DN) may connect.
#[derive(Debug)]
pub enum Authz {
    Simple {
        identity: String,
    },
    List(AuthzList),
    /// `authz-list-file`: the list in a JSON file, re-read on every check when `refresh`.
    ListFile {
        path: PathBuf,
        refresh: bool,
        last_good: Mutex<AuthzList>,
    },
}

/// `authz-list`: rules checked in order, first match decides, else the default policy.
#[derive(Debug, Clone)]
pub struct AuthzList {
    policy: QAuthZListPolicy,
    rules: Vec<QAuthZListRule>,
}

impl AuthzList {
    fn is_allowed(&self, identity: &str) -> bool {
        let decided =
            self.rules
                .iter()
                .find(|r| match r.format.unwrap_or(QAuthZListFormat::Exact) {
                    QAuthZListFormat::Exact => r.r#match == identity,
                    QAuthZListFormat::Glob => glob_match(&r.r#match, identity),
                });
        decided.map_or(self.policy, |r| r.policy) == QAuthZListPolicy::Allow
    }

    /// Reads a list from the JSON form QEMU's authz-list-file uses:
    /// `{"policy": "deny", "rules": [{"match": "...", "policy": "allow", "format": "glob"}]}`.
    fn load(path: &PathBuf) -> Result<Self, QmpError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            QmpError::generic(format!(
                "Unable to read '{}': {}",
                path.display(),
                crate::util::strerror(&e)
            ))
        })?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| QmpError::generic(format!("Unable to parse '{}': {e}", path.display())))?;
        let mut v = value;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("qom-type".into(), "authz-list".into());
            obj.insert("id".into(), "file".into());
        }
        match from_value::<ObjectOptions>(v, InputMode::Json)?.props {
            ObjectProps::AuthzList { policy, rules } => Ok(Self {
                policy: policy.unwrap_or(QAuthZListPolicy::Deny),
                rules: rules.unwrap_or_default(),
            }),
            _ => Err(QmpError::generic("authz list file is not a list")),
        }
    }
}

impl Authz {
    pub fn is_allowed(&self, identity: &str) -> bool {
        match self {
            Self::Simple { identity: allowed } => allowed == identity,
            Self::List(list) => list.is_allowed(identity),
            Self::ListFile {
                path,
                refresh,
                last_good,
            } => {
                let mut list = last_good.lock().unwrap_or_else(|e| e.into_inner());
                if *refresh {
                    match AuthzList::load(path) {
                        Ok(fresh) => *list = fresh,
                        Err(e) => {
                            tracing::warn!(error = %e.desc, "keeping the last good authz list")
                        }
                    }
                }
                list.is_allowed(identity)
            }
        }
    }
}

/// GLib's simple patterns, as QEMU's authz-list uses them: `*` is any run, `?` one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                backtrack = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match backtrack {
                Some((bp, bt)) => {
                    pi = bp + 1;
                    ti = bt + 1;
                    backtrack = Some((bp, bt + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Builds an object from `object-add` / `--object` arguments.
pub fn create(value: Value, mode: InputMode) -> Result<(String, Object), QmpError> {
    let options: ObjectOptions = from_value(value, mode)?;
    if !is_well_formed_id(&options.id) {
        return Err(QmpError::generic("Parameter 'id' expects an identifier"));
    }
    let object = match options.props {
        ObjectProps::AuthzSimple { identity } => Object::Authz(Authz::Simple { identity }),
        ObjectProps::AuthzList { policy, rules } => Object::Authz(Authz::List(AuthzList {
            policy: policy.unwrap_or(QAuthZListPolicy::Deny),
            rules: rules.unwrap_or_default(),
        })),
        ObjectProps::AuthzListFile { filename, refresh } => {
            let path = PathBuf::from(filename);
            let list = AuthzList::load(&path)?;
            Object::Authz(Authz::ListFile {
                path,
                refresh: refresh.unwrap_or(true),
                last_good: Mutex::new(list),
            })
        }
        ObjectProps::Iothread => Object::Iothread,
        ObjectProps::MainLoop {
            thread_pool_min,
            thread_pool_max,
            aio_max_batch,
        } => main_loop(thread_pool_min, thread_pool_max, aio_max_batch)?,
        ObjectProps::TlsCredsX509 {
            common,
            sanity_check,
            passwordid,
        } => tls_object(TlsCreds::x509(
            &common,
            sanity_check.unwrap_or(true),
            passwordid.as_deref(),
        ))?,
        ObjectProps::TlsCredsPsk { common, username } => {
            tls_object(TlsCreds::psk(&common, username.as_deref()))?
        }
        ObjectProps::MetricsHttp { addr } => Object::MetricsHttp(MetricsHttp {
            host: addr.host,
            port: addr.port,
            stop: CancellationToken::new(),
        }),
        ObjectProps::Secret {
            data,
            file,
            format,
            keyid,
            iv,
        } => Object::Secret(Secret::create(data, file, format, keyid, iv)?),
        ObjectProps::ThrottleGroup { limits, properties } => Object::ThrottleGroup(
            throttle::create(&options.id, limits.as_deref(), &properties)
                .map_err(ObjectError::from)?,
        ),
    };
    Ok((options.id, object))
}

/// QEMU's default for the main loop's pool: 64 threads.
pub const DEFAULT_THREAD_POOL_MAX: usize = 64;

/// A main-loop object, with QEMU's range checks; what bexd cannot honour
/// (a pool minimum, a batch bound for its own AIO) is refused, not ignored.
fn main_loop(
    min: Option<i64>,
    max: Option<i64>,
    aio_max_batch: Option<i64>,
) -> Result<Object, QmpError> {
    for (name, v) in [
        ("aio-max-batch", aio_max_batch),
        ("thread-pool-min", min),
        ("thread-pool-max", max),
    ] {
        if v.is_some_and(|v| v < 0) {
            return Err(QmpError::generic(format!(
                "{name} value must be in range [0, {}]",
                i64::MAX
            )));
        }
    }
    let max = max.map_or(DEFAULT_THREAD_POOL_MAX, |m| m as usize);
    let min = min.unwrap_or(0) as usize;
    if max == 0 || min > max {
        return Err(QmpError::generic(
            "bad thread-pool-min/thread-pool-max values",
        ));
    }
    if min > 0 {
        return Err(QmpError::generic(
            "thread-pool-min is not supported by bexd: its pool starts threads on demand",
        ));
    }
    if aio_max_batch.unwrap_or(0) > 0 {
        return Err(QmpError::generic(
            "aio-max-batch is not supported by bexd: io_uring submissions are batched per connection",
        ));
    }
    Ok(Object::MainLoop {
        thread_pool_max: max,
    })
}

fn tls_object(creds: Result<TlsCreds, crate::tls::TlsError>) -> Result<Object, QmpError> {
    creds
        .map(|c| Object::TlsCreds(Arc::new(c)))
        .map_err(|e| QmpError::generic(e.to_string()))
}

/// The objects by id, behind their own lock (held for lookups only: an
/// authz check that re-reads its list file does so with the lock held, as
/// the file is small and the check runs once per connection).
#[derive(Debug, Default)]
pub struct ObjectTable {
    objects: Mutex<BTreeMap<String, Object>>,
    /// Set once the command line is applied: a main-loop can no longer be
    /// made (the thread pool it would size is already running).
    started: std::sync::atomic::AtomicBool,
    /// The throttle groups by name, shared with the node table.
    throttle_groups: Arc<ThrottleGroups>,
}

impl ObjectTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// A table that lists its throttle groups in `groups` too.
    pub fn with_throttle_groups(groups: Arc<ThrottleGroups>) -> Self {
        Self {
            throttle_groups: groups,
            ..Self::default()
        }
    }

    /// Every update is one insert or remove, so a lock poisoned by a panic
    /// elsewhere still guards a whole map and is used as it is.
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Object>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(&self, id: String, object: Object) -> Result<(), ObjectError> {
        let mut objects = self.lock();
        if objects.contains_key(&id) {
            return Err(ObjectError::Duplicate(id));
        }
        if let Object::MainLoop { .. } = object {
            if objects
                .values()
                .any(|o| matches!(o, Object::MainLoop { .. }))
            {
                return Err(ObjectError::SecondMainLoop);
            }
            if self.started.load(std::sync::atomic::Ordering::Acquire) {
                return Err(ObjectError::MainLoopAfterStart);
            }
        }
        if let Object::ThrottleGroup(group) = &object {
            self.throttle_groups.insert(group.clone());
        }
        objects.insert(id, object);
        Ok(())
    }

    pub fn delete(&self, id: &str) -> Result<(), ObjectError> {
        let mut objects = self.lock();
        match objects.get(id) {
            None => Err(ObjectError::NotFound(id.to_string())),
            Some(Object::MainLoop { .. }) => Err(ObjectError::InUse(id.to_string())),
            Some(Object::ThrottleGroup(g)) if g.member_count() > 0 => {
                Err(ObjectError::InUse(id.to_string()))
            }
            Some(_) => {
                self.throttle_groups.remove(id);
                objects.remove(id);
                Ok(())
            }
        }
    }

    /// What `path` names: the root or `/objects` container, or an object
    /// as `/objects/ID` or a partial path ending in its id (QEMU resolves
    /// unique partial paths; ids are unique here). A trailing `/` is allowed.
    fn resolve<'a>(objects: &'a BTreeMap<String, Object>, path: &str) -> Option<QomNode<'a>> {
        let path = match path.len() > 1 {
            true => path.strip_suffix('/').unwrap_or(path),
            false => path,
        };
        if matches!(path, "/" | "/objects" | "objects") {
            return Some(QomNode::Container);
        }
        let id = path.strip_prefix("/objects/").unwrap_or(path);
        let id = id.strip_prefix("objects/").unwrap_or(id);
        objects.get(id).map(QomNode::Object)
    }

    /// `qom-get`: a property of the object at `path`.
    pub fn qom_get(&self, path: &str, property: &str) -> Result<Value, QomError> {
        let objects = self.lock();
        let node =
            Self::resolve(&objects, path).ok_or_else(|| QomError::NoSuchPath(path.to_string()))?;
        match node {
            QomNode::Object(Object::ThrottleGroup(g)) => throttle::get(g, property),
            _ if property == "type" => Ok(node.qom_type().into()),
            _ => Err(node.cannot(property)),
        }
    }

    /// `qom-set`: changes a property of the object at `path`.
    pub fn qom_set(&self, path: &str, property: &str, value: Value) -> Result<(), QomError> {
        let objects = self.lock();
        let node =
            Self::resolve(&objects, path).ok_or_else(|| QomError::NoSuchPath(path.to_string()))?;
        match node {
            QomNode::Object(Object::ThrottleGroup(g)) => throttle::set(g, property, value),
            _ if property == "type" => Err(QomError::NotWritable {
                qom_type: node.qom_type().into(),
                property: property.into(),
            }),
            _ => Err(node.cannot(property)),
        }
    }

    /// The command line has been applied: from now on no main-loop can be made.
    pub fn mark_started(&self) {
        self.started
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_iothread(&self, id: &str) -> bool {
        matches!(self.lock().get(id), Some(Object::Iothread))
    }

    /// The server-endpoint TLS credentials `tls-creds` names, with QEMU's errors.
    pub fn server_tls_creds(&self, id: &str) -> Result<Arc<TlsCreds>, ObjectError> {
        match self.lock().get(id) {
            None => Err(ObjectError::NoTlsCreds(id.to_string())),
            Some(Object::TlsCreds(c)) if c.is_server() => Ok(c.clone()),
            Some(Object::TlsCreds(_)) => Err(ObjectError::NotServerEndpoint),
            Some(_) => Err(ObjectError::NotTlsCreds(id.to_string())),
        }
    }

    /// The client-endpoint TLS credentials a `driver=nbd` node's `tls-creds` names.
    pub fn client_tls_creds(&self, id: &str) -> Result<Arc<ClientCreds>, ObjectError> {
        match self.lock().get(id) {
            None => Err(ObjectError::NoTlsCreds(id.to_string())),
            Some(Object::TlsCreds(c)) => c.client().ok_or(ObjectError::NotClientEndpoint),
            Some(_) => Err(ObjectError::NotTlsCreds(id.to_string())),
        }
    }

    /// The secret `id` names, as base64 (QEMU's `qcrypto_secret_lookup_as_base64`).
    pub fn secret_base64(&self, id: &str) -> Result<String, ObjectError> {
        match self.lock().get(id) {
            Some(Object::Secret(s)) => Ok(s.as_base64()),
            Some(_) => Err(ObjectError::NotSecret(id.to_string())),
            None => Err(ObjectError::NoSecret(id.to_string())),
        }
    }

    /// Whether the authz object `authz_id` lets `identity` in. Looked up now,
    /// at the time of use; a missing object (or one of another type) denies.
    pub fn authorize(&self, authz_id: &str, identity: &str) -> bool {
        match self.lock().get(authz_id) {
            Some(Object::Authz(a)) => a.is_allowed(identity),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn main_loop_object(props: serde_json::Value) -> Result<Object, QmpError> {
        let mut v = json!({"qom-type": "main-loop", "id": "ml0"});
        for (k, x) in props.as_object().unwrap() {
            v[k] = x.clone();
        }
        create(v, InputMode::Json).map(|(_, o)| o)
    }

    #[test]
    fn test_main_loop_takes_thread_pool_max_and_defaults_to_qemus_64() {
        let o = main_loop_object(json!({"thread-pool-max": 8})).unwrap();
        assert!(matches!(o, Object::MainLoop { thread_pool_max: 8 }));
        let o = main_loop_object(json!({})).unwrap();
        assert!(matches!(
            o,
            Object::MainLoop {
                thread_pool_max: 64
            }
        ));
    }

    #[test]
    fn test_main_loop_refuses_what_it_cannot_honour() {
        let desc = |p| {
            main_loop_object(p)
                .err()
                .map(|e| e.desc)
                .unwrap_or_default()
        };
        assert_eq!(
            desc(json!({"thread-pool-max": 0})),
            "bad thread-pool-min/thread-pool-max values"
        );
        assert!(desc(json!({"thread-pool-min": 2})).contains("not supported by bexd"));
        assert!(desc(json!({"aio-max-batch": 4})).contains("not supported by bexd"));
        assert!(desc(json!({"thread-pool-max": -1}))
            .starts_with("thread-pool-max value must be in range"));
    }

    #[test]
    fn test_one_main_loop_made_before_start_and_never_deleted() {
        let table = ObjectTable::new();
        let ml = || Object::MainLoop { thread_pool_max: 4 };
        table.add("ml0".into(), ml()).unwrap();
        assert_eq!(
            table.add("ml1".into(), ml()),
            Err(ObjectError::SecondMainLoop)
        );
        assert_eq!(table.delete("ml0"), Err(ObjectError::InUse("ml0".into())));
        let later = ObjectTable::new();
        later.mark_started();
        assert_eq!(
            later.add("ml0".into(), ml()),
            Err(ObjectError::MainLoopAfterStart)
        );
        later.add("io0".into(), Object::Iothread).unwrap();
        later.delete("io0").unwrap();
    }

    #[test]
    fn test_glob_star_and_question_mark() {
        assert!(glob_match(
            "C=GB,O=*,CN=client-?",
            "C=GB,O=Example,CN=client-1"
        ));
        assert!(!glob_match(
            "C=GB,O=*,CN=client-?",
            "C=GB,O=Example,CN=client-12"
        ));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "acd"));
    }

    #[test]
    fn test_authz_list_first_matching_rule_decides() {
        let v = json!({"qom-type": "authz-list", "id": "l", "policy": "allow", "rules": [
            {"match": "CN=bad*", "policy": "deny", "format": "glob"}]});
        let (_, Object::Authz(a)) = create(v, InputMode::Json).unwrap() else {
            panic!("expected an authz object");
        };
        assert!(!a.is_allowed("CN=bad-client"));
        assert!(a.is_allowed("CN=good"));
    }

    #[test]
    fn test_authz_list_defaults_to_deny() {
        let (_, Object::Authz(a)) = create(
            json!({"qom-type": "authz-list", "id": "l"}),
            InputMode::Json,
        )
        .unwrap() else {
            panic!("expected an authz object");
        };
        assert!(!a.is_allowed("CN=anyone"));
    }

    #[test]
    fn test_authz_list_file_is_reread_when_refreshing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl.json");
        std::fs::write(
            &path,
            r#"{"policy": "deny", "rules": [{"match": "CN=a", "policy": "allow"}]}"#,
        )
        .unwrap();
        let v =
            json!({"qom-type": "authz-list-file", "id": "f", "filename": path.to_str().unwrap()});
        let (_, Object::Authz(a)) = create(v, InputMode::Json).unwrap() else {
            panic!("expected an authz object");
        };
        assert!(a.is_allowed("CN=a"));
        std::fs::write(&path, r#"{"policy": "deny", "rules": []}"#).unwrap();
        assert!(!a.is_allowed("CN=a"));
    }

    #[test]
    fn test_bad_id_is_refused() {
        let e = create(json!({"qom-type": "iothread", "id": "1x"}), InputMode::Json).unwrap_err();
        assert_eq!(e.desc, "Parameter 'id' expects an identifier");
    }
}

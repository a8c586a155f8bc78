//! qapi/block-core.json: BlockdevOptions for the drivers bexd implements.

use serde_json::Value;

use crate::introspect::{any, bool, describe, int, named, opt, req, str, Describe, Schema, Ty};
use crate::schema::bitmap::BlockDirtyBitmap;
use crate::schema::object::InetSocketAddressBase;
use crate::schema::sockets::SocketAddress;
use crate::visitor::{Ctx, Fields, FromQapi, InputMode, Size};
use crate::{qapi_enum, qapi_object, qapi_struct, QmpError};

qapi_enum!(BlockdevDriver {
    Blkdebug = "blkdebug",
    CopyBeforeWrite = "copy-before-write",
    File = "file",
    HostDevice = "host_device",
    Nbd = "nbd",
    NullAio = "null-aio",
    NullCo = "null-co",
    Qcow2 = "qcow2",
    Raw = "raw",
    Rbd = "rbd",
    SnapshotAccess = "snapshot-access",
    Throttle = "throttle",
});
qapi_enum!(OnCbwError { BreakGuestWrite = "break-guest-write", BreakSnapshot = "break-snapshot" });
qapi_enum!(RbdAuthMode { Cephx = "cephx", None = "none" });
qapi_enum!(BlockdevDiscardOptions { Ignore = "ignore", Unmap = "unmap" });
qapi_enum!(BlockdevDetectZeroesOptions { Off = "off", On = "on", Unmap = "unmap" });
qapi_enum!(OnOffAuto { Auto = "auto", On = "on", Off = "off" });
qapi_enum!(BlockdevAioOptions { Threads = "threads", Native = "native", IoUring = "io_uring" });

qapi_struct! {
    /// BlockdevCacheOptions.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct BlockdevCacheOptions {
        opt "direct" direct: bool,
        opt "no-flush" no_flush: bool,
    }
}

/// Members every driver shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockdevBase {
    pub driver: BlockdevDriver,
    pub node_name: Option<String>,
    pub discard: Option<BlockdevDiscardOptions>,
    pub cache: Option<BlockdevCacheOptions>,
    pub read_only: Option<bool>,
    pub auto_read_only: Option<bool>,
    pub force_share: Option<bool>,
    pub detect_zeroes: Option<BlockdevDetectZeroesOptions>,
    /// QEMU 10: `false` opens the node inactive (bexd refuses that).
    pub active: Option<bool>,
}

qapi_struct! {
    /// The `file` and `host_device` branch.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockdevOptionsFile {
        req "filename" filename: String,
        opt "pr-manager" pr_manager: String,
        opt "locking" locking: OnOffAuto,
        opt "aio" aio: BlockdevAioOptions,
        opt "aio-max-batch" aio_max_batch: i64,
        opt "drop-cache" drop_cache: bool,
    }
}

qapi_struct! {
    /// The `rbd` branch, QEMU's BlockdevOptionsRbd. `encrypt` is read as any
    /// value so that bexd can refuse it by name (it has no LUKS layer).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockdevOptionsRbd {
        req "pool" pool: String,
        opt "namespace" namespace: String,
        req "image" image: String,
        opt "conf" conf: String,
        opt "snapshot" snapshot: String,
        opt "encrypt" encrypt: Value,
        opt "user" user: String,
        opt "auth-client-required" auth_client_required: Vec<RbdAuthMode>,
        opt "key-secret" key_secret: String,
        opt "server" server: Vec<InetSocketAddressBase>,
    }
}

/// BlockdevRef: a node name, or a node described inline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockdevRef {
    Reference(String),
    Definition(Box<BlockdevOptions>),
}

impl FromQapi for BlockdevRef {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        match value {
            Value::String(s) => Ok(Self::Reference(s)),
            other => BlockdevOptions::from_qapi(other, ctx).map(|o| Self::Definition(Box::new(o))),
        }
    }
}

impl Describe for BlockdevRef {
    fn ty() -> Ty {
        named("BlockdevRef")
    }
    fn define(s: &mut Schema) {
        let options = describe::<BlockdevOptions>(s);
        s.alternate("BlockdevRef", vec![options, str()]);
    }
}

/// BlockdevRefOrNull (qcow2's `backing`): JSON null means "no backing file".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockdevRefOrNull {
    Ref(BlockdevRef),
    Null,
}

impl FromQapi for BlockdevRefOrNull {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        match value {
            Value::Null => Ok(Self::Null),
            // Keyval has no null: QEMU reads `backing=` (empty) as null.
            Value::String(s) if s.is_empty() && ctx.mode == InputMode::Keyval => Ok(Self::Null),
            other => BlockdevRef::from_qapi(other, ctx).map(Self::Ref),
        }
    }
}

impl Describe for BlockdevRefOrNull {
    fn ty() -> Ty {
        named("BlockdevRefOrNull")
    }
    fn define(s: &mut Schema) {
        let options = describe::<BlockdevOptions>(s);
        s.alternate(
            "BlockdevRefOrNull",
            vec![options, str(), Ty::Builtin("null")],
        );
    }
}

qapi_enum!(BlkdebugIOType {
    Read = "read",
    Write = "write",
    WriteZeroes = "write-zeroes",
    Discard = "discard",
    Flush = "flush",
    BlockStatus = "block-status",
});

qapi_enum!(BlkdebugEvent {
    L1Update = "l1_update",
    L1GrowAllocTable = "l1_grow_alloc_table",
    L1GrowWriteTable = "l1_grow_write_table",
    L1GrowActivateTable = "l1_grow_activate_table",
    L2Load = "l2_load",
    L2Update = "l2_update",
    L2UpdateCompressed = "l2_update_compressed",
    L2AllocCowRead = "l2_alloc_cow_read",
    L2AllocWrite = "l2_alloc_write",
    ReadAio = "read_aio",
    ReadBackingAio = "read_backing_aio",
    ReadCompressed = "read_compressed",
    WriteAio = "write_aio",
    WriteCompressed = "write_compressed",
    VmstateLoad = "vmstate_load",
    VmstateSave = "vmstate_save",
    CowRead = "cow_read",
    CowWrite = "cow_write",
    ReftableLoad = "reftable_load",
    ReftableGrow = "reftable_grow",
    ReftableUpdate = "reftable_update",
    RefblockLoad = "refblock_load",
    RefblockUpdate = "refblock_update",
    RefblockUpdatePart = "refblock_update_part",
    RefblockAlloc = "refblock_alloc",
    RefblockAllocHookup = "refblock_alloc_hookup",
    RefblockAllocWrite = "refblock_alloc_write",
    RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
    RefblockAllocWriteTable = "refblock_alloc_write_table",
    RefblockAllocSwitchTable = "refblock_alloc_switch_table",
    ClusterAlloc = "cluster_alloc",
    ClusterAllocBytes = "cluster_alloc_bytes",
    ClusterFree = "cluster_free",
    FlushToOs = "flush_to_os",
    FlushToDisk = "flush_to_disk",
    PwritevRmwHead = "pwritev_rmw_head",
    PwritevRmwAfterHead = "pwritev_rmw_after_head",
    PwritevRmwTail = "pwritev_rmw_tail",
    PwritevRmwAfterTail = "pwritev_rmw_after_tail",
    Pwritev = "pwritev",
    PwritevZero = "pwritev_zero",
    PwritevDone = "pwritev_done",
    EmptyImagePrepare = "empty_image_prepare",
    L1ShrinkWriteTable = "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters",
    CorWrite = "cor_write",
    ClusterAllocSpace = "cluster_alloc_space",
    None = "none",
});

/// A blkdebug rule's enum member. QEMU re-reads its rules from flattened
/// options, so it names a bad value by the member alone: "Parameter 'event'
/// does not accept value 'x'", where other readers give the full path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleEnum<T>(pub T);

impl<T: FromQapi> FromQapi for RuleEnum<T> {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let leaf = ctx.path.rsplit('.').next().unwrap_or_default().to_string();
        T::from_qapi(value, &Ctx::root(ctx.mode).member(&leaf)).map(RuleEnum)
    }
}

impl<T: Describe> Describe for RuleEnum<T> {
    fn ty() -> Ty {
        T::ty()
    }
    fn define(s: &mut Schema) {
        T::define(s)
    }
}

qapi_struct! {
    /// One `inject-error` rule of blkdebug (plus bexd's `x-after`).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlkdebugInjectError {
        req "event" event: RuleEnum<BlkdebugEvent>,
        opt "state" state: i64,
        opt "iotype" iotype: RuleEnum<BlkdebugIOType>,
        opt "errno" errno: i64,
        opt "sector" sector: i64,
        opt "once" once: bool,
        opt "immediately" immediately: bool,
        opt "x-after" x_after: u64,
    }
}

qapi_struct! {
    /// One `set-state` rule of blkdebug.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlkdebugSetState {
        req "event" event: RuleEnum<BlkdebugEvent>,
        opt "state" state: i64,
        req "new_state" new_state: i64,
    }
}

/// BlockdevOptionsBlkdebug (`take-child-perms` and `unshare-child-perms`
/// are not read, so they are refused as unexpected members).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockdevOptionsBlkdebug {
    pub image: BlockdevRef,
    pub config: Option<String>,
    pub align: Option<i64>,
    pub max_transfer: Option<i32>,
    pub opt_write_zero: Option<i32>,
    pub max_write_zero: Option<i32>,
    pub opt_discard: Option<i32>,
    pub max_discard: Option<i32>,
    pub inject_error: Option<Vec<BlkdebugInjectError>>,
    pub set_state: Option<Vec<BlkdebugSetState>>,
}

qapi_struct! {
    /// BlockdevOptionsNbd: a client of a remote NBD export.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockdevOptionsNbd {
        req "server" server: SocketAddress,
        opt "export" export: String,
        opt "tls-creds" tls_creds: String,
        opt "tls-hostname" tls_hostname: String,
        opt "x-dirty-bitmap" x_dirty_bitmap: String,
        opt "reconnect-delay" reconnect_delay: u32,
        opt "open-timeout" open_timeout: u32,
    }
}

/// BlockdevOptionsCbw: the copy-before-write filter (image fleecing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockdevOptionsCbw {
    pub file: BlockdevRef,
    pub target: BlockdevRef,
    pub bitmap: Option<BlockDirtyBitmap>,
    pub on_cbw_error: Option<OnCbwError>,
    pub cbw_timeout: Option<u32>,
    pub min_cluster_size: Option<Size>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockdevSpecific {
    Blkdebug(BlockdevOptionsBlkdebug),
    CopyBeforeWrite(BlockdevOptionsCbw),
    /// The point-in-time view of a copy-before-write node.
    SnapshotAccess {
        file: BlockdevRef,
    },
    File(BlockdevOptionsFile),
    Nbd(BlockdevOptionsNbd),
    Raw {
        file: BlockdevRef,
        offset: Option<i64>,
        size: Option<i64>,
    },
    Null {
        size: Option<i64>,
        latency_ns: Option<u64>,
        read_zeroes: Option<bool>,
    },
    Qcow2(BlockdevOptionsQcow2),
    Rbd(BlockdevOptionsRbd),
    /// The I/O limits filter: the group (an object's id) before the child, QEMU's order.
    Throttle {
        throttle_group: String,
        file: BlockdevRef,
    },
}

/// BlockdevOptionsQcow2. Every member is read; bexd's converter acts on each
/// or refuses it (`overlap-check`, `encrypt` and `data-file` are kept as
/// plain values, since bexd only looks at whether and how they were given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockdevOptionsQcow2 {
    pub file: BlockdevRef,
    pub backing: Option<BlockdevRefOrNull>,
    pub lazy_refcounts: Option<bool>,
    pub pass_discard_request: Option<bool>,
    pub pass_discard_snapshot: Option<bool>,
    pub pass_discard_other: Option<bool>,
    pub discard_no_unref: Option<bool>,
    pub overlap_check: Option<Value>,
    pub cache_size: Option<i64>,
    pub l2_cache_size: Option<i64>,
    pub l2_cache_entry_size: Option<i64>,
    pub refcount_cache_size: Option<i64>,
    pub cache_clean_interval: Option<i64>,
    pub encrypt: Option<Value>,
    pub data_file: Option<Value>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockdevOptions {
    pub base: BlockdevBase,
    pub specific: BlockdevSpecific,
}

fn read_base(f: &mut Fields) -> Result<BlockdevBase, QmpError> {
    Ok(BlockdevBase {
        driver: f.required("driver")?,
        node_name: f.optional("node-name")?,
        discard: f.optional("discard")?,
        cache: f.optional("cache")?,
        read_only: f.optional("read-only")?,
        auto_read_only: f.optional("auto-read-only")?,
        force_share: f.optional("force-share")?,
        detect_zeroes: f.optional("detect-zeroes")?,
        active: f.optional("active")?,
    })
}

fn read_specific(driver: BlockdevDriver, f: &mut Fields) -> Result<BlockdevSpecific, QmpError> {
    Ok(match driver {
        BlockdevDriver::Blkdebug => BlockdevSpecific::Blkdebug(BlockdevOptionsBlkdebug {
            image: f.required("image")?,
            config: f.optional("config")?,
            align: f.optional("align")?,
            max_transfer: f.optional("max-transfer")?,
            opt_write_zero: f.optional("opt-write-zero")?,
            max_write_zero: f.optional("max-write-zero")?,
            opt_discard: f.optional("opt-discard")?,
            max_discard: f.optional("max-discard")?,
            inject_error: f.optional("inject-error")?,
            set_state: f.optional("set-state")?,
        }),
        BlockdevDriver::File | BlockdevDriver::HostDevice => {
            BlockdevSpecific::File(BlockdevOptionsFile::read_members(f)?)
        }
        BlockdevDriver::Nbd => BlockdevSpecific::Nbd(BlockdevOptionsNbd::read_members(f)?),
        BlockdevDriver::Raw => BlockdevSpecific::Raw {
            file: f.required("file")?,
            offset: f.optional("offset")?,
            size: f.optional("size")?,
        },
        BlockdevDriver::NullCo | BlockdevDriver::NullAio => BlockdevSpecific::Null {
            size: f.optional("size")?,
            latency_ns: f.optional("latency-ns")?,
            read_zeroes: f.optional("read-zeroes")?,
        },
        BlockdevDriver::Qcow2 => BlockdevSpecific::Qcow2(BlockdevOptionsQcow2 {
            backing: f.optional("backing")?,
            file: f.required("file")?,
            lazy_refcounts: f.optional("lazy-refcounts")?,
            pass_discard_request: f.optional("pass-discard-request")?,
            pass_discard_snapshot: f.optional("pass-discard-snapshot")?,
            pass_discard_other: f.optional("pass-discard-other")?,
            discard_no_unref: f.optional("discard-no-unref")?,
            overlap_check: f.optional("overlap-check")?,
            cache_size: f.optional("cache-size")?,
            l2_cache_size: f.optional("l2-cache-size")?,
            l2_cache_entry_size: f.optional("l2-cache-entry-size")?,
            refcount_cache_size: f.optional("refcount-cache-size")?,
            cache_clean_interval: f.optional("cache-clean-interval")?,
            encrypt: f.optional("encrypt")?,
            data_file: f.optional("data-file")?,
        }),
        BlockdevDriver::Rbd => BlockdevSpecific::Rbd(BlockdevOptionsRbd::read_members(f)?),
        BlockdevDriver::Throttle => BlockdevSpecific::Throttle {
            throttle_group: f.required("throttle-group")?,
            file: f.required("file")?,
        },
        BlockdevDriver::CopyBeforeWrite => BlockdevSpecific::CopyBeforeWrite(BlockdevOptionsCbw {
            file: f.required("file")?,
            target: f.required("target")?,
            bitmap: f.optional("bitmap")?,
            on_cbw_error: f.optional("on-cbw-error")?,
            cbw_timeout: f.optional("cbw-timeout")?,
            min_cluster_size: f.optional("min-cluster-size")?,
        }),
        BlockdevDriver::SnapshotAccess => BlockdevSpecific::SnapshotAccess {
            file: f.required("file")?,
        },
    })
}

impl FromQapi for BlockdevOptions {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let base = read_base(&mut f)?;
        let specific = read_specific(base.driver, &mut f)?;
        f.finish()?;
        Ok(Self { base, specific })
    }
}

/// A flat union on `driver`. The branches other than `file` are read inline
/// by `read_specific`, so they are described here, member for member.
impl Describe for BlockdevOptions {
    fn ty() -> Ty {
        named("BlockdevOptions")
    }
    fn define(s: &mut Schema) {
        if s.defines("BlockdevOptions") {
            return;
        }
        // Defined first: the branches refer back to this union through BlockdevRef.
        s.union("BlockdevOptions", vec![], "driver", vec![]);
        let base = vec![
            req("driver", describe::<BlockdevDriver>(s)),
            opt("node-name", str()),
            opt("discard", describe::<BlockdevDiscardOptions>(s)),
            opt("cache", describe::<BlockdevCacheOptions>(s)),
            opt("read-only", bool()),
            opt("auto-read-only", bool()),
            opt("force-share", bool()),
            opt("detect-zeroes", describe::<BlockdevDetectZeroesOptions>(s)),
            opt("active", bool()),
        ];
        let variants = BlockdevDriver::NAMES
            .iter()
            .map(|driver| (*driver, branch(s, driver)))
            .collect();
        s.union("BlockdevOptions", base, "driver", variants);
    }
}

/// The branch object of one driver.
fn branch(s: &mut Schema, driver: &str) -> Ty {
    let node = describe::<BlockdevRef>(s);
    let (key, members) = match driver {
        "file" | "host_device" => return describe::<BlockdevOptionsFile>(s),
        "nbd" => return describe::<BlockdevOptionsNbd>(s),
        "rbd" => return describe::<BlockdevOptionsRbd>(s),
        "blkdebug" => (
            "BlockdevOptionsBlkdebug",
            vec![
                req("image", node),
                opt("config", str()),
                opt("align", int()),
                opt("max-transfer", int()),
                opt("opt-write-zero", int()),
                opt("max-write-zero", int()),
                opt("opt-discard", int()),
                opt("max-discard", int()),
                opt("inject-error", describe::<Vec<BlkdebugInjectError>>(s)),
                opt("set-state", describe::<Vec<BlkdebugSetState>>(s)),
            ],
        ),
        "raw" => (
            "BlockdevOptionsRaw",
            vec![req("file", node), opt("offset", int()), opt("size", int())],
        ),
        "qcow2" => ("BlockdevOptionsQcow2", qcow2_members(s, node)),
        "throttle" => (
            "BlockdevOptionsThrottle",
            vec![req("throttle-group", str()), req("file", node)],
        ),
        "copy-before-write" => (
            "BlockdevOptionsCbw",
            vec![
                req("file", node.clone()),
                req("target", node),
                opt("bitmap", describe::<BlockDirtyBitmap>(s)),
                opt("on-cbw-error", describe::<OnCbwError>(s)),
                opt("cbw-timeout", int()),
                opt("min-cluster-size", int()),
            ],
        ),
        "snapshot-access" => ("BlockdevOptionsGenericFormat", vec![req("file", node)]),
        _ => (
            "BlockdevOptionsNull",
            vec![
                opt("size", int()),
                opt("latency-ns", int()),
                opt("read-zeroes", bool()),
            ],
        ),
    };
    s.object(key, members);
    named(key)
}

/// In QEMU's order; the reader takes `backing` before `file`.
fn qcow2_members(s: &mut Schema, node: Ty) -> Vec<crate::introspect::Member> {
    vec![
        req("file", node.clone()),
        opt("backing", describe::<BlockdevRefOrNull>(s)),
        opt("lazy-refcounts", bool()),
        opt("pass-discard-request", bool()),
        opt("pass-discard-snapshot", bool()),
        opt("pass-discard-other", bool()),
        opt("discard-no-unref", bool()),
        opt("overlap-check", any()),
        opt("cache-size", int()),
        opt("l2-cache-size", int()),
        opt("l2-cache-entry-size", int()),
        opt("refcount-cache-size", int()),
        opt("cache-clean-interval", int()),
        opt("encrypt", any()),
        opt("data-file", node),
    ]
}

qapi_struct! {
    /// ThrottleLimits: a throttle group's limits, every member optional
    /// (`qom-set` changes only those given; `qom-get` shows them all).
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct ThrottleLimits {
        opt "iops-total" iops_total: i64,
        opt "iops-total-max" iops_total_max: i64,
        opt "iops-total-max-length" iops_total_max_length: i64,
        opt "iops-read" iops_read: i64,
        opt "iops-read-max" iops_read_max: i64,
        opt "iops-read-max-length" iops_read_max_length: i64,
        opt "iops-write" iops_write: i64,
        opt "iops-write-max" iops_write_max: i64,
        opt "iops-write-max-length" iops_write_max_length: i64,
        opt "bps-total" bps_total: i64,
        opt "bps-total-max" bps_total_max: i64,
        opt "bps-total-max-length" bps_total_max_length: i64,
        opt "bps-read" bps_read: i64,
        opt "bps-read-max" bps_read_max: i64,
        opt "bps-read-max-length" bps_read_max_length: i64,
        opt "bps-write" bps_write: i64,
        opt "bps-write-max" bps_write_max: i64,
        opt "bps-write-max-length" bps_write_max_length: i64,
        opt "iops-size" iops_size: i64,
    }
}

impl ThrottleLimits {
    /// The members given, by QAPI name, in the schema's order.
    pub fn given(&self) -> Vec<(&'static str, i64)> {
        [
            ("iops-total", self.iops_total),
            ("iops-total-max", self.iops_total_max),
            ("iops-total-max-length", self.iops_total_max_length),
            ("iops-read", self.iops_read),
            ("iops-read-max", self.iops_read_max),
            ("iops-read-max-length", self.iops_read_max_length),
            ("iops-write", self.iops_write),
            ("iops-write-max", self.iops_write_max),
            ("iops-write-max-length", self.iops_write_max_length),
            ("bps-total", self.bps_total),
            ("bps-total-max", self.bps_total_max),
            ("bps-total-max-length", self.bps_total_max_length),
            ("bps-read", self.bps_read),
            ("bps-read-max", self.bps_read_max),
            ("bps-read-max-length", self.bps_read_max_length),
            ("bps-write", self.bps_write),
            ("bps-write-max", self.bps_write_max),
            ("bps-write-max-length", self.bps_write_max_length),
            ("iops-size", self.iops_size),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.map(|v| (name, v)))
        .collect()
    }
}

qapi_struct! {
    /// blockdev-reopen's arguments: each node's complete new options.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockdevReopenArgs {
        req "options" options: Vec<BlockdevOptions>,
    }
}

qapi_struct! {
    /// blockdev-del's arguments.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockdevDelArgs {
        req "node-name" node_name: String,
    }
}

qapi_struct! {
    /// query-named-block-nodes' arguments.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct QueryNamedBlockNodesArgs {
        opt "flat" flat: bool,
    }
}

qapi_struct! {
    /// block-set-write-threshold's arguments (QEMU's names: the threshold
    /// is in bytes, 0 turns it off).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockSetWriteThresholdArgs {
        req "node-name" node_name: String,
        req "write-threshold" write_threshold: u64,
    }
}

qapi_object! {
    /// BLOCK_WRITE_THRESHOLD's data.
    pub BlockWriteThresholdEvent {
        req "node-name": String,
        req "amount-exceeded": u64,
        req "write-threshold": u64,
    }
}

qapi_object! {
    /// BLOCK_IMAGE_CORRUPTED's data (`device` is empty: bexd, like
    /// qemu-storage-daemon, has no guest devices).
    pub BlockImageCorruptedEvent {
        req "device": String,
        opt "node-name": String,
        req "msg": String,
        opt "offset": i64,
        opt "size": i64,
        req "fatal": bool,
    }
}

qapi_object! {
    /// One entry of query-named-block-nodes (the members bexd fills in).
    pub BlockDeviceInfo {
        req "file": String,
        opt "node-name": String,
        req "ro": bool,
        req "drv": String,
        req "encrypted": bool,
        req "detect_zeroes": BlockdevDetectZeroesOptions,
        req "backing_file_depth": i64,
        req "write_threshold": i64,
        req "image": Value,
        req "cache": Value,
        opt "dirty-bitmaps": Vec<BlockDirtyInfo>,
    }
}

qapi_object! {
    /// One bitmap in BlockDeviceInfo's `dirty-bitmaps`.
    pub BlockDirtyInfo {
        req "name": String,
        req "count": i64,
        req "granularity": i64,
        req "recording": bool,
        req "busy": bool,
        req "persistent": bool,
        opt "inconsistent": bool,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyval::parse_keyval;
    use crate::visitor::from_value;
    use serde_json::json;

    #[test]
    fn test_reader_accepts_every_described_member_of_every_driver() {
        crate::introspect::agreement::check::<BlockdevOptions>();
        crate::introspect::agreement::check::<BlockdevRefOrNull>();
    }

    #[test]
    fn test_keyval_raw_with_nested_file() {
        let v = parse_keyval(
            "driver=raw,node-name=r,file.driver=file,file.filename=/a,,b",
            Some("driver"),
        )
        .unwrap();
        let o: BlockdevOptions = from_value(v, InputMode::Keyval).unwrap();
        let BlockdevSpecific::Raw {
            file: BlockdevRef::Definition(inner),
            ..
        } = o.specific
        else {
            panic!("expected an inline file");
        };
        assert!(matches!(inner.specific, BlockdevSpecific::File(ref f) if f.filename == "/a,b"));
    }

    #[test]
    fn test_keyval_empty_backing_is_null() {
        let v = parse_keyval("qcow2,node-name=q,file=f,backing=", Some("driver")).unwrap();
        let o: BlockdevOptions = from_value(v, InputMode::Keyval).unwrap();
        let BlockdevSpecific::Qcow2(q) = o.specific else {
            panic!("expected qcow2");
        };
        assert_eq!(q.backing, Some(BlockdevRefOrNull::Null));
    }

    #[test]
    fn test_unknown_driver_is_refused() {
        let e =
            from_value::<BlockdevOptions>(json!({"driver": "bogus"}), InputMode::Json).unwrap_err();
        assert_eq!(e.desc, "Parameter 'driver' does not accept value 'bogus'");
    }

    #[test]
    fn test_null_size_is_an_int_not_a_size() {
        let v = parse_keyval("null-co,node-name=n,size=1M", Some("driver")).unwrap();
        let e = from_value::<BlockdevOptions>(v, InputMode::Keyval).unwrap_err();
        assert_eq!(e.desc, "Parameter 'size' expects integer");
    }

    #[test]
    fn test_cache_direct_keyval_garbage() {
        let v = parse_keyval(
            "file,node-name=f,filename=x,cache.direct=maybe",
            Some("driver"),
        )
        .unwrap();
        let e = from_value::<BlockdevOptions>(v, InputMode::Keyval).unwrap_err();
        assert_eq!(e.desc, "Parameter 'cache.direct' expects 'on' or 'off'");
    }
}

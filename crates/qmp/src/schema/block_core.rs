//! qapi/block-core.json: BlockdevOptions for the drivers bexd implements.

use serde_json::Value;

use crate::visitor::{Ctx, Fields, FromQapi, InputMode};
use crate::{qapi_enum, QmpError};

qapi_enum!(BlockdevDriver {
    Blkdebug = "blkdebug",
    File = "file",
    HostDevice = "host_device",
    Raw = "raw",
    NullCo = "null-co",
    NullAio = "null-aio",
    Qcow2 = "qcow2",
});
qapi_enum!(BlockdevDiscardOptions { Ignore = "ignore", Unmap = "unmap" });
qapi_enum!(BlockdevDetectZeroesOptions { Off = "off", On = "on", Unmap = "unmap" });
qapi_enum!(OnOffAuto { Auto = "auto", On = "on", Off = "off" });
qapi_enum!(BlockdevAioOptions { Threads = "threads", Native = "native", IoUring = "io_uring" });

/// BlockdevCacheOptions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockdevCacheOptions {
    pub direct: Option<bool>,
    pub no_flush: Option<bool>,
}

impl FromQapi for BlockdevCacheOptions {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let r = Self {
            direct: f.optional("direct")?,
            no_flush: f.optional("no-flush")?,
        };
        f.finish()?;
        Ok(r)
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockdevOptionsFile {
    pub filename: String,
    pub pr_manager: Option<String>,
    pub locking: Option<OnOffAuto>,
    pub aio: Option<BlockdevAioOptions>,
    pub aio_max_batch: Option<i64>,
    pub drop_cache: Option<bool>,
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

qapi_enum!(BlkdebugIOType {
    Read = "read",
    Write = "write",
    WriteZeroes = "write-zeroes",
    Discard = "discard",
    Flush = "flush",
    BlockStatus = "block-status",
});

/// One `inject-error` rule of blkdebug (plus bexd's `x-after`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkdebugInjectError {
    pub event: String,
    pub state: Option<i64>,
    pub iotype: Option<BlkdebugIOType>,
    pub errno: Option<i64>,
    pub sector: Option<i64>,
    pub once: Option<bool>,
    pub immediately: Option<bool>,
    pub x_after: Option<u64>,
}

impl FromQapi for BlkdebugInjectError {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let r = Self {
            event: f.required("event")?,
            state: f.optional("state")?,
            iotype: f.optional("iotype")?,
            errno: f.optional("errno")?,
            sector: f.optional("sector")?,
            once: f.optional("once")?,
            immediately: f.optional("immediately")?,
            x_after: f.optional("x-after")?,
        };
        f.finish()?;
        Ok(r)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockdevSpecific {
    Blkdebug {
        image: BlockdevRef,
        inject_error: Option<Vec<BlkdebugInjectError>>,
    },
    File(BlockdevOptionsFile),
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
}

/// BlockdevOptionsQcow2 (the members bexd acts on; the others are accepted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockdevOptionsQcow2 {
    pub file: BlockdevRef,
    pub backing: Option<BlockdevRefOrNull>,
    pub lazy_refcounts: Option<bool>,
    pub cache_size: Option<i64>,
    pub l2_cache_size: Option<i64>,
    pub refcount_cache_size: Option<i64>,
    pub cache_clean_interval: Option<i64>,
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
    })
}

fn read_specific(driver: BlockdevDriver, f: &mut Fields) -> Result<BlockdevSpecific, QmpError> {
    Ok(match driver {
        BlockdevDriver::Blkdebug => BlockdevSpecific::Blkdebug {
            image: f.required("image")?,
            inject_error: f.optional("inject-error")?,
        },
        BlockdevDriver::File | BlockdevDriver::HostDevice => {
            BlockdevSpecific::File(BlockdevOptionsFile {
                filename: f.required("filename")?,
                pr_manager: f.optional("pr-manager")?,
                locking: f.optional("locking")?,
                aio: f.optional("aio")?,
                aio_max_batch: f.optional("aio-max-batch")?,
                drop_cache: f.optional("drop-cache")?,
            })
        }
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
        BlockdevDriver::Qcow2 => {
            let r = BlockdevSpecific::Qcow2(BlockdevOptionsQcow2 {
                backing: f.optional("backing")?,
                file: f.required("file")?,
                lazy_refcounts: f.optional("lazy-refcounts")?,
                cache_size: f.optional("cache-size")?,
                l2_cache_size: f.optional("l2-cache-size")?,
                refcount_cache_size: f.optional("refcount-cache-size")?,
                cache_clean_interval: f.optional("cache-clean-interval")?,
            });
            // Members bexd accepts without acting on them.
            for key in [
                "pass-discard-request",
                "pass-discard-snapshot",
                "pass-discard-other",
                "discard-no-unref",
                "overlap-check",
                "l2-cache-entry-size",
                "encrypt",
                "data-file",
            ] {
                let _: Option<Value> = f.optional(key)?;
            }
            r
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyval::parse_keyval;
    use crate::visitor::from_value;
    use serde_json::json;

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

//! `detect-zeroes` at the node: which driver call a WRITE becomes.

use std::sync::{Arc, Mutex};

use block::test_utils::MemDriver;
use block::{BlockNode, BlockResult, Capabilities, DetectZeroes, Driver, Extent, IoBuf, ZeroFlags};

/// What reached the driver, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Write {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
    Flush,
}

/// A memory driver that records the calls the node makes.
#[derive(Debug)]
struct Recorder {
    mem: MemDriver,
    calls: Mutex<Vec<Call>>,
}

impl Recorder {
    fn new(size: usize) -> Self {
        Self {
            mem: MemDriver::new(size),
            calls: Mutex::default(),
        }
    }
    fn mem(&self) -> &MemDriver {
        &self.mem
    }
    fn record(&self, c: Call) {
        self.calls.lock().unwrap().push(c);
    }
}

impl Driver for Recorder {
    fn driver_name(&self) -> &'static str {
        "recorder"
    }
    fn size(&self) -> u64 {
        self.mem().size()
    }
    fn capabilities(&self) -> Capabilities {
        self.mem().capabilities()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.mem().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.record(Call::Write {
            offset,
            len: buf.len() as u64,
            fua,
        });
        self.mem().write_at(buf, offset, fua)
    }
    fn flush(&self) -> BlockResult<()> {
        self.record(Call::Flush);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.mem().discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.record(Call::Zeroes {
            offset,
            len,
            may_unmap: flags.may_unmap,
        });
        self.mem().write_zeroes(offset, len, flags)
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.mem().block_status(offset, len)
    }
}

fn calls_for(mode: DetectZeroes, payload: &[u8], fua: bool) -> Vec<Call> {
    let driver = Arc::new(Recorder::new(1 << 20));
    let node = BlockNode::new("n".into(), driver.clone(), false).with_detect_zeroes(mode);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut buf = IoBuf::zeroed(payload.len());
    buf.copy_from_slice(payload);
    let (_, r) = rt.block_on(node.write(buf, 8192, fua));
    r.unwrap();
    let calls = driver.calls.lock().unwrap().clone();
    calls
}

#[test]
fn test_off_writes_zeroes_as_data() {
    assert_eq!(
        calls_for(DetectZeroes::Off, &[0; 4096], false),
        [Call::Write {
            offset: 8192,
            len: 4096,
            fua: false
        }]
    );
}

#[test]
fn test_on_turns_a_zero_write_into_write_zeroes_that_keeps_allocation() {
    assert_eq!(
        calls_for(DetectZeroes::On, &[0; 4096], false),
        [Call::Zeroes {
            offset: 8192,
            len: 4096,
            may_unmap: false
        }]
    );
}

#[test]
fn test_unmap_may_deallocate_and_fua_becomes_a_flush() {
    assert_eq!(
        calls_for(DetectZeroes::Unmap, &[0; 65536], true),
        [
            Call::Zeroes {
                offset: 8192,
                len: 65536,
                may_unmap: true
            },
            Call::Flush
        ]
    );
}

#[test]
fn test_data_is_written_whatever_the_mode() {
    let mut data = vec![0u8; 4096];
    data[4095] = 1;
    for mode in [DetectZeroes::On, DetectZeroes::Unmap] {
        assert_eq!(
            calls_for(mode, &data, false),
            [Call::Write {
                offset: 8192,
                len: 4096,
                fua: false
            }],
            "{mode:?}"
        );
    }
}

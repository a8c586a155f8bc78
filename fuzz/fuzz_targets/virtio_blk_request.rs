//! The virtio-blk request parser must be total: any descriptor chain (any
//! addresses, lengths and directions) and any header or segment bytes,
//! whether guest memory answers or not, either give a request whose ranges
//! lie within the device or are refused; nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_blk::{parse, Desc, Geometry, Op, MAX_SEGMENTS};

/// Little-endian integers off the front of the input, zero once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let [selector, count] = input.bytes::<2>();
    let geometry = Geometry {
        capacity: u64::from_le_bytes(input.bytes::<8>()),
        block_size: 512 << (selector & 7),
        writable: selector & 8 != 0,
    };
    let header = input.bytes::<16>();
    let segment = input.bytes::<16>();
    let memory_answers = selector & 16 != 0;
    let chain: Vec<Desc> = (0..usize::from(count).min(MAX_SEGMENTS + 2))
        .map(|_| {
            let raw = input.bytes::<13>();
            Desc {
                addr: u64::from_le_bytes(raw[0..8].try_into().unwrap()),
                len: u32::from_le_bytes(raw[8..12].try_into().unwrap()),
                write_only: raw[12] & 1 != 0,
            }
        })
        .collect();
    let read = |h: [u8; 16]| move |_| memory_answers.then_some(h);
    if let Ok(request) = parse(&chain, &geometry, read(header), read(segment)) {
        let range = match request.op {
            Op::Read { offset, len } | Op::Write { offset, len } => Some((offset, len)),
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => Some((offset, len)),
            Op::Flush | Op::GetId => None,
        };
        if let Some((offset, len)) = range {
            assert!(offset.checked_add(len).is_some_and(|end| end <= geometry.capacity));
        }
        assert!(!matches!(request.op, Op::Write { .. }) || geometry.writable);
    }
});

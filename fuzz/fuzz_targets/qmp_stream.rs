//! Arbitrary bytes into the QMP JSON stream and request parser: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut stream = qmp::wire::JsonStream::new();
    for piece in data.chunks(97) {
        stream.feed(piece);
        while let Some(item) = stream.next() {
            if let Ok(value) = item {
                let _ = qmp::wire::parse_request(value, true);
            }
        }
    }
});

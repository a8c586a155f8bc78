//! Arbitrary bytes into the QMP JSON stream, the request parser and the QAPI
//! visitors of every command argument type: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmp::schema::bitmap::{BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge, Transaction};
use qmp::schema::block_core::BlockdevOptions;
use qmp::schema::block_export::{BlockExportOptions, NbdServerAddOptions, NbdServerOptions};
use qmp::visitor::{from_value, Ctx, InputMode};
use serde_json::Value;

fn visit_all(arguments: Value) {
    for mode in [InputMode::Json, InputMode::Keyval] {
        let _ = from_value::<BlockExportOptions>(arguments.clone(), mode);
        let _ = from_value::<BlockdevOptions>(arguments.clone(), mode);
        let _ = from_value::<NbdServerAddOptions>(arguments.clone(), mode);
        let _ = from_value::<BlockDirtyBitmapAdd>(arguments.clone(), mode);
        let _ = from_value::<BlockDirtyBitmap>(arguments.clone(), mode);
        let _ = from_value::<BlockDirtyBitmapMerge>(arguments.clone(), mode);
        let _ = from_value::<Transaction>(arguments.clone(), mode);
        let _ = NbdServerOptions::read(arguments.clone(), &Ctx::root(mode), true);
        let _ = NbdServerOptions::read(arguments.clone(), &Ctx::root(mode), false);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut stream = qmp::wire::JsonStream::new();
    for piece in data.chunks(97) {
        stream.feed(piece);
        while let Some(item) = stream.next() {
            let Ok(value) = item else { continue };
            if let Ok(request) = qmp::wire::parse_request(value, true) {
                visit_all(Value::Object(request.arguments));
            }
        }
    }
});

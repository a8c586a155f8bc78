//! Arbitrary strings through the keyval parser and then the typed visitor.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(value) = qmp::keyval::parse_keyval(text, Some("driver")) {
        let _ = qmp::visitor::from_value::<qmp::schema::block_core::BlockdevOptions>(
            value,
            qmp::visitor::InputMode::Keyval,
        );
    }
});

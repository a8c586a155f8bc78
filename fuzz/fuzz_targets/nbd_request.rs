//! The transmission request decoder and validator must be total: any 28 bytes
//! either decode or are refused, and validation never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::consts::REQUEST_HEADER_LEN;

fuzz_target!(|data: &[u8]| {
    for chunk in data.chunks_exact(REQUEST_HEADER_LEN) {
        let Ok(header) = <&[u8; REQUEST_HEADER_LEN]>::try_from(chunk) else {
            continue;
        };
        if let Ok(request) = nbd::request::decode_request(header) {
            let _ = request.payload_len();
        }
    }
});

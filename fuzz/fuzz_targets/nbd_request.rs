//! The transmission request path must be total: any header bytes, compact
//! (28) or extended (32), either decode or are refused; what follows a header
//! (`incoming`), a BLOCK_STATUS context filter, and validation never panic,
//! whatever the session negotiated.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::export::{BlockSize, ExportInfo, MetaContext};
use nbd::handshake::Negotiated;
use nbd::request::{
    incoming, status_filter, validate, validate_selected, HeaderForm, StatusFilter,
};

/// A session picked by the input's first byte: compact or extended headers,
/// structured or not, with or without contexts, a small or a huge export.
fn session(selector: u8) -> Negotiated {
    let export = ExportInfo {
        name: "disk".into(),
        description: None,
        size: if selector & 4 != 0 { 1 << 40 } else { 1 << 20 },
        read_only: selector & 8 != 0,
        can_trim: true,
        can_write_zeroes: true,
        can_fast_zero: true,
        can_multi_conn: true,
        can_cache: true,
        block_size: BlockSize {
            min: 1,
            preferred: 4096,
            max: 32 << 20,
        },
        meta_contexts: vec![MetaContext::BaseAllocation, MetaContext::AllocationDepth],
    };
    let extended = selector & 1 != 0;
    let structured = extended || selector & 2 != 0;
    let meta_contexts = match selector & 16 {
        0 => vec![
            (0, MetaContext::BaseAllocation),
            (1, MetaContext::AllocationDepth),
        ],
        _ => Vec::new(),
    };
    Negotiated {
        transmission_flags: export.transmission_flags(structured),
        structured_replies: structured,
        extended_headers: extended,
        meta_contexts,
        export,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let negotiated = session(selector);
    let form = HeaderForm::of(&negotiated);
    let mut rest = rest;
    while rest.len() >= form.header_len() {
        let (header, tail) = rest.split_at(form.header_len());
        rest = tail;
        let _ = form.fields(header);
        let Ok(request) = form.decode(header) else {
            continue;
        };
        let _ = request.payload_len();
        let _ = incoming(&request, &negotiated);
        let _ = validate(&request, &negotiated);
        // The next bytes as a context filter for it.
        let take = rest.len().min(64);
        match status_filter(&rest[..take], &negotiated) {
            StatusFilter::Valid { length, ids } => {
                let effective = nbd::request::RequestHeader { length, ..request };
                let _ = validate_selected(&effective, &negotiated, ids.len());
            }
            StatusFilter::Invalid => {}
        }
    }
});

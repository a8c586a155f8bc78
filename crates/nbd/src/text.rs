//! Strings on the wire (export names, descriptions, error messages) are
//! bounded by the protocol; both the handshake and the replies cut them the
//! same way. A leaf module, so neither has to import the other for it.

/// `s` cut to at most `max` bytes, on a character boundary.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

//! QEMU's rule for ids (node names, export ids, object ids).

/// A letter first, then letters, digits, `-`, `.`, `_` (QEMU's `id_wellformed`).
pub fn is_well_formed_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_is_well_formed_id_rejects_leading_digit() {
        assert!(!is_well_formed_id("1a"));
    }

    #[test]
    fn test_is_well_formed_id_accepts_qemu_punctuation() {
        assert!(is_well_formed_id("disk-0.raw_a"));
    }

    #[test]
    fn test_is_well_formed_id_rejects_empty() {
        assert!(!is_well_formed_id(""));
    }
}

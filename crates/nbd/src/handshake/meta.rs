//! Matching meta-context queries against what an export offers.

use crate::export::{ExportInfo, MetaContext};

/// Whether the query is for listing (wildcards allowed) or selecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QueryMode {
    List,
    Set,
}

/// The contexts of `export` that `queries` select, without duplicates, in
/// the export's order (which is QEMU's reply order). Unknown namespaces and
/// leaves are ignored, as the spec asks. Queries are raw bytes: one that is
/// not UTF-8 simply matches nothing.
pub(crate) fn select(export: &ExportInfo, queries: &[&[u8]], mode: QueryMode) -> Vec<MetaContext> {
    if queries.is_empty() {
        return match mode {
            QueryMode::List => export.meta_contexts.clone(),
            QueryMode::Set => Vec::new(),
        };
    }
    let contexts = &export.meta_contexts;
    contexts
        .iter()
        .enumerate()
        .filter(|&(i, ctx)| {
            // An export may offer one bitmap twice; an exact name selects
            // only the first, as in QEMU, so the client gets one answer.
            let first = !contexts[..i].iter().any(|c| c.name() == ctx.name());
            queries.iter().any(|q| match ctx.name().as_bytes() == *q {
                true => first,
                false => matches(ctx, q, mode),
            })
        })
        .map(|(_, ctx)| ctx.clone())
        .collect()
}

/// Exact names match in both modes; LIST also takes QEMU's namespace
/// wildcards (`base:`, `qemu:`, `qemu:dirty-bitmap:`).
fn matches(ctx: &MetaContext, query: &[u8], mode: QueryMode) -> bool {
    if ctx.name().as_bytes() == query {
        return true;
    }
    if mode == QueryMode::Set {
        return false;
    }
    match ctx {
        MetaContext::BaseAllocation => query == b"base:",
        MetaContext::AllocationDepth => query == b"qemu:",
        MetaContext::DirtyBitmap(_) => query == b"qemu:" || query == b"qemu:dirty-bitmap:",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tests::writable_export;

    #[test]
    fn test_select_by_name_takes_the_first_of_a_twice_offered_bitmap() {
        let mut e = writable_export();
        let b = MetaContext::DirtyBitmap("b".into());
        e.meta_contexts.extend([b.clone(), b.clone()]);
        assert_eq!(
            select(&e, &[b"qemu:dirty-bitmap:b"], QueryMode::Set),
            vec![b.clone()]
        );
        let listed = select(&e, &[b"qemu:dirty-bitmap:"], QueryMode::List);
        assert_eq!(listed.iter().filter(|c| **c == b).count(), 2);
    }

    #[test]
    fn test_select_when_list_has_no_queries_returns_all() {
        let e = writable_export();
        assert_eq!(select(&e, &[], QueryMode::List).len(), 2);
    }

    #[test]
    fn test_select_when_set_has_no_queries_returns_none() {
        let e = writable_export();
        assert!(select(&e, &[], QueryMode::Set).is_empty());
    }

    #[test]
    fn test_select_when_set_uses_namespace_wildcard_returns_none() {
        let e = writable_export();
        assert!(select(&e, &[b"base:"], QueryMode::Set).is_empty());
    }

    #[test]
    fn test_select_when_list_uses_base_wildcard_returns_base_allocation() {
        let e = writable_export();
        let got = select(&e, &[b"base:"], QueryMode::List);
        assert_eq!(got, vec![MetaContext::BaseAllocation]);
    }

    #[test]
    fn test_select_when_list_uses_bitmap_prefix_returns_bitmaps() {
        let e = writable_export();
        let got = select(&e, &[b"qemu:dirty-bitmap:"], QueryMode::List);
        assert_eq!(got, vec![MetaContext::DirtyBitmap("b0".into())]);
    }

    #[test]
    fn test_select_when_set_names_bitmap_returns_it() {
        let e = writable_export();
        let got = select(&e, &[b"qemu:dirty-bitmap:b0"], QueryMode::Set);
        assert_eq!(got, vec![MetaContext::DirtyBitmap("b0".into())]);
    }

    #[test]
    fn test_select_when_query_repeated_returns_context_once() {
        let e = writable_export();
        let got = select(
            &e,
            &[b"base:allocation", b"base:allocation"],
            QueryMode::Set,
        );
        assert_eq!(got, vec![MetaContext::BaseAllocation]);
    }

    #[test]
    fn test_select_when_namespace_unknown_returns_none() {
        let e = writable_export();
        assert!(select(&e, &[b"x-foo:bar"], QueryMode::Set).is_empty());
    }

    #[test]
    fn test_select_when_allocation_depth_not_offered_returns_none() {
        let e = writable_export();
        assert!(select(&e, &[b"qemu:allocation-depth"], QueryMode::Set).is_empty());
    }
}

//! Matching meta-context queries against what an export offers.

use crate::export::{ExportInfo, MetaContext};

/// Whether the query is for listing (wildcards allowed) or selecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QueryMode {
    List,
    Set,
}

/// The contexts of `export` that `queries` select, without duplicates, in
/// the export's order. Unknown namespaces and leaves are ignored, as the spec asks.
pub(crate) fn select(export: &ExportInfo, queries: &[String], mode: QueryMode) -> Vec<MetaContext> {
    if queries.is_empty() {
        return match mode {
            QueryMode::List => export.meta_contexts.clone(),
            QueryMode::Set => Vec::new(),
        };
    }
    export
        .meta_contexts
        .iter()
        .filter(|ctx| queries.iter().any(|q| matches(ctx, q, mode)))
        .cloned()
        .collect()
}

fn matches(ctx: &MetaContext, query: &str, mode: QueryMode) -> bool {
    let name = ctx.name();
    if name == query {
        return true;
    }
    if mode == QueryMode::Set {
        return false;
    }
    match ctx {
        MetaContext::BaseAllocation => query == "base:",
        MetaContext::AllocationDepth => query == "qemu:",
        MetaContext::DirtyBitmap(_) => query == "qemu:" || query == "qemu:dirty-bitmap:",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tests::writable_export;

    #[test]
    fn test_select_list_empty_query_returns_all() {
        let e = writable_export();
        assert_eq!(select(&e, &[], QueryMode::List).len(), 2);
    }

    #[test]
    fn test_select_set_ignores_namespace_wildcard() {
        let e = writable_export();
        assert!(select(&e, &["base:".into()], QueryMode::Set).is_empty());
    }

    #[test]
    fn test_select_list_bitmap_prefix_returns_bitmaps() {
        let e = writable_export();
        let got = select(&e, &["qemu:dirty-bitmap:".into()], QueryMode::List);
        assert_eq!(got, vec![MetaContext::DirtyBitmap("b0".into())]);
    }

    #[test]
    fn test_select_unknown_namespace_is_ignored() {
        let e = writable_export();
        assert!(select(&e, &["x-foo:bar".into()], QueryMode::Set).is_empty());
    }
}

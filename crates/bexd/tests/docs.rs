//! The README and docs/ describe what bexd does now: phrases that promise a
//! feature for later went stale once the feature landed (the
//! `qemu:allocation-depth` context, persistent bitmaps), so they are kept out.
//! What is still missing is written as "Not yet: ..." lists, which name it.

use std::path::Path;

/// Wordings that announced a feature as coming.
const PROMISES: &[&str] = &[
    "the coming",
    "for now",
    "in the future",
    "will be added",
    "soon",
];

fn docs() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/") {
        let path = entry.expect("docs entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable doc");
            (p.display().to_string(), text.replace('\n', " "))
        })
        .collect()
}

#[test]
fn test_docs_promise_nothing_for_later() {
    let mut found = Vec::new();
    for (path, text) in docs() {
        let lower = text.to_lowercase();
        for phrase in PROMISES {
            if let Some(at) = lower.find(phrase) {
                let from = lower[..at]
                    .char_indices()
                    .rev()
                    .nth(40)
                    .map_or(0, |(i, _)| i);
                found.push(format!("{path}: ...{}...", &text[from..at + phrase.len()]));
            }
        }
    }
    assert!(found.is_empty(), "stale promises:\n{}", found.join("\n"));
}

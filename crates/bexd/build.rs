//! Embeds the commit bexd is built from, for `--version`: `git rev-parse`
//! when the crate sits in its own git checkout, else `BEXD_GIT_COMMIT` if a
//! packager building from a tarball sets it, else nothing (the version line
//! then has no commit, rather than a wrong one).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BEXD_GIT_COMMIT");
    let suffix = match commit() {
        Some(c) => format!(" (commit {c})"),
        None => String::new(),
    };
    println!("cargo:rustc-env=BEXD_VERSION_SUFFIX={suffix}");
}

fn commit() -> Option<String> {
    if let Some(c) = std::env::var("BEXD_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
    {
        return Some(c);
    }
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let workspace = manifest.parent()?.parent()?.canonicalize().ok()?;
    // A tarball unpacked inside some other repository must not take its hash.
    let top = git(&manifest, &["rev-parse", "--show-toplevel"])?;
    if Path::new(&top).canonicalize().ok()? != workspace {
        return None;
    }
    // Rebuild the line when HEAD moves (a commit, a checkout).
    for what in ["HEAD", "logs/HEAD"] {
        if let Some(p) = git(&manifest, &["rev-parse", "--git-path", what]) {
            let p = manifest.join(p);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
    git(&manifest, &["rev-parse", "--short=12", "HEAD"])
}

/// One line of a git command's output, or `None` if git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.trim();
    (out.status.success() && !line.is_empty()).then(|| line.to_string())
}

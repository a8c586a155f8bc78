//! The command line, tested on the real binary: bad options exit 1 with one
//! line naming the culprit, good ones start the daemon.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bexd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bexd"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run bexd")
}

fn stderr_line(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {text:?}");
    lines[0].to_string()
}

#[test]
fn test_unknown_option_exits_1_with_one_line() {
    let out = bexd(&["--bogus"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr_line(&out), "bexd: unrecognized option '--bogus'");
}

#[test]
fn test_missing_file_names_the_option_and_the_file() {
    let out = bexd(&[
        "--blockdev",
        "driver=file,node-name=f0,filename=/nonexistent/x.img",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let line = stderr_line(&out);
    assert!(line.starts_with("bexd: --blockdev driver=file,"), "{line}");
    assert!(line.contains("/nonexistent/x.img"), "{line}");
}

#[test]
fn test_export_before_its_node_is_refused() {
    let out = bexd(&["--export", "type=nbd,id=e0,node-name=n0"]);
    assert_eq!(out.status.code(), Some(1));
    let line = stderr_line(&out);
    assert!(
        line.starts_with("bexd: --export type=nbd,id=e0,node-name=n0: "),
        "{line}"
    );
}

#[test]
fn test_unexpected_member_is_named() {
    let out = bexd(&["--blockdev", "driver=null-co,node-name=n0,bogus=1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).ends_with("Parameter 'bogus' is unexpected"));
}

#[test]
fn test_root_node_without_name_is_refused() {
    let out = bexd(&["--blockdev", "driver=null-co"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).ends_with("'node-name' must be specified for the root node"));
}

#[test]
fn test_help_and_version_exit_0() {
    let help = bexd(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--nbd-server"));
    let version = bexd(&["-V"]);
    assert_eq!(version.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("bexd version "));
}

/// The commit of this checkout, as build.rs embeds it; `None` outside git.
fn checkout_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn test_version_names_the_commit_and_the_qemu_release() {
    let out = bexd(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    let expected = match checkout_commit() {
        Some(c) => format!("bexd version {} (commit {c})", env!("CARGO_PKG_VERSION")),
        None => format!("bexd version {}", env!("CARGO_PKG_VERSION")),
    };
    assert_eq!(lines[0], expected);
    assert_eq!(
        lines[1],
        "compatible with qemu-storage-daemon and qemu-nbd version 10.0.2"
    );
    let serve = bexd(&["serve", "--version"]);
    assert_eq!(serve.status.code(), Some(0));
    let serve_text = String::from_utf8_lossy(&serve.stdout).to_string();
    assert_eq!(
        serve_text.trim_end(),
        lines[0].replace("bexd version", "bexd serve")
    );
}

fn wait_for(path: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn test_daemonize_returns_after_startup_and_writes_pidfile() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("bexd.pid");
    let sock = dir.path().join("nbd.sock");
    let out = bexd(&[
        "--blockdev",
        "driver=null-co,node-name=n0,size=1048576",
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", sock.display()),
        "--export",
        "type=nbd,id=e0,node-name=n0",
        "--pidfile",
        pidfile.to_str().unwrap(),
        "--daemonize",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wait_for(&pidfile));
    assert!(
        sock.exists(),
        "the NBD socket exists once the parent returned"
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pidfile.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!pidfile.exists(), "the pid file is removed at exit");
}

#[test]
fn test_daemonize_failure_makes_the_parent_exit_1() {
    let out = bexd(&["--blockdev", "driver=bogus,node-name=n0", "--daemonize"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn test_object_missing_member_is_named() {
    let out = bexd(&["--object", "authz-simple,id=a0"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr_line(&out),
        "bexd: --object authz-simple,id=a0: Parameter 'identity' is missing"
    );
}

#[test]
fn test_tls_credentials_missing_file_is_named_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let arg = format!(
        "tls-creds-x509,id=t0,dir={},endpoint=server",
        dir.path().display()
    );
    let out = bexd(&["--object", &arg]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr_line(&out),
        format!(
            "bexd: --object {arg}: Unable to access credentials {}/ca-cert.pem: No such file or directory",
            dir.path().display()
        )
    );
}

#[test]
fn test_tls_creds_must_name_tls_credentials() {
    let out = bexd(&[
        "--object",
        "authz-simple,id=a0,identity=x",
        "--nbd-server",
        "addr.type=unix,addr.path=/nonexistent/x.sock,tls-creds=a0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).ends_with("Object with id 'a0' is not TLS credentials"));
}

/// docs/bexd.8 is `bexd --man`'s output, committed: regenerate it with
/// `target/release/bexd --man > docs/bexd.8` when an option changes.
#[test]
fn test_committed_man_page_is_what_bexd_generates() {
    let out = bexd(&["--man"]);
    assert_eq!(out.status.code(), Some(0));
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/bexd.8"))
            .expect("docs/bexd.8");
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "docs/bexd.8 is stale: run target/release/bexd --man > docs/bexd.8"
    );
}

/// Every option either --help shows is on the man page.
#[test]
fn test_every_option_of_help_is_on_the_man_page() {
    let page = String::from_utf8_lossy(&bexd(&["--man"]).stdout).replace("\\-", "-");
    for help in [bexd(&["--help"]), bexd(&["serve", "--help"])] {
        let text = String::from_utf8_lossy(&help.stdout).to_string();
        let options: Vec<&str> = text
            .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == '=')
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
            .collect();
        assert!(options.len() > 5, "no options found in {text}");
        for o in options {
            // clap's own --help and --version are the daemon's too.
            assert!(page.contains(o), "{o} from --help is not on the man page");
        }
    }
}

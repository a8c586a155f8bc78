//! bexd(8), in roff, generated from the definitions `--help` prints: the
//! daemon's option table (`cli_options.rs`) and `bexd serve`'s clap
//! parser. `bexd --man` prints it; `docs/bexd.8` is that output, committed
//! for packagers, and a test fails when the two differ.

use crate::cli_options::{OptionDoc, OPTIONS};

/// Variables bexd reads, and what for.
const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "BEXD_LOG",
        "A tracing filter for the log: a level (error, warn, info, debug, trace) or \
         target=level directives, e.g. bexd::nbd_server=debug. Default: warn (info with \
         bexd serve -v).",
    ),
    (
        "BEXD_SYSLOG_SOCKET",
        "The datagram socket --log-target=syslog sends to, instead of /dev/log.",
    ),
    (
        "BEXD_JOURNAL_SOCKET",
        "The datagram socket --log-target=journal sends to, instead of \
         /run/systemd/journal/socket.",
    ),
    (
        "BEXD_MAX_BLOCKING_THREADS",
        "Sizes the blocking pool when no main-loop object does (default 64).",
    ),
    (
        "BEXD_NBD_PAYLOAD_BUDGET_MIB",
        "Replaces the NBD server's x-payload-budget, in MiB.",
    ),
    (
        "LISTEN_PID, LISTEN_FDS",
        "Socket activation: with LISTEN_PID the process id and LISTEN_FDS=1, bexd serve \
         serves on descriptor 3, as qemu-nbd does.",
    ),
    (
        "BEXD_GIT_COMMIT",
        "At build time: the commit --version names when bexd is not built in its own git \
         checkout.",
    ),
];

/// The whole page.
pub fn page() -> String {
    let mut out = String::new();
    out.push_str(&format!(
        ".TH BEXD 8 \"\" \"bexd {}\" \"System Administration\"\n",
        env!("CARGO_PKG_VERSION")
    ));
    out.push_str(
        ".SH NAME\nbexd \\- the block export daemon: disk images over NBD, managed over QMP\n",
    );
    out.push_str(
        ".SH SYNOPSIS\n\
         .B bexd\n[\\fIoptions\\fR]\n.br\n\
         .B bexd serve\n[\\fIoptions\\fR] \\fIIMAGE\\fR\n.br\n\
         .B bexd qmp\n\\fISOCKET\\fR|\\fIHOST\\fR:\\fIPORT\\fR\n.br\n\
         .B bexd backup\n\\-\\-uri \\fIURI\\fR \\-\\-output \\fIFILE\\fR [\\-\\-bitmap \\fINAME\\fR]\n.br\n\
         .B bexd backup\n\\-\\-live \\-\\-qmp \\fIADDR\\fR \\-\\-nbd \\fIADDR\\fR \\-\\-node \\fINODE\\fR \\-\\-output \\fIFILE\\fR [\\-\\-bitmap \\fINAME\\fR [\\-\\-incremental]]\n.br\n\
         .B bexd top\n[\\-b] [\\-d \\fISECONDS\\fR] [\\-n \\fIN\\fR] \\fISOCKET\\fR|\\fIHOST\\fR:\\fIPORT\\fR\n",
    );
    out.push_str(&format!(
        ".SH DESCRIPTION\n{}\n.PP\n{}\n",
        escape(
            "bexd serves disk images and block devices over NBD and is managed over QMP. \
             It is a drop-in replacement for qemu-storage-daemon's exports: the same command \
             line (options are applied in the order given, in QEMU's key=value or JSON form), \
             the same QMP commands, error classes and events."
        ),
        escape(
            "bexd serve takes qemu-nbd's command line and serves one image as qemu-nbd does. \
             bexd qmp is an interactive QMP shell; bexd backup pulls a full or incremental \
             backup from an NBD export, or with --live a point-in-time backup of a node that a \
             running bexd or qemu-storage-daemon serves and clients keep writing (it freezes a \
             view through QMP, pulls it over NBD, takes it down and keeps the bitmap for the \
             next incremental); bexd top is a live view of a running daemon's exports \
             (IOPS, MiB/s, latency, clients)."
        )
    ));
    out.push_str(".SH OPTIONS\n");
    for option in OPTIONS {
        out.push_str(&daemon_option(option));
    }
    out.push_str(&format!(
        ".PP\n{}\n",
        escape(crate::cli_options::HELP_FOOT.trim_end())
    ));
    out.push_str(".SH SERVE OPTIONS\n");
    out.push_str(&format!(
        "{}\n",
        escape("Options of bexd serve, as qemu-nbd's (bexd serve --help shows the same):")
    ));
    for arg in crate::serve::command().get_arguments() {
        if arg.is_hide_set() || arg.is_positional() {
            continue;
        }
        out.push_str(&serve_option(arg));
    }
    out.push_str(".SH BACKUP OPTIONS\n");
    out.push_str(&format!(
        "{}\n",
        escape("Options of bexd backup (bexd backup --help shows the same):")
    ));
    for arg in crate::backup::command().get_arguments() {
        if arg.is_hide_set() || arg.is_positional() {
            continue;
        }
        out.push_str(&serve_option(arg));
    }
    out.push_str(".SH ENVIRONMENT\n");
    for (name, what) in ENVIRONMENT {
        out.push_str(&format!(".TP\n.B {}\n{}\n", escape(name), escape(what)));
    }
    out.push_str(
        ".SH EXIT STATUS\n0 after a clean shutdown (SIGTERM, SIGINT, SIGHUP or the quit \
         command); 1 when the command line or start-up fails, with a one-line message on \
         standard error.\n",
    );
    out.push_str(
        ".SH SEE ALSO\n\
         .BR qemu\\-storage\\-daemon (1),\n\
         .BR qemu\\-nbd (8),\n\
         .BR qemu\\-img (1),\n\
         .BR nbdinfo (1),\n\
         .BR systemd.socket (5)\n",
    );
    out
}

fn daemon_option(option: &OptionDoc) -> String {
    let usage: Vec<String> = option
        .usage
        .iter()
        .map(|l| format!("\\fB{}\\fR", escape(l.trim_start())))
        .collect();
    let mut help = option.help.join(" ");
    if !option.choices.is_empty() {
        help = format!("{help} {}", option.choices.join(", "));
    }
    format!(".TP\n{}\n.br\n{}\n", usage.join("\n.br\n"), escape(&help))
}

fn serve_option(arg: &clap::Arg) -> String {
    let value = arg
        .get_value_names()
        .map(|names| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            format!(" \\fI{}\\fR", escape(&names.join(" ")))
        })
        .filter(|_| arg.get_action().takes_values())
        .unwrap_or_default();
    let mut flags = Vec::new();
    if let Some(s) = arg.get_short() {
        flags.push(format!("\\fB\\-{}\\fR", escape(&s.to_string())));
    }
    if let Some(l) = arg.get_long() {
        flags.push(format!("\\fB\\-\\-{}\\fR", escape(l)));
    }
    let help = arg
        .get_long_help()
        .or(arg.get_help())
        .map(|h| h.to_string())
        .unwrap_or_default();
    format!(
        ".TP\n{}{value}\n{}\n",
        flags.join(", "),
        escape(&help.replace('\n', " "))
    )
}

/// Text as roff shows it literally: backslashes and hyphens escaped, no
/// line starting with a control character.
fn escape(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    match escaped.starts_with(['.', '\'']) {
        true => format!("\\&{escaped}"),
        false => escaped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_escape_hyphens_backslashes_and_leading_dots() {
        assert_eq!(escape("--a\\b"), "\\-\\-a\\eb");
        assert_eq!(escape(".x"), "\\&.x");
    }

    #[test]
    fn test_every_daemon_and_serve_option_is_on_the_page() {
        let page = page().replace("\\-", "-");
        for o in OPTIONS {
            for name in o.names {
                assert!(page.contains(name), "{name} missing");
            }
        }
        for t in qmp::schema::object::OBJECT_TYPES {
            assert!(page.contains(&format!(" {t},")) || page.contains(&format!(" {t}\n")));
        }
        for a in crate::serve::command().get_arguments() {
            if let Some(l) = a.get_long() {
                assert!(page.contains(&format!("--{l}")), "serve --{l} missing");
            }
        }
        for a in crate::backup::command().get_arguments() {
            if let Some(l) = a.get_long() {
                assert!(page.contains(&format!("--{l}")), "backup --{l} missing");
            }
        }
    }
}

//! The daemon's options, described once: the argv walker (`cli.rs`) reads
//! which take a value from here, `--help` prints them, and the man page
//! (`man.rs`) is generated from them, so the three cannot drift apart.

/// One option of the daemon's command line.
#[derive(Debug)]
pub struct OptionDoc {
    /// Its spellings, short first (`-T`, `--trace`).
    pub names: &'static [&'static str],
    pub takes_value: bool,
    /// How it is written, as `--help` shows it: the first line starts with
    /// the spellings, continuation lines are indented under it.
    pub usage: &'static [&'static str],
    /// What it does, one line of `--help` each.
    pub help: &'static [&'static str],
}

/// The options in `--help`'s order.
pub static OPTIONS: &[OptionDoc] = &[
    OptionDoc {
        names: &["-h", "--help"],
        takes_value: false,
        usage: &["-h, --help"],
        help: &["display this help and exit"],
    },
    OptionDoc {
        names: &["-V", "--version"],
        takes_value: false,
        usage: &["-V, --version"],
        help: &["output version information and exit"],
    },
    OptionDoc {
        names: &["--blockdev"],
        takes_value: true,
        usage: &[
            "--blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]",
            "           [,cache.direct=on|off][,cache.no-flush=on|off]",
            "           [,read-only=on|off][,auto-read-only=on|off]",
            "           [,driver specific parameters...]",
        ],
        help: &[
            "configure a block node (drivers: file, host_device,",
            "raw, qcow2, null-co, blkdebug)",
        ],
    },
    OptionDoc {
        names: &["--chardev"],
        takes_value: true,
        usage: &[
            "--chardev socket,id=<id>,path=<path>|host=<host>,port=<port>",
            "          ,server=on,wait=off",
        ],
        help: &["configure a socket for a QMP monitor"],
    },
    OptionDoc {
        names: &["--daemonize"],
        takes_value: false,
        usage: &["--daemonize"],
        help: &[
            "daemonize the process, and have the parent exit",
            "once startup is complete",
        ],
    },
    OptionDoc {
        names: &["--export"],
        takes_value: true,
        usage: &[
            "--export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]",
            "         [,description=<text>][,writable=on|off][,writethrough=on|off]",
            "--export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>",
            "         [,writable=on|off][,allow-other=on|off|auto]",
            "--export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,",
            "         addr.type=unix,addr.path=<socket-path>[,writable=on|off]",
            "         [,logical-block-size=<block-size>][,num-queues=<num-queues>]",
        ],
        help: &[
            "export the specified block node over NBD",
            "(requires --nbd-server), as a regular file",
            "mounted over <file> with FUSE, or as a",
            "vhost-user-blk device on <socket-path>",
        ],
    },
    OptionDoc {
        names: &["--log-format"],
        takes_value: true,
        usage: &["--log-format text|json"],
        help: &[
            "log lines as text (default) or as one JSON object",
            "each (bexd's own)",
        ],
    },
    OptionDoc {
        names: &["--log-target"],
        takes_value: true,
        usage: &["--log-target stderr|syslog|journal"],
        help: &[
            "send the log to stderr (default), to syslog",
            "(/dev/log) or to the systemd journal, with each",
            "line's level as its priority (bexd's own)",
        ],
    },
    OptionDoc {
        names: &["--monitor"],
        takes_value: true,
        usage: &["--monitor [chardev=]name[,mode=control][,pretty[=on|off]]"],
        help: &["configure a QMP monitor"],
    },
    OptionDoc {
        names: &["--nbd-server"],
        takes_value: true,
        usage: &[
            "--nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>",
            "             [,max-connections=<n>][,handshake-max-seconds=<n>]",
            "--nbd-server addr.type=unix,addr.path=<path>",
            "             [,max-connections=<n>][,handshake-max-seconds=<n>]",
        ],
        help: &["start an NBD server for exporting block nodes"],
    },
    OptionDoc {
        names: &["--object"],
        takes_value: true,
        usage: &["--object <type>,id=<id>[,<property>=<value>...]"],
        help: &[
            "create an object: tls-creds-x509, tls-creds-psk,",
            "authz-simple, authz-list, authz-listfile, iothread,",
            "main-loop",
        ],
    },
    OptionDoc {
        names: &["--pidfile"],
        takes_value: true,
        usage: &["--pidfile <path>"],
        help: &["write process ID to a file after startup"],
    },
    OptionDoc {
        names: &["-T", "--trace"],
        takes_value: true,
        usage: &["-T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]"],
        help: &[
            "trace QEMU event patterns (nbd_*, qmp_*, bdrv_*, ...),",
            "mapped onto bexd's log targets",
        ],
    },
];

/// `--help`'s lines before the options.
pub const HELP_HEAD: &str = "\
Usage: bexd [options]
       bexd serve [--help] IMAGE       serve one image (like qemu-nbd)
       bexd qmp SOCKET|HOST:PORT       interactive QMP shell
       bexd backup [--help] --uri URI --output FILE [--bitmap NAME]
                                       pull a full or incremental backup over NBD
       bexd top [--help] SOCKET|HOST:PORT
                                       live view of the exports (IOPS, MiB/s, latency)
bexd: the block export daemon (a drop-in for qemu-storage-daemon's NBD exports)
";

/// `--help`'s lines after the options.
pub const HELP_FOOT: &str = "\
Every option also takes QEMU's JSON form, e.g. --blockdev '{\"driver\":\"file\",...}'.
Options are processed in the order given.
";

/// Where the description starts on an option's line.
const HELP_COLUMN: usize = 25;

/// The option a spelling names.
pub fn find(name: &str) -> Option<&'static OptionDoc> {
    OPTIONS.iter().find(|o| o.names.contains(&name))
}

/// The `--help` text.
pub fn help_text() -> String {
    let mut out = String::from(HELP_HEAD);
    for (i, option) in OPTIONS.iter().enumerate() {
        // -h and -V stand together, as in QEMU's help; a blank line between the others.
        if i != 1 {
            out.push('\n');
        }
        let (last, head) = option
            .usage
            .split_last()
            .expect("an option has a usage line");
        for line in head {
            out.push_str(&format!("  {line}\n"));
        }
        let last = format!("  {last}");
        let mut help = option.help.iter();
        match last.len() + 1 < HELP_COLUMN {
            true => out.push_str(&format!(
                "{last:<HELP_COLUMN$}{}\n",
                help.next().copied().unwrap_or("")
            )),
            false => out.push_str(&format!("{last}\n")),
        }
        for line in help {
            out.push_str(&format!("{:HELP_COLUMN$}{line}\n", ""));
        }
    }
    out.push('\n');
    out.push_str(HELP_FOOT);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_spelling_is_in_its_usage() {
        for o in OPTIONS {
            for name in o.names {
                assert!(
                    o.usage[0].contains(name),
                    "{name} missing from its usage line"
                );
            }
        }
    }

    /// The walker (`cli.rs`) takes every other flag without a value as --daemonize.
    #[test]
    fn test_daemonize_is_the_only_other_flag() {
        let flags: Vec<&str> = OPTIONS
            .iter()
            .filter(|o| !o.takes_value)
            .flat_map(|o| o.names.iter().copied())
            .collect();
        assert_eq!(flags, ["-h", "--help", "-V", "--version", "--daemonize"]);
    }

    #[test]
    fn test_short_usage_shares_the_line_with_its_help() {
        let text = help_text();
        assert!(text.contains("\n  -h, --help             display this help and exit\n"));
        assert!(
            text.contains("\n  --pidfile <path>       write process ID to a file after startup\n")
        );
        assert!(text.contains("\n  --daemonize            daemonize the process, and have the parent exit\n                         once startup is complete\n"));
    }
}

//! The daemon's options, described once: the argv walker (`cli.rs`) reads
//! which take a value from here, `--help` prints them, and the man page
//! (`man.rs`) is generated from them, so the three cannot drift apart.

use qmp::schema::block_core::BlockdevDriver;
use qmp::schema::object::OBJECT_TYPES;

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
    /// The values it takes, listed after the help (wrapped to its column)
    /// from the very tables the parser checks, so the list cannot go stale.
    pub choices: &'static [&'static str],
}

/// The options in `--help`'s order.
pub static OPTIONS: &[OptionDoc] = &[
    OptionDoc {
        names: &["-h", "--help"],
        takes_value: false,
        choices: &[],
        usage: &["-h, --help"],
        help: &["display this help and exit"],
    },
    OptionDoc {
        names: &["-V", "--version"],
        takes_value: false,
        choices: &[],
        usage: &["-V, --version"],
        help: &["output version information and exit"],
    },
    OptionDoc {
        names: &["--blockdev"],
        takes_value: true,
        choices: BlockdevDriver::NAMES,
        usage: &[
            "--blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]",
            "           [,cache.direct=on|off][,cache.no-flush=on|off]",
            "           [,read-only=on|off][,auto-read-only=on|off]",
            "           [,driver specific parameters...]",
        ],
        help: &["configure a block node; drivers:"],
    },
    OptionDoc {
        names: &["--chardev"],
        takes_value: true,
        choices: &[],
        usage: &[
            "--chardev socket,id=<id>,path=<path>|host=<host>,port=<port>",
            "          ,server=on,wait=off",
        ],
        help: &["configure a socket for a QMP monitor"],
    },
    OptionDoc {
        names: &["--daemonize"],
        takes_value: false,
        choices: &[],
        usage: &["--daemonize"],
        help: &[
            "daemonize the process, and have the parent exit",
            "once startup is complete",
        ],
    },
    OptionDoc {
        names: &["--export"],
        takes_value: true,
        choices: &[],
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
        choices: &[],
        usage: &["--log-format text|json"],
        help: &[
            "log lines as text (default) or as one JSON object",
            "each (bexd's own)",
        ],
    },
    OptionDoc {
        names: &["--log-target"],
        takes_value: true,
        choices: &[],
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
        choices: &[],
        usage: &["--monitor [chardev=]name[,mode=control][,pretty[=on|off]]"],
        help: &["configure a QMP monitor"],
    },
    OptionDoc {
        names: &["--nbd-server"],
        takes_value: true,
        choices: &[],
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
        choices: OBJECT_TYPES,
        usage: &["--object <type>,id=<id>[,<property>=<value>...]"],
        help: &["create an object; types:"],
    },
    OptionDoc {
        names: &["--pidfile"],
        takes_value: true,
        choices: &[],
        usage: &["--pidfile <path>"],
        help: &["write process ID to a file after startup"],
    },
    OptionDoc {
        names: &["-T", "--trace"],
        takes_value: true,
        choices: &[],
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
        for line in help.map(|l| l.to_string()).chain(wrap(option.choices)) {
            out.push_str(&format!("{:HELP_COLUMN$}{line}\n", ""));
        }
    }
    out.push('\n');
    out.push_str(HELP_FOOT);
    out
}

/// The widest `--help` line.
const HELP_WIDTH: usize = 80;

/// `choices` as comma-separated lines that fit after the help column.
fn wrap(choices: &[&str]) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for (i, choice) in choices.iter().enumerate() {
        let word = match i + 1 < choices.len() {
            true => format!("{choice},"),
            false => choice.to_string(),
        };
        match lines.last_mut() {
            Some(line) if HELP_COLUMN + line.len() + 1 + word.len() <= HELP_WIDTH => {
                line.push(' ');
                line.push_str(&word);
            }
            _ => lines.push(word),
        }
    }
    lines
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

    /// The words of an option's help as `--help` prints it.
    fn help_words(name: &str) -> Vec<String> {
        let text = help_text();
        let start = text
            .find(&format!("\n  {name} "))
            .expect("option in --help");
        let block = &text[start + 1..];
        let end = block.find("\n\n").unwrap_or(block.len());
        block[..end]
            .split(|c: char| c.is_whitespace() || c == ',' || c == ';' || c == ':')
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn test_help_lists_every_object_type_the_parser_accepts() {
        let words = help_words("--object");
        for t in qmp::schema::object::OBJECT_TYPES {
            assert!(words.iter().any(|w| w == t), "--help lacks object type {t}");
        }
        for t in [
            "throttle-group",
            "metrics-http",
            "secret",
            "authz-list-file",
        ] {
            assert!(words.iter().any(|w| w == t), "--help lacks object type {t}");
        }
    }

    #[test]
    fn test_help_lists_every_blockdev_driver_the_parser_accepts() {
        let words = help_words("--blockdev");
        for d in BlockdevDriver::NAMES {
            assert!(words.iter().any(|w| w == d), "--help lacks driver {d}");
        }
        assert!(words.iter().any(|w| w == "throttle"));
    }

    #[test]
    fn test_choices_wrap_within_the_help_width() {
        for o in OPTIONS {
            for line in wrap(o.choices) {
                assert!(HELP_COLUMN + line.len() <= HELP_WIDTH, "too wide: {line}");
            }
        }
        assert_eq!(wrap(&["a", "b"]), ["a, b"]);
        assert!(wrap(&["x".repeat(40).as_str(), "y".repeat(40).as_str()]).len() == 2);
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

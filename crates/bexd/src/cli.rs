//! The command line, as qemu-storage-daemon reads it.
//!
//! qemu-storage-daemon processes its options strictly in the order given (an
//! export must come after the node and the NBD server it needs), so this is a
//! plain argv walker that keeps that order rather than a declarative parser.
//! Which options exist and take a value is read from `cli_options.rs`, the
//! same table `--help` and the man page are made from. The one-image
//! shortcut `bexd serve` has its own clap parser in `serve/args.rs`.

use std::path::PathBuf;

use thiserror::Error;

use crate::cli_options;
use crate::log_output::{LogFormat, LogOptionError, LogTarget};

/// One option of the daemon's command line, in the order it was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CliOption {
    Blockdev(String),
    Object(String),
    NbdServer(String),
    Export(String),
    Chardev(String),
    Monitor(String),
    Pidfile(PathBuf),
    Daemonize,
    Trace(String),
    LogFormat(LogFormat),
    LogTarget(LogTarget),
}

impl CliOption {
    /// The option's name as the user typed it, for error messages.
    pub fn flag(&self) -> &'static str {
        match self {
            Self::Blockdev(_) => "--blockdev",
            Self::Object(_) => "--object",
            Self::NbdServer(_) => "--nbd-server",
            Self::Export(_) => "--export",
            Self::Chardev(_) => "--chardev",
            Self::Monitor(_) => "--monitor",
            Self::Pidfile(_) => "--pidfile",
            Self::Daemonize => "--daemonize",
            Self::Trace(_) => "--trace",
            Self::LogFormat(_) => "--log-format",
            Self::LogTarget(_) => "--log-target",
        }
    }

    /// The option's argument, if it takes one.
    pub fn argument(&self) -> Option<String> {
        match self {
            Self::Blockdev(s)
            | Self::Object(s)
            | Self::NbdServer(s)
            | Self::Export(s)
            | Self::Chardev(s)
            | Self::Monitor(s)
            | Self::Trace(s) => Some(s.clone()),
            Self::Pidfile(p) => Some(p.display().to_string()),
            Self::LogFormat(f) => Some(f.as_str().to_string()),
            Self::LogTarget(t) => Some(t.as_str().to_string()),
            Self::Daemonize => None,
        }
    }
}

/// What the user asked the program to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    Help,
    Version,
    /// `--man`: the man page bexd(8), in roff (hidden; for packagers).
    Man,
    /// qemu-storage-daemon compatible mode.
    Daemon(Vec<CliOption>),
    /// `bexd serve ...`: the one-image shortcut; the arguments after `serve`.
    Serve(Vec<String>),
    /// `bexd qmp ...`: the interactive QMP shell; the arguments after `qmp`.
    Qmp(Vec<String>),
    /// `bexd backup ...`: pull a full or incremental backup from an NBD export.
    Backup(Vec<String>),
    /// `bexd top ...`: a live view of a daemon's exports; the arguments after `top`.
    Top(Vec<String>),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CliError {
    #[error("unrecognized option '{0}'")]
    Unrecognized(String),
    #[error("option '{0}' requires an argument")]
    MissingArgument(String),
    #[error("option '{0}' doesn't allow an argument")]
    UnexpectedArgument(String),
    #[error("unexpected argument '{0}'")]
    Positional(String),
    #[error(transparent)]
    Log(#[from] LogOptionError),
}

/// Parses argv (without the program name).
pub fn parse_args(args: &[String]) -> Result<Invocation, CliError> {
    match args.first().map(String::as_str) {
        Some("serve") => return Ok(Invocation::Serve(args[1..].to_vec())),
        Some("qmp") => return Ok(Invocation::Qmp(args[1..].to_vec())),
        Some("backup") => return Ok(Invocation::Backup(args[1..].to_vec())),
        Some("top") => return Ok(Invocation::Top(args[1..].to_vec())),
        _ => {}
    }
    let mut options = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let (name, inline) = split_inline(arg);
        match name {
            "-h" | "--help" => return Ok(Invocation::Help),
            "-V" | "--version" => return Ok(Invocation::Version),
            "--man" => return Ok(Invocation::Man),
            _ => {}
        }
        let Some(option) = cli_options::find(name) else {
            return Err(match name.starts_with('-') {
                true => CliError::Unrecognized(arg.clone()),
                false => CliError::Positional(arg.clone()),
            });
        };
        if !option.takes_value {
            if inline.is_some() {
                return Err(CliError::UnexpectedArgument(name.to_string()));
            }
            // --daemonize is the one flag left once -h and -V are handled.
            options.push(CliOption::Daemonize);
            continue;
        }
        let value = match inline {
            Some(v) => v.to_string(),
            None => iter
                .next()
                .cloned()
                .ok_or_else(|| CliError::MissingArgument(name.to_string()))?,
        };
        options.push(make_option(name, value)?);
    }
    Ok(Invocation::Daemon(options))
}

/// Splits `--name=value` (getopt_long's inline form) from `--name`.
fn split_inline(arg: &str) -> (&str, Option<&str>) {
    match arg.strip_prefix("--").and_then(|rest| rest.split_once('=')) {
        Some((name, value)) => (&arg[..name.len() + 2], Some(value)),
        None => (arg, None),
    }
}

fn make_option(name: &str, value: String) -> Result<CliOption, CliError> {
    Ok(match name {
        "--blockdev" => CliOption::Blockdev(value),
        "--object" => CliOption::Object(value),
        "--nbd-server" => CliOption::NbdServer(value),
        "--export" => CliOption::Export(value),
        "--chardev" => CliOption::Chardev(value),
        "--monitor" => CliOption::Monitor(value),
        "--pidfile" => CliOption::Pidfile(PathBuf::from(value)),
        "--log-format" => CliOption::LogFormat(value.parse()?),
        "--log-target" => CliOption::LogTarget(value.parse()?),
        _ => CliOption::Trace(value),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn test_parse_args_keeps_option_order() {
        let parsed = parse_args(&args(&[
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--nbd-server=addr.type=unix,addr.path=/s",
            "--export",
            "nbd,id=e0,node-name=n0",
        ]));
        assert_eq!(
            parsed,
            Ok(Invocation::Daemon(vec![
                CliOption::Blockdev("driver=null-co,node-name=n0".into()),
                CliOption::NbdServer("addr.type=unix,addr.path=/s".into()),
                CliOption::Export("nbd,id=e0,node-name=n0".into()),
            ]))
        );
    }

    #[test]
    fn test_parse_args_unknown_option_is_an_error() {
        assert_eq!(
            parse_args(&args(&["--bogus"])),
            Err(CliError::Unrecognized("--bogus".into()))
        );
    }

    #[test]
    fn test_parse_args_missing_value_is_an_error() {
        assert_eq!(
            parse_args(&args(&["--blockdev"])),
            Err(CliError::MissingArgument("--blockdev".into()))
        );
    }

    #[test]
    fn test_parse_args_serve_takes_the_rest() {
        assert_eq!(
            parse_args(&args(&["serve", "disk.img", "--read-only"])),
            Ok(Invocation::Serve(args(&["disk.img", "--read-only"])))
        );
    }

    #[test]
    fn test_parse_args_backup_takes_the_rest() {
        assert_eq!(
            parse_args(&args(&["backup", "--uri", "nbd://h/d", "--output", "x"])),
            Ok(Invocation::Backup(args(&[
                "--uri",
                "nbd://h/d",
                "--output",
                "x"
            ])))
        );
    }

    #[test]
    fn test_parse_args_daemonize_rejects_inline_value() {
        assert_eq!(
            parse_args(&args(&["--daemonize=yes"])),
            Err(CliError::UnexpectedArgument("--daemonize".into()))
        );
    }

    #[test]
    fn test_log_options_parse_and_refuse_unknown_values() {
        assert_eq!(
            parse_args(&args(&["--log-format=json", "--log-target", "syslog"])),
            Ok(Invocation::Daemon(vec![
                CliOption::LogFormat(LogFormat::Json),
                CliOption::LogTarget(LogTarget::Syslog),
            ]))
        );
        assert_eq!(
            parse_args(&args(&["--log-target", "file"]))
                .unwrap_err()
                .to_string(),
            "--log-target: 'file' is not one of stderr, syslog, journal"
        );
    }

    #[test]
    fn test_every_documented_option_is_accepted() {
        for o in cli_options::OPTIONS {
            for name in o.names {
                let mut argv = vec![name.to_string()];
                if o.takes_value {
                    argv.push(
                        match *name {
                            "--log-format" => "text",
                            "--log-target" => "stderr",
                            _ => "x",
                        }
                        .into(),
                    );
                }
                assert!(parse_args(&argv).is_ok(), "{name} refused");
            }
        }
    }
}

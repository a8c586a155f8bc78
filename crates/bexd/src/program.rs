//! The program: which mode argv asks for (the qemu-storage-daemon mode,
//! `serve`, `qmp`, `backup`, `top`), and the logging every mode shares. Kept apart
//! from the modes so that none of them imports another through it.

use crate::cli::{self, CliOption, Invocation};
use crate::trace::TraceConfig;

/// Runs the program; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let parsed = cli::parse_args(args);
    let trace = match &parsed {
        Ok(Invocation::Daemon(options)) => match trace_config(options) {
            Ok(t) => Some(t),
            Err(message) => {
                eprintln!("bexd: {message}");
                return 1;
            }
        },
        // `bexd serve` reads its own -T/-v once its arguments are parsed.
        Ok(Invocation::Serve(_)) => None,
        _ => Some(TraceConfig::default()),
    };
    if let Err(message) = trace
        .as_ref()
        .map_or(Ok(()), |t| crate::trace::init(t, "warn"))
    {
        eprintln!("bexd: {message}");
        return 1;
    }
    match parsed {
        Err(e) => {
            eprintln!("bexd: {e}");
            1
        }
        Ok(Invocation::Help) => {
            print!("{}", crate::cli_options::help_text());
            0
        }
        Ok(Invocation::Man) => {
            print!("{}", crate::man::page());
            0
        }
        Ok(Invocation::Version) => {
            print!("{}", crate::version::text());
            0
        }
        Ok(Invocation::Serve(rest)) => crate::serve::main(&rest),
        Ok(Invocation::Qmp(rest)) => crate::shell::main(&rest),
        Ok(Invocation::Backup(rest)) => crate::backup::main(&rest),
        Ok(Invocation::Top(rest)) => crate::top::main(&rest),
        Ok(Invocation::Daemon(options)) => crate::startup::run(options),
    }
}

/// Every `--trace`/`-T` option, in order (see `trace.rs`), and where the
/// log goes (`--log-target`, `--log-format`: the last one given counts).
fn trace_config(options: &[CliOption]) -> Result<TraceConfig, String> {
    let mut config = TraceConfig::default();
    for option in options {
        match option {
            CliOption::Trace(arg) => crate::trace::apply(&mut config, arg)
                .map_err(|e| format!("{} {arg}: {e}", option.flag()))?,
            CliOption::LogFormat(f) => config.format = *f,
            CliOption::LogTarget(t) => config.target = *t,
            _ => {}
        }
    }
    Ok(config)
}

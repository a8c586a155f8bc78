//! The program: which mode argv asks for (the qemu-storage-daemon mode,
//! `serve`, `qmp`, `backup`), and the logging every mode shares. Kept apart
//! from the modes so that none of them imports another through it.

use crate::cli::{self, CliOption, Invocation};
use crate::trace::TraceConfig;

/// Runs the program; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let parsed = cli::parse_args(args);
    let trace = match &parsed {
        Ok(Invocation::Daemon(options)) => match trace_config(options) {
            Ok(t) => t,
            Err(message) => {
                eprintln!("bexd: {message}");
                return 1;
            }
        },
        _ => TraceConfig::default(),
    };
    if let Err(message) = init_tracing(&trace) {
        eprintln!("bexd: {message}");
        return 1;
    }
    match parsed {
        Err(e) => {
            eprintln!("bexd: {e}");
            1
        }
        Ok(Invocation::Help) => {
            print!("{}", cli::HELP);
            0
        }
        Ok(Invocation::Version) => {
            let (major, minor, micro) = crate::QEMU_VERSION;
            println!(
                "bexd version {} (qemu-storage-daemon {major}.{minor}.{micro} compatible)",
                env!("CARGO_PKG_VERSION")
            );
            0
        }
        Ok(Invocation::Serve(rest)) => crate::serve::main(&rest),
        Ok(Invocation::Qmp(rest)) => crate::shell::main(&rest),
        Ok(Invocation::Backup(rest)) => crate::backup::main(&rest),
        Ok(Invocation::Daemon(options)) => crate::startup::run(options),
    }
}

/// Every `--trace`/`-T` option, in order (see `trace.rs`).
fn trace_config(options: &[CliOption]) -> Result<TraceConfig, String> {
    let mut config = TraceConfig::default();
    for option in options {
        if let CliOption::Trace(arg) = option {
            crate::trace::apply(&mut config, arg)
                .map_err(|e| format!("{} {arg}: {e}", option.flag()))?;
        }
    }
    Ok(config)
}

/// `BEXD_LOG` (default `warn`) plus what `--trace` turned on, to stderr or
/// the trace's `file=`.
fn init_tracing(trace: &TraceConfig) -> Result<(), String> {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("BEXD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    for d in &trace.directives {
        let directive = d
            .parse()
            .map_err(|e| format!("--trace: bad filter '{d}': {e}"))?;
        filter = filter.add_directive(directive);
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match &trace.file {
        None => builder.with_writer(std::io::stderr).try_init(),
        Some(path) => {
            let file = std::fs::File::create(path)
                .map_err(|e| format!("--trace file={}: {e}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .try_init()
        }
    };
    Ok(())
}

//! The program: which mode argv asks for (the qemu-storage-daemon mode,
//! `serve`, `qmp`, `backup`), and the logging every mode shares. Kept apart
//! from the modes so that none of them imports another through it.

use crate::cli::{self, Invocation};

/// Runs the program; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    init_tracing();
    match cli::parse_args(args) {
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

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BEXD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

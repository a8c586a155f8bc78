//! The `bexd` binary: everything lives in the library; this only hands over argv.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(bexd::program::main(&args));
}

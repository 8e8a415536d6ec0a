//! `pipe`: the command line. Parsing arguments and printing results; the work is in
//! `pipe-core` (engine) and `pipe-stages` (stage kinds).

mod cli;
mod progress;
mod report;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    pipe_train::keep_freed_tensor_memory();
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose, args.quiet);
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

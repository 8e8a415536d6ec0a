//! `pipe`: the command line. Parsing arguments and printing results; the work is in
//! `pipe-core` (engine) and `pipe-stages` (stage kinds).

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    keep_freed_tensor_memory();
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

/// Tensors are large allocations, which glibc maps fresh from the kernel and unmaps on free, so
/// every training step page-faults and zeroes its buffers anew. Keeping freed memory in the heap
/// instead makes training about 10% faster (bench/train.sh); the peak memory is unchanged.
fn keep_freed_tensor_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc's thresholds; called before any other thread starts.
    unsafe {
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit systems.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

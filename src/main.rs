//! The `bynder-usage-sync` binary: parse the command line, run it, flush the telemetry, map the
//! outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;

use bynder_usage_sync::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::Exit::Unexpected as u8);
        }
    };
    let outcome = runtime.block_on(cli::run(cli));
    // The last spans and log records, within telemetry.timeout; the runtime still runs the
    // export tasks.
    bynder_usage_sync::telemetry::shutdown();
    match outcome {
        Ok(exit) => exit.into(),
        Err(failure) => {
            // The message may quote the portal: no terminal escape gets through.
            eprintln!(
                "error: {}",
                bynder_usage_sync::text::printable(&failure.to_string())
            );
            failure.exit().into()
        }
    }
}

//! The `droverctl` program. `main.rs` is one call into here, so the test harness can build the very
//! same program under another name.

use std::process::ExitCode;

use clap::Parser;

pub fn main() -> ExitCode {
    drover_coordinator::memory::return_freed_memory_promptly();
    drover_proto::tls::install_crypto_provider();
    let cli = crate::cli::Cli::parse();
    if !matches!(cli.command, crate::cli::Command::Dev(_)) {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::cli::run(cli)) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            // One line a person can act on: the causes joined, not dumped.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", msg.join(": "));
            ExitCode::FAILURE
        }
    }
}

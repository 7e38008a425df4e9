//! The `drover-coordinator` program. `main.rs` is one call into here, so the test harness can build
//! the very same program under another name.

use std::process::ExitCode;

use clap::Parser;

pub fn main() -> ExitCode {
    crate::memory::return_freed_memory_promptly();
    crate::memory::disable_huge_pages();
    drover_proto::tls::install_crypto_provider();
    if let Err(e) = drover_proto::config_file::load_into_env(crate::config::ENV_VARS) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = crate::Config::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let node = match crate::start(config).await {
            Ok(n) => n,
            Err(e) => {
                eprintln!("error: starting the coordinator: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut stop = node.shutdown_requested();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            _ = stop.changed() => {}
        }
        tracing::info!("shutting down");
        let halted = node.halted().map(str::to_owned);
        node.shutdown().await;
        match halted {
            Some(reason) => {
                eprintln!("error: the coordinator stopped itself: {reason}");
                ExitCode::FAILURE
            }
            None => ExitCode::SUCCESS,
        }
    })
}

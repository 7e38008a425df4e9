//! The `drover-agent` program. `main.rs` is one call into here, so the test harness can build the
//! very same program under another name.

use std::process::ExitCode;

use clap::Parser;

pub fn main() -> ExitCode {
    drover_proto::tls::install_crypto_provider();
    if let Err(e) = drover_proto::config_file::load_into_env(crate::config::ENV_VARS) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = crate::Config::parse();
    // File operations (tokio::fs) run on the blocking pool, several per task; under a burst of
    // short tasks tokio's default (up to 512 threads) left ~300 threads alive in the agent.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(crate::limits::BLOCKING_THREADS_MAX)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let agent = match crate::start(config).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: starting the agent: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down");
        agent.shutdown().await;
        ExitCode::SUCCESS
    })
}

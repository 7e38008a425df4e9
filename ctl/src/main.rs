use clap::Parser;

#[tokio::main]
async fn main() {
    drover_proto::tls::install_crypto_provider();
    let cli = droverctl::cli::Cli::parse();
    let dev = matches!(cli.command, droverctl::cli::Command::Dev(_));
    if !dev {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_writer(std::io::stderr)
            .init();
    }
    match droverctl::cli::run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line a person can act on; the chain is joined rather than dumped.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", msg.join(": "));
            std::process::exit(1);
        }
    }
}

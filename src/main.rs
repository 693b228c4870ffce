//! The `deputy` binary: a thin shell around the library.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = deputy::cli::Cli::parse();
    let code = deputy::cli::run(cli).await;
    std::process::exit(code);
}

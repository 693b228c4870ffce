//! The `deputy` command line.

pub mod exchange;
pub mod run;
pub mod token;

use clap::{Parser, Subcommand};

/// Deputy: short-lived, delegated identities for AI-agent runs on Kubernetes.
#[derive(Parser, Debug)]
#[command(name = "deputy", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller and the token endpoint (what the Deployment runs).
    Run(Box<run::RunArgs>),
    /// Print the CustomResourceDefinitions of Agent, DelegationGrant and AgentRun as YAML.
    Crd,
    /// Inside a run's pod: exchange the run token for a token bound to one audience.
    Exchange(exchange::ExchangeArgs),
    /// Inspect or verify Deputy tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
}

/// Runs a parsed command; returns the process exit code. Errors are printed to stderr.
pub async fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Crd => match crate::resources::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                0
            }
            Err(e) => {
                eprintln!("error: could not render the CRDs: {e}");
                1
            }
        },
        Command::Token(cmd) => token::run(cmd).await,
        Command::Run(args) => run::run(*args).await,
        Command::Exchange(args) => exchange::run(args).await,
    }
}

//! `deputy-controlplane`: starts the real control plane in the foreground (for
//! `scripts/dev-up`), writes a kubeconfig for each user into `--dir`, prints one line per
//! user, and stops everything on SIGINT/SIGTERM.

use std::path::PathBuf;

use clap::Parser;
use deputy_controlplane::{ControlPlane, Options};

#[derive(Parser)]
#[command(about = "Run etcd, kube-apiserver and kube-controller-manager on loopback")]
struct Args {
    /// Where to keep certificates, kubeconfigs, logs and etcd data (kept on exit).
    #[arg(long)]
    dir: PathBuf,
    /// The API server's port (default: a free one).
    #[arg(long)]
    port: Option<u16>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let cp = match ControlPlane::start(Options { dir: Some(args.dir), port: args.port }).await {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("deputy-controlplane: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("server {}", cp.server);
    for u in cp.users() {
        println!("user {} groups={} kubeconfig={}", u.name, u.groups.join(","), u.kubeconfig.display());
    }
    println!("ready in {:.1} s", cp.started_in.as_secs_f64());
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("deputy-controlplane: cannot listen for SIGTERM: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    cp.stop();
    std::process::ExitCode::SUCCESS
}

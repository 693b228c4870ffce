//! `deputy-testapi --listen 127.0.0.1:0 --kubeconfig PATH`

use clap::Parser;

#[derive(Parser)]
#[command(about = "A stateful Kubernetes API server for tests")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Write a kubeconfig for the server here.
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// How many events the watch history keeps; a watch from an older resourceVersion gets
    /// 410 Gone and relists. A real API server keeps minutes of history, so large benchmarks
    /// raise this.
    #[arg(long)]
    history: Option<usize>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let server = match deputy_testapi::TestApiServer::start_on(&args.listen).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot listen on {}: {e}", args.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(n) = args.history {
        server.set_history_limit(n);
    }
    if let Some(path) = &args.kubeconfig
        && let Err(e) = server.write_kubeconfig(path)
    {
        eprintln!("cannot write {}: {e}", path.display());
        return std::process::ExitCode::FAILURE;
    }
    println!("listening on {}", server.url());
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    drop(server);
    // Exit at once: open watch connections must not hold the process up.
    std::process::exit(0)
}

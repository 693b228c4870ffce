//! TLS on the token port: served from a certificate/key file pair and reloaded when the files
//! change, without a restart. Uses the system's openssl and curl as independent peers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{Env, free_port, wait_until};

fn self_signed(dir: &Path, name: &str, cn: &str) {
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", &format!("/CN={cn}"), "-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.crt")))
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
}

/// The subject CN of the certificate the server presents.
fn served_cn(port: u16, ca: &Path) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sS", "-v", "--cacert"])
        .arg(ca)
        .arg(format!("https://127.0.0.1:{port}/jwks.json"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines().find_map(|l| l.trim().strip_prefix("*  subject: CN=").map(|s| s.trim().to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_served_and_reloaded_when_the_files_change() {
    let mut env = Env::api_only().await;
    let dir = env.dir.clone();
    self_signed(&dir, "first", "deputy-first");
    self_signed(&dir, "second", "deputy-second");
    std::fs::copy(dir.join("first.crt"), dir.join("tls.crt")).unwrap();
    std::fs::copy(dir.join("first.key"), dir.join("tls.key")).unwrap();
    env.port = free_port();
    env.extra_args = vec![
        "--tls-cert".into(),
        dir.join("tls.crt").display().to_string(),
        "--tls-key".into(),
        dir.join("tls.key").display().to_string(),
    ];
    env.start_operator().await;
    let port = env.port;
    assert_eq!(served_cn(port, &dir.join("first.crt")).as_deref(), Some("deputy-first"));

    // Replace the pair in place (what cert-manager and the kubelet do) and wait for the reload.
    std::fs::copy(dir.join("second.key"), dir.join("tls.key")).unwrap();
    std::fs::copy(dir.join("second.crt"), dir.join("tls.crt")).unwrap();
    let reloaded = wait_until(Duration::from_secs(15), || {
        let ca = dir.join("second.crt");
        async move {
            tokio::task::spawn_blocking(move || served_cn(port, &ca)).await.unwrap().as_deref() == Some("deputy-second")
        }
    })
    .await;
    assert!(reloaded, "the new certificate is served without a restart");

    // A broken pair is ignored and the current certificate kept.
    std::fs::write(dir.join("tls.crt"), "not a certificate").unwrap();
    // Longer than the reload interval (1 s in the suites).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(served_cn(port, &dir.join("second.crt")).as_deref(), Some("deputy-second"));
}

//! A real Kubernetes control plane on loopback: etcd, kube-apiserver and kube-controller-manager,
//! built from the Kubernetes Go modules by `scripts/build-k8s`, for Deputy's end-to-end tests and
//! for `scripts/dev-up`.
//!
//! What it sets up, and why each part is there:
//! - its own CA and a serving certificate for 127.0.0.1/localhost (clients verify the server);
//! - users from a static token file: an admin in `system:masters`, and non-admin users
//!   ([`ALICE`], [`BOB`], [`ORCHESTRATOR`]) whom RBAC and admission policies treat as tenants;
//! - RBAC authorisation, the default admission plugins (ServiceAccount among them), a
//!   service-account issuer and ECDSA key, so TokenRequest and TokenReview are the real ones;
//! - an audit log (level Metadata) so a test can see every request a client made;
//! - kube-controller-manager with the controllers the API server alone lacks (garbage
//!   collector, namespaces, default ServiceAccounts, `kube-root-ca.crt`, ClusterRole
//!   aggregation, ValidatingAdmissionPolicy status). No scheduler and no kubelet: pods stay
//!   unscheduled, and tests play the kubelet.
//!
//! Every process is started from one long-lived thread with `PR_SET_PDEATHSIG`, so it is killed
//! when the process that started it exits, however it exits (a panic, SIGKILL). Dropping a
//! [`ControlPlane`] stops the processes at once.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

pub const ADMIN: &str = "admin";
pub const ALICE: &str = "alice@example.com";
pub const BOB: &str = "bob@example.com";
/// A non-admin identity that starts runs for others (a CI system, an agent platform).
pub const ORCHESTRATOR: &str = "orchestrator@example.com";
/// The API server's service-account issuer (and so the default TokenReview audience).
pub const SA_ISSUER: &str = "https://kubernetes.default.svc";

/// The kube-controller-manager controllers a test cluster needs. Not `*`: the pod garbage
/// collector would delete pods bound to nodes that do not exist, and the rest is not needed.
pub const CONTROLLERS: &str = "garbage-collector-controller,namespace-controller,serviceaccount-controller,root-ca-certificate-publisher-controller,clusterrole-aggregation-controller,validatingadmissionpolicy-status-controller";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Binaries(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("certificates: {0}")]
    Certs(#[from] rcgen::Error),
    #[error("{process} did not become ready in {secs} s: {why}\n--- last lines of {log} ---\n{tail}")]
    NotReady { process: &'static str, secs: u64, why: String, log: String, tail: String },
    #[error("kube client: {0}")]
    Kube(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A user of the control plane, authenticated by a static bearer token.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub token: String,
    pub groups: Vec<String>,
    pub kubeconfig: PathBuf,
}

struct Proc {
    name: &'static str,
    child: Child,
}

/// A running control plane.
pub struct ControlPlane {
    /// Where its certificates, kubeconfigs, logs and etcd data live.
    pub dir: PathBuf,
    /// `https://127.0.0.1:<port>`
    pub server: String,
    /// The CA that signed the serving certificate.
    pub ca_file: PathBuf,
    /// The API server's audit log (JSON lines, level Metadata).
    pub audit_log: PathBuf,
    /// How long [`ControlPlane::start`] took.
    pub started_in: Duration,
    /// Whether `dir` is removed on drop.
    remove_dir: bool,
    users: Vec<User>,
    procs: Mutex<Vec<Proc>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").field("dir", &self.dir).field("server", &self.server).finish()
    }
}

/// Where `scripts/build-k8s` is: the workspace root is this crate's parent.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// The directory holding `kube-apiserver`, `kube-controller-manager` and `etcd`:
/// `DEPUTY_K8S_BIN` when set, otherwise what `scripts/build-k8s` prints (it builds them the
/// first time, and is a no-op when they are cached).
pub fn binaries() -> Result<PathBuf, Error> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("DEPUTY_K8S_BIN") {
            return Ok(PathBuf::from(dir));
        }
        let script = workspace_root().join("scripts/build-k8s");
        let out = Command::new(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}); the real control plane cannot start. Run it by hand to see why, or select the test API server only with DEPUTY_BACKENDS=testapi",
                script.display(),
                out.status
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default().trim().to_string();
        Ok(PathBuf::from(last))
    });
    let dir = found.clone().map_err(Error::Binaries)?;
    for bin in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        if !dir.join(bin).is_file() {
            return Err(Error::Binaries(format!("{} has no {bin}", dir.display())));
        }
    }
    Ok(dir)
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Starts `cmd` from a thread that lives as long as this process, with the parent-death
/// signal set: Linux sends it when the thread that forked the child exits, so the thread must
/// outlive every test thread.
fn spawn_supervised(cmd: Command) -> std::io::Result<Child> {
    static SUPERVISOR: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SUPERVISOR.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("controlplane-supervisor".into())
            .spawn(move || {
                while let Ok((mut cmd, reply)) = rx.recv() {
                    let parent = std::process::id();
                    // SAFETY: between fork and exec only async-signal-safe calls are made:
                    // prctl(2), getppid(2) and _exit(2).
                    unsafe {
                        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            // The parent may have died before prctl took effect.
                            if libc::getppid() as u32 != parent {
                                libc::_exit(1);
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map(|_| ())
            .ok();
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .map_err(|_| std::io::Error::other("supervisor lock poisoned"))?
        .send((cmd, reply_tx))
        .map_err(|_| std::io::Error::other("the supervisor thread is gone"))?;
    reply_rx.recv().map_err(|_| std::io::Error::other("the supervisor thread did not answer"))?
}

/// A port nobody listens on now (the OS picks it).
fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("bind a free port"))?;
    Ok(l.local_addr().map_err(io("local_addr"))?.port())
}

/// 16 random bytes as hex, for tokens.
fn random_hex() -> Result<String, Error> {
    let mut buf = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).map_err(io("read /dev/urandom"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The audit policy: every request at level Metadata (who, what, verb, response code, user
/// agent) and no bodies, so secrets never reach the log.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
";

/// Options for [`ControlPlane::start`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Keep everything in this directory (and keep it on drop). Default: a new directory
    /// under the system temp dir, removed on drop.
    pub dir: Option<PathBuf>,
    /// The API server's port. Default: a free one.
    pub port: Option<u16>,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager, and returns once the API
    /// server is ready and the controller manager has created the `default` ServiceAccount.
    pub async fn start(opts: Options) -> Result<ControlPlane, Error> {
        let t0 = Instant::now();
        let bin = binaries()?;
        let (dir, remove_dir) = match opts.dir {
            Some(d) => (d, false),
            None => {
                remove_stale_dirs();
                (std::env::temp_dir().join(format!("deputy-cp-{}-{}", std::process::id(), random_hex()?)), true)
            }
        };
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let write = |name: &str, text: &str| -> Result<PathBuf, Error> {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(io(format!("write {}", p.display())))?;
            Ok(p)
        };

        // --- certificates and keys ------------------------------------------------------------
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "deputy test control plane CA");
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let serving_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut serving = rcgen::CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default.svc".to_string(),
        ])?;
        serving.distinguished_name.push(rcgen::DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &issuer)?;
        let ca_file = write("ca.crt", &ca_cert.pem())?;
        let tls_cert = write("apiserver.crt", &serving_cert.pem())?;
        let tls_key = write("apiserver.key", &serving_key.serialize_pem())?;
        let sa_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let sa_priv = write("sa.key", &sa_key.serialize_pem())?;
        let sa_pub = write("sa.pub", &sa_key.public_key_pem())?;

        // --- users ------------------------------------------------------------------------------
        let mut users = vec![];
        for (name, groups) in [
            (ADMIN, vec!["system:masters"]),
            (ALICE, vec!["example:users"]),
            (BOB, vec!["example:users"]),
            (ORCHESTRATOR, vec!["example:orchestrators"]),
        ] {
            let short = name.split('@').next().unwrap_or(name);
            users.push(User {
                name: name.to_string(),
                token: random_hex()?,
                groups: groups.into_iter().map(str::to_string).collect(),
                kubeconfig: dir.join(format!("{short}.kubeconfig")),
            });
        }
        let token_file: String =
            users.iter().map(|u| format!("{},{},{},\"{}\"\n", u.token, u.name, u.name, u.groups.join(","))).collect();
        let token_file = write("tokens.csv", &token_file)?;
        let audit_policy = write("audit-policy.yaml", AUDIT_POLICY)?;
        let audit_log = dir.join("audit.log");

        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let server = format!("https://127.0.0.1:{port}");
        for u in &users {
            let kc = kubeconfig_yaml(&server, &ca_file, &u.name, &u.token);
            std::fs::write(&u.kubeconfig, kc).map_err(io(format!("write {}", u.kubeconfig.display())))?;
        }

        let mut cp = ControlPlane {
            dir: dir.clone(),
            server,
            ca_file: ca_file.clone(),
            audit_log: audit_log.clone(),
            started_in: Duration::ZERO,
            remove_dir,
            users,
            procs: Mutex::new(vec![]),
        };

        // --- etcd -------------------------------------------------------------------------------
        let (etcd_port, peer_port) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.arg("--name=deputy-test")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!("--initial-cluster=deputy-test=http://127.0.0.1:{peer_port}"))
            .arg("--unsafe-no-fsync")
            .arg("--quota-backend-bytes=4294967296")
            .arg("--log-level=warn");
        cp.spawn("etcd", etcd)?;
        cp.wait_for("etcd", Duration::from_secs(30), || async {
            http_get_plain(etcd_port, "/health").is_some_and(|b| b.contains("\"health\":\"true\""))
        })
        .await?;

        // --- kube-apiserver ---------------------------------------------------------------------
        let mut api = Command::new(bin.join("kube-apiserver"));
        api.arg(format!("--etcd-servers={etcd_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", dir.join("apiserver-certs").display()))
            .arg(format!("--tls-cert-file={}", tls_cert.display()))
            .arg(format!("--tls-private-key-file={}", tls_key.display()))
            .arg(format!("--client-ca-file={}", ca_file.display()))
            .arg(format!("--token-auth-file={}", token_file.display()))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-account-issuer={SA_ISSUER}"))
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!("--service-account-signing-key-file={}", sa_priv.display()))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--endpoint-reconciler-type=none")
            .arg("--allow-privileged=true")
            .arg(format!("--audit-policy-file={}", audit_policy.display()))
            .arg(format!("--audit-log-path={}", audit_log.display()))
            .arg("--audit-log-format=json")
            .arg("--audit-log-mode=blocking")
            .arg("--profiling=false")
            .arg("--v=1");
        if let Some(addr) = advertise_address() {
            api.arg(format!("--advertise-address={addr}"));
        }
        cp.spawn("kube-apiserver", api)?;
        let admin = cp.user(ADMIN).map(|u| u.kubeconfig.clone()).unwrap_or_default();
        let client = client_for(&admin).await?;
        cp.wait_for("kube-apiserver", Duration::from_secs(90), || async {
            let req = http::Request::get("/readyz").body(Vec::new());
            match req {
                Ok(req) => client.request_text(req).await.is_ok_and(|t| t.trim() == "ok"),
                Err(_) => false,
            }
        })
        .await?;

        // --- kube-controller-manager ------------------------------------------------------------
        let mut kcm = Command::new(bin.join("kube-controller-manager"));
        kcm.arg(format!("--kubeconfig={}", admin.display()))
            .arg("--leader-elect=false")
            .arg("--secure-port=0")
            .arg(format!("--root-ca-file={}", ca_file.display()))
            .arg(format!("--service-account-private-key-file={}", sa_priv.display()))
            .arg(format!("--controllers={CONTROLLERS}"))
            // Each controller as its own ServiceAccount (system:serviceaccount:kube-system:
            // namespace-controller, …), as kubeadm and managed clusters run them: admission
            // policies then see the identities they see in production.
            .arg("--use-service-account-credentials=true")
            .arg("--v=1");
        cp.spawn("kube-controller-manager", kcm)?;
        let sas: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
            kube::Api::namespaced(client.clone(), "default");
        cp.wait_for("kube-controller-manager", Duration::from_secs(60), || async {
            sas.get_opt("default").await.ok().flatten().is_some()
        })
        .await?;
        cp.started_in = t0.elapsed();
        Ok(cp)
    }

    fn spawn(&self, name: &'static str, mut cmd: Command) -> Result<(), Error> {
        let log_path = self.dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).map_err(io(format!("create {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io("dup log"))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let child = spawn_supervised(cmd).map_err(io(format!("start {name}")))?;
        if let Ok(mut procs) = self.procs.lock() {
            procs.push(Proc { name, child });
        }
        Ok(())
    }

    /// A user by name ([`ADMIN`], [`ALICE`], [`BOB`], [`ORCHESTRATOR`]).
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn users(&self) -> &[User] {
        &self.users
    }

    /// The admin's kubeconfig (`system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.user(ADMIN).map(|u| u.kubeconfig.clone()).unwrap_or_default()
    }

    /// A kubeconfig for any bearer token (a ServiceAccount's, say).
    pub fn kubeconfig_for_token(&self, user: &str, token: &str) -> String {
        kubeconfig_yaml(&self.server, &self.ca_file, user, token)
    }

    /// The processes still running, by name (for a test that checks the harness itself).
    pub fn running(&self) -> Vec<&'static str> {
        let Ok(mut procs) = self.procs.lock() else { return vec![] };
        procs.iter_mut().filter_map(|p| matches!(p.child.try_wait(), Ok(None)).then_some(p.name)).collect()
    }

    /// The process ids, by name.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        let Ok(procs) = self.procs.lock() else { return vec![] };
        procs.iter().map(|p| (p.name, p.child.id())).collect()
    }

    /// Freezes the process `name` (SIGSTOP): its sockets stay open and every request to it
    /// hangs, as a frozen or partitioned server's do. False if there is no such process.
    pub fn pause(&self, name: &str) -> bool {
        self.signal(name, libc::SIGSTOP)
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self, name: &str) -> bool {
        self.signal(name, libc::SIGCONT)
    }

    fn signal(&self, name: &str, signal: i32) -> bool {
        let Some(pid) = self.pids().into_iter().find(|(n, _)| *n == name).and_then(|(_, p)| i32::try_from(p).ok())
        else {
            return false;
        };
        // SAFETY: kill(2) on a child of ours that has not been reaped.
        unsafe { libc::kill(pid, signal) == 0 }
    }

    /// Stops every process: SIGTERM, then SIGKILL after two seconds.
    pub fn stop(&self) {
        let Ok(mut procs) = self.procs.lock() else { return };
        for p in procs.iter().rev() {
            if let Ok(pid) = i32::try_from(p.child.id()) {
                // SAFETY: kill(2) on a child of ours that has not been reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for p in procs.iter_mut() {
            while matches!(p.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        procs.clear();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes `deputy-cp-<pid>-*` directories of processes that no longer exist (left by a test
/// process that was killed, whose control plane died with it).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("deputy-cp-") else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// kube-apiserver needs an address to advertise (for the `kubernetes` Service endpoints). It
/// finds one from the default route; a machine without one gets none here, and the API
/// server is told to advertise a reserved documentation address (never contacted: the
/// endpoint reconciler is off).
fn advertise_address() -> Option<&'static str> {
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let has_default = routes.lines().skip(1).any(|l| l.split_whitespace().nth(1) == Some("00000000"));
    (!has_default).then_some("192.0.2.10")
}

fn kubeconfig_yaml(server: &str, ca: &Path, user: &str, token: &str) -> String {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "deputy-test", "cluster": {"server": server, "certificate-authority": ca.display().to_string()}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "deputy-test", "context": {"cluster": "deputy-test", "user": user}}],
        "current-context": "deputy-test",
    });
    serde_yaml::to_string(&doc).unwrap_or_default()
}

/// A kube client from a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client, Error> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| Error::Kube(e.to_string()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kube(e.to_string()))?;
    kube::Client::try_from(cfg).map_err(|e| Error::Kube(e.to_string()))
}

/// `GET path` over plain HTTP on loopback (etcd's health endpoint); the body, if any.
fn http_get_plain(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

impl ControlPlane {
    /// Polls `ready` until it holds; fails early when `process` has exited.
    async fn wait_for<F, Fut>(&self, process: &'static str, timeout: Duration, mut ready: F) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let log = self.dir.join(format!("{process}.log"));
        let deadline = Instant::now() + timeout;
        loop {
            if ready().await {
                return Ok(());
            }
            let exited = !self.running().contains(&process);
            if exited || Instant::now() > deadline {
                return Err(Error::NotReady {
                    process,
                    secs: timeout.as_secs(),
                    why: if exited { "the process exited".into() } else { "timed out".into() },
                    log: log.display().to_string(),
                    tail: tail(&log, 30),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

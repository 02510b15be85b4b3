//! A second, private Docker engine listening on 127.0.0.1 over TCP (plain or mutual TLS), with
//! its own data root, exec root, pidfile and managed containerd, no bridge and no iptables
//! rules; stopped and removed on drop, even when the test panics.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::registry::{free_port, require_tool, run, TestCa};

/// TLS material for a Docker engine: a CA, a server certificate for 127.0.0.1 and a client
/// certificate, laid out like `DOCKER_CERT_PATH` (`ca.pem`, `cert.pem`, `key.pem`).
pub struct EngineTls {
    /// The CA (and the server certificate and key it signed).
    pub ca: TestCa,
    /// The client directory to use as `DOCKER_CERT_PATH`.
    pub client_dir: PathBuf,
}

impl EngineTls {
    /// Create everything in `dir` with the `openssl` CLI.
    pub fn create(dir: &Path) -> Self {
        let ca = TestCa::create(dir);
        let client_dir = dir.join("client");
        std::fs::create_dir_all(&client_dir).unwrap();
        let p = |n: &str| client_dir.join(n);
        run(Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-subj", "/CN=wpimg test client"])
            .arg("-keyout")
            .arg(p("key.pem"))
            .arg("-out")
            .arg(p("client.csr")));
        std::fs::write(
            p("ext.cnf"),
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-set_serial", "3"])
            .arg("-in")
            .arg(p("client.csr"))
            .arg("-CA")
            .arg(&ca.ca_pem)
            .arg("-CAkey")
            .arg(dir.join("ca.key"))
            .arg("-extfile")
            .arg(p("ext.cnf"))
            .arg("-out")
            .arg(p("cert.pem")));
        std::fs::copy(&ca.ca_pem, p("ca.pem")).unwrap();
        Self { ca, client_dir }
    }
}

/// A private `dockerd` on 127.0.0.1:PORT.
pub struct SecondEngine {
    /// Its port.
    pub port: u16,
    /// Client TLS directory when it demands mutual TLS.
    pub tls_client_dir: Option<PathBuf>,
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
}

impl SecondEngine {
    /// Start a plain TCP engine.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Start an engine; with `tls`, it demands client certificates of that CA (`--tlsverify`).
    pub fn start_with(tls: Option<&EngineTls>) -> Self {
        require_tool("dockerd", "apt-get install docker.io");
        require_tool("containerd", "apt-get install containerd");
        require_tool("docker", "apt-get install docker.io");
        // Short path: containerd's socket lives under the exec root (108-byte limit).
        let dir = tempfile::Builder::new()
            .prefix("wpd")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        std::fs::write(d.join("daemon.json"), "{}").unwrap();
        let port = free_port();
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        // Its own bridge: with `--bridge none` dockerd deletes the host's docker0 (moby's
        // removeDefaultBridgeInterface), breaking the main engine.
        let bridge = format!("wpbr{port}");
        run(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]));
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("10.231.{}.1/24", port % 250),
            "dev",
            &bridge,
        ]));
        run(Command::new("ip").args(["link", "set", &bridge, "up"]));
        let mut cmd = Command::new("dockerd");
        cmd.arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .args(["-H", &format!("tcp://127.0.0.1:{port}")])
            .args([
                "--bridge",
                &bridge,
                "--iptables=false",
                "--ip-masq=false",
                "--ip-forward=false",
                "--userland-proxy=false",
                "--shutdown-timeout",
                "3",
                "--storage-driver",
                "overlay2",
            ]);
        if let Some(t) = tls {
            cmd.arg("--tlsverify")
                .arg("--tlscacert")
                .arg(&t.ca.ca_pem)
                .arg("--tlscert")
                .arg(&t.ca.cert)
                .arg("--tlskey")
                .arg(&t.ca.key);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let mut e = Self {
            port,
            tls_client_dir: tls.map(|t| t.client_dir.clone()),
            dir: Some(dir),
            child: Some(child),
        };
        e.wait_ready();
        e
    }

    /// `tcp://127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// dockerd's log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Some(d) = &self.dir {
            if let Ok(mut f) = std::fs::File::open(d.path().join("dockerd.log")) {
                let _ = f.read_to_string(&mut s);
            }
        }
        s
    }

    /// Set `DOCKER_HOST` (and the TLS variables, or clear them) on a command.
    pub fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("DOCKER_HOST", self.host())
            .env_remove("DOCKER_TLS")
            .env_remove("DOCKER_CONTEXT");
        match &self.tls_client_dir {
            Some(d) => cmd.env("DOCKER_TLS_VERIFY", "1").env("DOCKER_CERT_PATH", d),
            None => cmd
                .env_remove("DOCKER_TLS_VERIFY")
                .env_remove("DOCKER_CERT_PATH"),
        }
    }

    /// A `docker` CLI command against this engine.
    pub fn docker(&self) -> Command {
        let mut c = Command::new("docker");
        self.env(&mut c);
        c
    }

    /// stdout of a `docker` command against this engine that must succeed.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        run(self.docker().args(args))
    }

    /// Names of all containers of this engine (running or not).
    pub fn containers(&self) -> Vec<String> {
        self.docker_ok(&["ps", "-a", "--format", "{{.Names}}"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ok = self
                .docker()
                .args(["version", "--format", "{{.Server.Version}}"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("second dockerd exited ({status}):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "second dockerd did not answer on {} within 60 s:\n{}",
            self.host(),
            self.log()
        );
    }

    fn containerd_pid(&self) -> Option<i32> {
        let d = self.dir.as_ref()?;
        std::fs::read_to_string(d.path().join("exec/containerd/containerd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Mount points at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    v
}

impl Drop for SecondEngine {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &format!("wpbr{}", self.port)])
            .status();
        let containerd = self.containerd_pid();
        if let Some(mut child) = self.child.take() {
            // SIGTERM: dockerd stops its containers and its managed containerd.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever outlived dockerd and names our private directory in its command line
        // (its containerd, container shims) is ours: kill those processes by id.
        if let Some(d) = self.dir.as_ref().map(|d| d.path().display().to_string()) {
            let mut pids: Vec<i32> = containerd.into_iter().collect();
            for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                    let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                    if String::from_utf8_lossy(&cmdline).contains(&d) {
                        pids.push(pid);
                    }
                }
            }
            for pid in pids {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&d) {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if let Some(dir) = self.dir.take() {
            for m in mounts_under(dir.path()) {
                if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
            let _ = dir.close();
        }
    }
}

//! moto's server (the ECR API emulator) on a random loopback port, killed on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The moto server program (installed by scripts/setup into /opt/wpimg-venv).
pub const MOTO_SERVER: &str = "/opt/wpimg-venv/bin/moto_server";
/// Python with boto3 (moto's dependency), for IAM setup in auth tests.
pub const VENV_PYTHON: &str = "/opt/wpimg-venv/bin/python";
/// moto's default account.
pub const MOTO_ACCOUNT: &str = "123456789012";

/// A running moto server; killed (and reaped) on drop.
pub struct Moto {
    child: Child,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind a loopback port")
}

impl Moto {
    /// Start moto with default settings (any credentials accepted).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Start moto with extra environment variables.
    pub fn start_with(env: &[(&str, &str)]) -> Self {
        assert!(
            Path::new(MOTO_SERVER).is_file(),
            "{MOTO_SERVER} is missing: install it with `python3 -m venv /opt/wpimg-venv && \
             /opt/wpimg-venv/bin/pip install 'moto[server]'` (scripts/setup does this)"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = free_port();
            let log = dir.path().join(format!("moto-{port}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let mut cmd = Command::new(MOTO_SERVER);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out);
            for (k, v) in env {
                cmd.env(k, v);
            }
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {MOTO_SERVER}: {e}"));
            if wait_ready(&mut child, port, Duration::from_secs(60)) {
                return Moto {
                    child,
                    port,
                    url: format!("http://127.0.0.1:{port}"),
                    _dir: dir,
                };
            }
            // Lost a port race or failed: stop it and try another port.
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("moto_server did not start; last log:\n{last_log}");
    }

    /// POST to moto's control API (`/moto-api/...`); panics unless 2xx.
    pub fn api_post(&self, path: &str, body: &str) -> String {
        let (status, text) = http(self.port, "POST", path, body)
            .unwrap_or_else(|e| panic!("POST {path} to moto: {e}"));
        assert!((200..300).contains(&status), "POST {path}: {status} {text}");
        text
    }

    /// From now on moto authenticates and authorizes every request against its IAM.
    pub fn enforce_auth(&self) {
        self.api_post("/moto-api/reset-auth", "0");
    }

    /// Create an IAM user whose policy allows only `actions`; returns (access key id, secret).
    /// Must run before [`enforce_auth`](Self::enforce_auth).
    pub fn iam_user(&self, name: &str, actions: &[&str]) -> (String, String) {
        assert!(
            Path::new(VENV_PYTHON).is_file(),
            "{VENV_PYTHON} is missing (scripts/setup installs moto[server] with boto3 there)"
        );
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]
        });
        let script = format!(
            r#"
import boto3, json
iam = boto3.client("iam", region_name="us-east-1", endpoint_url="{url}",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
iam.create_user(UserName="{name}")
iam.put_user_policy(UserName="{name}", PolicyName="p", PolicyDocument={policy})
k = iam.create_access_key(UserName="{name}")["AccessKey"]
print(k["AccessKeyId"], k["SecretAccessKey"])
"#,
            url = self.url,
            policy = serde_json::to_string(&policy.to_string()).unwrap(),
        );
        let out = Command::new(VENV_PYTHON)
            .args(["-c", &script])
            .env_remove("AWS_PROFILE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "IAM setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut it = text.split_whitespace();
        (
            it.next().unwrap().to_string(),
            it.next().unwrap().to_string(),
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_ready(child: &mut Child, port: u16, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if matches!(http(port, "GET", "/moto-api/", ""), Ok((s, _)) if s > 0) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Minimal HTTP/1.1 request on loopback: (status, body).
pub fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `wpimg push --ecr --json` in `dir` with the AWS SDK pointed at moto (test keys, no user
/// config from `aws_dir`) plus `args`: (exit code, last JSON line, stderr). Fails if the secret
/// key or moto's registry token shows up in the output.
pub fn wpimg_push_ecr(
    moto: &Moto,
    dir: &Path,
    aws_dir: &Path,
    args: &[&str],
) -> (Option<i32>, serde_json::Value, String) {
    let o = super::run(
        super::wpimg()
            .current_dir(dir)
            .env("AWS_ENDPOINT_URL_ECR", &moto.url)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
            .env("AWS_CONFIG_FILE", aws_dir.join("config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", aws_dir.join("credentials"))
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_REGION")
            .env_remove("AWS_DEFAULT_REGION")
            .args(["push", "--ecr", "--json"])
            .args(args),
    );
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let last = stdout
        .lines()
        .last()
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or(serde_json::Value::Null);
    assert!(
        !stdout.contains("testing-secret-key") && !stderr.contains("testing-secret-key"),
        "secret key leaked"
    );
    assert!(
        !stdout.contains("auth-token") && !stderr.contains("auth-token"),
        "token leaked"
    );
    (o.status.code(), last, stderr)
}

/// Write an empty playbook and an `image.yaml` (image `app`, tag `v1`) targeting `repository`
/// with `ecr_yaml` (lines indented by four spaces) as its `target.ecr` settings into `dir`.
pub fn write_ecr_image_yaml(dir: &Path, repository: &str, ecr_yaml: &str) {
    super::write(&dir.join("pb.yml"), "- hosts: all\n  tasks: []\n");
    super::write(
        &dir.join("image.yaml"),
        &format!(
            "name: app\nbase: {}\nprovision: {{ playbook: pb.yml }}\ntarget:\n  repository: \
             {repository}\n  tags: [v1]\n  ecr:\n{ecr_yaml}",
            super::BASE
        ),
    );
}

/// A command running only the test `name` (`module::test`) of this test binary in a clean environment (`PATH`
/// kept, `HOME` set, AWS instance metadata off): for tests whose process-wide environment must
/// differ (AWS variables). Add the environment, then [`run_child_test`].
pub fn child_test(name: &str, home: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary path"));
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("AWS_EC2_METADATA_DISABLED", "true");
    cmd
}

/// Run a [`child_test`]; panics unless its one test passed. Returns its output.
pub fn run_child_test(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "{text}");
    text
}

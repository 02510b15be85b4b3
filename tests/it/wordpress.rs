//! The WordPress image end to end: `wpimg build --push` of the top-level image.yaml on the
//! Debian fixture base, then pull and run the pushed image against a real MariaDB, install
//! WordPress over HTTP, check health endpoints, SIGTERM shutdown, and that the database password
//! is in no layer.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::registry::Registry;
use crate::common::*;

struct Mariadb {
    child: Child,
    dir: tempfile::TempDir,
}

impl Mariadb {
    fn sock_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn start(password: &str) -> Self {
        for t in ["mariadbd", "mariadb-install-db", "mariadb"] {
            require(t);
        }
        let dir = tempfile::Builder::new()
            .prefix("wpimg-db-")
            .tempdir()
            .unwrap();
        let db = dir.path().join("db");
        let sock = dir.path().join("sock");
        std::fs::create_dir_all(&db).unwrap();
        std::fs::create_dir_all(&sock).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for p in [dir.path(), sock.as_path()] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        ok_stdout(Command::new("mariadb-install-db").args([
            "--no-defaults",
            &format!("--datadir={}", db.display()),
            "--user=root",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
        ]));
        let socket = sock.join("mysqld.sock");
        let child = Command::new("mariadbd")
            .args([
                "--no-defaults",
                &format!("--datadir={}", db.display()),
                &format!("--socket={}", socket.display()),
                &format!("--pid-file={}", dir.path().join("pid").display()),
                "--skip-networking",
                "--user=root",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let m = Mariadb { child, dir };
        let start = Instant::now();
        while !m.sql("SELECT 1").status.success() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "mariadbd did not start"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        let r = m.sql(&format!(
            "CREATE DATABASE wordpress; CREATE USER 'wordpress'@'localhost' IDENTIFIED BY '{password}'; GRANT ALL ON wordpress.* TO 'wordpress'@'localhost';"
        ));
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        m
    }

    fn sql(&self, q: &str) -> std::process::Output {
        run(Command::new("mariadb")
            .arg(format!(
                "--socket={}",
                self.sock_dir().join("mysqld.sock").display()
            ))
            .args(["-e", q]))
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct ContainerGuard(String);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

fn curl(args: &[&str]) -> (bool, String) {
    let o = run(Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args));
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

fn wait_for(url: &str, secs: u64) {
    let start = Instant::now();
    loop {
        let (ok, _) = curl(&["-f", url]);
        if ok {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{url} never answered"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every blob of the pushed image, as stored by the registry, must not contain `needle`
/// (compressed or not).
fn assert_not_in_blobs(reg: &Registry, needle: &str) {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), out);
            } else if e.file_name() == "data" {
                out.push(e.path());
            }
        }
    }
    let mut blobs = Vec::new();
    walk(
        &reg.dir.path().join("data/docker/registry/v2/blobs"),
        &mut blobs,
    );
    assert!(blobs.len() >= 3, "no blobs found in the registry");
    for b in blobs {
        let mut raw = Vec::new();
        std::fs::File::open(&b)
            .unwrap()
            .read_to_end(&mut raw)
            .unwrap();
        let plain = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut d = flate2::read::MultiGzDecoder::new(raw.as_slice());
            let mut v = Vec::new();
            d.read_to_end(&mut v).unwrap();
            v
        } else {
            raw
        };
        assert!(
            !plain.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the database password is in blob {}",
            b.display()
        );
    }
}

#[test]
fn wordpress_image_builds_pushes_runs_and_installs() {
    require_fixtures();
    require("ansible-playbook");
    require("curl");
    let reg = Registry::start();
    let repo = format!("{}/wordpress", reg.host());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let oci = tempfile::tempdir().unwrap();
    let id = unique("wp");
    let password = format!("db-{id}-Secret");

    // Build with wpimg from the repository's image.yaml on the local Debian base, push it.
    let o = run(wpimg()
        .current_dir(root)
        .arg("--oci-dir")
        .arg(oci.path())
        .args([
            "build",
            "image.yaml",
            "--json",
            "--push",
            "--to",
            &repo,
            "--tag",
            "e2e",
        ])
        .args(["--var", &format!("base={BASE}")]));
    assert!(
        o.status.success(),
        "wpimg build failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let digest = result["manifest"]["digest"].as_str().unwrap().to_string();
    assert_eq!(result["image_uri"], format!("{repo}@{digest}"));
    eprintln!("stages: {}", result["stages"]);

    // Pull the pushed image by digest and run it against MariaDB.
    let image = format!("{repo}@{digest}");
    ok_stdout(Command::new("docker").args(["pull", "-q", &image]));
    let _img = ImageGuard(image.clone());
    let db = Mariadb::start(&password);
    let secret = db.dir.path().join("db_password");
    std::fs::write(&secret, format!("{password}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let name = format!("wpimg-e2e-{id}");
    let _c = ContainerGuard(name.clone());
    ok_stdout(Command::new("docker").args([
        "run",
        "-d",
        "--name",
        &name,
        "-p",
        "127.0.0.1::80",
        "-v",
        &format!("{}:/run/mysqld-host", db.sock_dir().display()),
        "-v",
        &format!("{}:/run/secrets/db_password:ro", secret.display()),
        "-e",
        "WORDPRESS_DB_HOST=localhost:/run/mysqld-host/mysqld.sock",
        "-e",
        "WORDPRESS_DB_NAME=wordpress",
        "-e",
        "WORDPRESS_DB_USER=wordpress",
        "-e",
        "WORDPRESS_DB_PASSWORD_FILE=/run/secrets/db_password",
        &image,
    ]));
    let port = ok_stdout(Command::new("docker").args(["port", &name, "80/tcp"]));
    let url = format!("http://{}", port.lines().next().unwrap().trim());

    wait_for(&format!("{url}/healthz"), 90);
    let (_, body) = curl(&["-f", &format!("{url}/healthz")]);
    assert_eq!(body.trim(), "ok");
    wait_for(&format!("{url}/healthz/php"), 60);
    let (ok, body) = curl(&["-f", &format!("{url}/healthz/php?db=1")]);
    assert!(ok && body.contains("database"), "PHP/DB health: {body}");

    // Complete the installation over HTTP, then find the title on the front page.
    let title = format!("wpimg e2e {id}");
    let (ok, _) = curl(&[
        "-f",
        "-o",
        "/dev/null",
        &format!("{url}/wp-admin/install.php"),
    ]);
    assert!(ok, "install.php does not answer");
    let (ok, page) = curl(&[
        "-f",
        &format!("{url}/wp-admin/install.php?step=2"),
        "--data-urlencode",
        &format!("weblog_title={title}"),
        "--data-urlencode",
        "user_name=admin",
        "--data-urlencode",
        "admin_password=e2e-admin-password",
        "--data-urlencode",
        "admin_password2=e2e-admin-password",
        "--data-urlencode",
        "admin_email=admin@example.com",
        "--data-urlencode",
        "pw_weak=1",
        "--data-urlencode",
        "blog_public=0",
    ]);
    assert!(
        ok && page.contains("Success!"),
        "installation failed: {page}"
    );
    let (ok, front) = curl(&["-f", &format!("{url}/")]);
    assert!(ok && front.contains(&title), "title not on the front page");

    // Workers do not run as root.
    let ps = ok_stdout(Command::new("docker").args(["exec", &name, "ps", "-eo", "user,args"]));
    for line in ps
        .lines()
        .filter(|l| l.contains("worker process") || l.contains("pool "))
    {
        assert!(
            !line.trim_start().starts_with("root"),
            "worker as root: {line}"
        );
    }

    // SIGTERM: clean stop well within ECS's timeout.
    let t = Instant::now();
    ok_stdout(Command::new("docker").args(["stop", "-t", "10", &name]));
    let took = t.elapsed();
    let code =
        ok_stdout(Command::new("docker").args(["inspect", "-f", "{{.State.ExitCode}}", &name]));
    assert!(took < Duration::from_secs(10), "docker stop took {took:?}");
    assert_eq!(code.trim(), "0", "exit code after SIGTERM");
    let logs = run(Command::new("docker").args(["logs", &name]));
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    assert!(!logs.contains(&password), "password in the container log");

    // No layer of the pushed image holds the password.
    assert_not_in_blobs(&reg, &password);
}

//! Test support for the WordPress image: build it from the repository's image.yaml, a MariaDB
//! on a unix socket, running the image against it, and waiting for HTTP answers.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::registry::Registry;
use super::*;

/// A private MariaDB server listening on a unix socket only, with a `wordpress` database and
/// user; the directory holding the socket and the password file can be mounted into a container.
pub struct Mariadb {
    child: Child,
    /// Data, socket and secret files (removed on drop).
    pub dir: tempfile::TempDir,
}

impl Mariadb {
    /// Directory holding `mysqld.sock` (mount it at /run/mysqld-host).
    pub fn sock_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// The `wordpress` user's password in a file (mount it as a secret).
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("db_password")
    }

    /// Start a server whose `wordpress` user has `password`; fails the test within 60 s.
    pub fn start(password: &str) -> Self {
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
        let secret = m.password_file();
        std::fs::write(&secret, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        m
    }

    /// Run SQL as root over the socket.
    pub fn sql(&self, q: &str) -> std::process::Output {
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

/// Removes a container (running or not) on drop.
pub struct ContainerGuard(pub String);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

/// Removes a Docker volume on drop.
pub struct VolumeGuard(pub String);

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["volume", "rm", "-f", &self.0])
            .output();
    }
}

/// `curl -sS --max-time 30 ARGS`: success and stdout.
pub fn curl(args: &[&str]) -> (bool, String) {
    let o = run(Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args));
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// Wait until `url` answers 2xx, failing the test after `secs`.
pub fn wait_for(url: &str, secs: u64) {
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

/// Status and `Location` of a GET that is not followed (extra curl arguments, e.g. headers).
pub fn redirect(url: &str, extra: &[&str]) -> (u16, String) {
    let o = run(Command::new("curl")
        .args(["-sS", "--max-time", "30", "-o", "/dev/null", "-D", "-"])
        .args(extra)
        .arg(url));
    assert!(
        o.status.success(),
        "{url}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let head = String::from_utf8_lossy(&o.stdout).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let location = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, location)
}

/// Every stylesheet and script of a WordPress page is under `base`, and none is elsewhere on
/// the same host (another port or scheme).
pub fn assert_links_to(page: &str, base: &str) {
    let host = base
        .split("://")
        .nth(1)
        .and_then(|r| r.split([':', '/']).next())
        .unwrap_or_default();
    let refs: Vec<&str> = page
        .split(['"', '\''])
        .filter(|s| s.contains("/wp-includes/") || s.contains("/wp-content/"))
        .filter(|s| s.starts_with("http:") || s.starts_with("https:"))
        .collect();
    assert!(
        !refs.is_empty(),
        "no wp-includes/wp-content URL on the page"
    );
    for r in refs {
        assert!(
            r.starts_with(base) || !r.contains(host),
            "{r} is not under {base}"
        );
    }
}

/// Percent-encode `:` and `/` the way WordPress encodes a redirect_to URL.
pub fn urlencode(s: &str) -> String {
    s.replace(':', "%3A").replace('/', "%2F")
}

/// The WordPress image built by wpimg from the repository's image.yaml and pushed.
pub struct BuiltImage {
    /// `REPO@sha256:...`, pulled into Docker.
    pub image: String,
    /// wpimg's `result` event.
    pub result: serde_json::Value,
    /// Every JSON line wpimg printed.
    pub events: Vec<serde_json::Value>,
    _pulled: ImageGuard,
}

/// Build the repository's image.yaml on the Debian fixture base into `oci_dir`, push it to
/// `reg` as `wordpress:TAG` and pull it by digest.
pub fn build_wordpress(reg: &Registry, oci_dir: &Path, tag: &str) -> BuiltImage {
    build_wordpress_with(reg, oci_dir, tag, &[])
}

/// [`build_wordpress`] with extra `wpimg build` arguments (`--accelerator mitogen`).
pub fn build_wordpress_with(
    reg: &Registry,
    oci_dir: &Path,
    tag: &str,
    extra: &[&str],
) -> BuiltImage {
    require_fixtures();
    require("ansible-playbook");
    let repo = format!("{}/wordpress", reg.host());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = run(wpimg()
        .current_dir(root)
        .arg("--oci-dir")
        .arg(oci_dir)
        .args([
            "build",
            "image.yaml",
            "--json",
            "--push",
            "--to",
            &repo,
            "--tag",
            tag,
        ])
        .args(extra)
        .args(["--var", &format!("base={BASE}")]));
    assert!(
        o.status.success(),
        "wpimg build failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let result = events
        .iter()
        .rfind(|e| e["event"] == "result")
        .cloned()
        .expect("no result event");
    let digest = result["manifest"]["digest"].as_str().unwrap().to_string();
    assert_eq!(result["image_uri"], format!("{repo}@{digest}"));
    let image = format!("{repo}@{digest}");
    ok_stdout(Command::new("docker").args(["pull", "-q", &image]));
    BuiltImage {
        _pulled: ImageGuard(image.clone()),
        image,
        result,
        events,
    }
}

/// `docker run -d` of the WordPress image against `db` (socket and password file mounted),
/// published on `publish` (e.g. `127.0.0.1::80`), with extra `docker run` arguments.
pub fn run_wordpress(name: &str, image: &str, db: &Mariadb, publish: &str, extra: &[&str]) {
    let secret = db.password_file();
    ok_stdout(
        Command::new("docker")
            .args(["run", "-d", "--name", name, "-p", publish])
            .arg("-v")
            .arg(format!("{}:/run/mysqld-host", db.sock_dir().display()))
            .arg("-v")
            .arg(format!("{}:/run/secrets/db_password:ro", secret.display()))
            .args([
                "-e",
                "WORDPRESS_DB_HOST=localhost:/run/mysqld-host/mysqld.sock",
                "-e",
                "WORDPRESS_DB_NAME=wordpress",
                "-e",
                "WORDPRESS_DB_USER=wordpress",
                "-e",
                "WORDPRESS_DB_PASSWORD_FILE=/run/secrets/db_password",
            ])
            .args(extra)
            .arg(image),
    );
}

/// The `http://HOST:PORT` Docker published a container's port 80 on.
pub fn published_url(name: &str) -> String {
    let port = ok_stdout(Command::new("docker").args(["port", name, "80/tcp"]));
    format!("http://{}", port.lines().next().unwrap_or_default().trim())
}

/// One entry of a layer as compared between builds: type, mode, owner, link target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Tar entry type byte.
    pub ty: char,
    /// Permission bits (with setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Symlink or hard link target.
    pub link: String,
}

/// The entries of a gzip layer blob of an OCI layout, by path.
pub fn layer_listing(oci_dir: &Path, digest: &str) -> std::collections::BTreeMap<String, Entry> {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let blob = std::fs::File::open(oci_dir.join("blobs/sha256").join(hex)).unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    let mut out = std::collections::BTreeMap::new();
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let h = e.header();
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        let entry = Entry {
            ty: h.entry_type().as_byte() as char,
            mode: h.mode().unwrap(),
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            link,
        };
        out.insert(String::from_utf8_lossy(&e.path_bytes()).into_owned(), entry);
    }
    out
}

/// The new layers (one per step, base first) of a build's `result` event.
pub fn new_layers(result: &serde_json::Value) -> Vec<String> {
    result["layers"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .filter(|l| l["new"] == true)
                .filter_map(|l| l["digest"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Directories of `listing` with nothing below them in it: a directory a play only touched
/// (overlayfs records one where a file was made and removed again), kept with its base mode.
pub fn touched_only(listing: &std::collections::BTreeMap<String, Entry>, path: &str) -> bool {
    listing.get(path).is_some_and(|e| e.ty == '5')
        && !listing
            .keys()
            .any(|k| k.len() > path.len() && k.starts_with(path))
}

/// The new layer (the last one wpimg made) of a build's `result` event.
pub fn new_layer(result: &serde_json::Value) -> String {
    result["layers"]
        .as_array()
        .and_then(|ls| ls.iter().rev().find(|l| l["new"] == true))
        .and_then(|l| l["digest"].as_str())
        .unwrap_or_else(|| panic!("no new layer in {result}"))
        .to_string()
}

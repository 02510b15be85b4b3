//! The WordPress image as a person meets it (issue 16), in headless chromium driven through
//! WebDriver: the image built by wpimg from the repository's image.yaml on the Debian fixture
//! base runs on a non-default port against MariaDB; the test follows the install form, logs in,
//! uploads an image on the Media screen, publishes a post showing it, checks the site through a
//! TLS-terminating proxy (X-Forwarded-Proto: https), restarts and replaces the container (the
//! wp-content volume keeps the upload), saves screenshots under
//! `$CARGO_TARGET_DIR/test-artifacts/browser/`, and fails on console errors or mixed content.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::common::registry::{free_port, Registry};
use crate::common::webdriver::{wait_until, Browser};
use crate::common::wordpress::*;
use crate::common::*;

/// Width and height of the uploaded test image.
const IMAGE_SIZE: (u32, u32) = (240, 160);

/// Where screenshots and chromedriver's log go: `$CARGO_TARGET_DIR/test-artifacts/browser`.
fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR has a parent")
        .join("test-artifacts/browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Print past the test harness's output capture, so artifact paths show on success too.
fn announce(line: &str) {
    let _ = writeln!(std::io::stderr(), "browser test: {line}");
}

/// A PNG (8-bit RGB, a colour gradient with a grid) made without an image library.
fn png(width: u32, height: u32) -> Vec<u8> {
    let mut raw = Vec::with_capacity(((width * 3 + 1) * height) as usize);
    for y in 0..height {
        raw.push(0); // filter: none
        for x in 0..width {
            let grid = x % 40 == 0 || y % 40 == 0;
            let (r, g, b) = if grid {
                (255, 255, 255)
            } else {
                ((x * 255 / width) as u8, (y * 255 / height) as u8, 0x90)
            };
            raw.extend([r, g, b]);
        }
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).unwrap();
    let idat = z.finish().unwrap();
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // depth 8, RGB, deflate, filter 0, no interlace
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(b"IHDR", ihdr), (b"IDAT", idat), (b"IEND", Vec::new())] {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(&data);
        let crc = crc32(&out[start..]);
        out.extend(crc.to_be_bytes());
    }
    out
}

/// CRC-32 (ISO-HDLC), as PNG chunks use it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The versions the play reported with set_stats, from the build log's custom stats
/// (`RUN: {"php_version": ..., "wordpress_version": ...}`).
fn reported_versions(events: &[Value]) -> Value {
    events
        .iter()
        .filter(|e| e["event"] == "output")
        .filter_map(|e| e["line"].as_str())
        .filter_map(|l| l.trim().strip_prefix("RUN:"))
        .find_map(|json| serde_json::from_str::<Value>(json.trim()).ok())
        .expect("the build log shows no custom stats (set_stats) of the play")
}

/// Console errors and mixed content seen in the browser, page by page.
struct ConsoleCheck {
    /// Origins the site answers on; failed loads elsewhere are the test machine's missing
    /// internet (Gravatar, s.w.org), not the image.
    origins: Vec<String>,
    problems: Vec<String>,
    ignored: Vec<String>,
}

impl ConsoleCheck {
    fn new(origin: &str) -> Self {
        ConsoleCheck {
            origins: vec![origin.to_string()],
            problems: Vec::new(),
            ignored: Vec::new(),
        }
    }

    /// Read what the browser logged since the last call, on `page`.
    fn collect(&mut self, b: &Browser, page: &str) {
        for e in b.take_log() {
            let line = format!("{page}: {} {} {}", e.level, e.source, e.message);
            let external_load = e.source == "network"
                && !self
                    .origins
                    .iter()
                    .any(|o| e.message.starts_with(o.as_str()));
            if e.message.contains("Mixed Content") {
                self.problems.push(line);
            } else if e.level == "SEVERE" && external_load {
                self.ignored.push(line);
            } else if e.level == "SEVERE" {
                self.problems.push(line);
            }
        }
    }

    fn assert_clean(&self) {
        for l in &self.ignored {
            announce(&format!(
                "ignored (outside the site, no internet here): {l}"
            ));
        }
        assert!(
            self.problems.is_empty(),
            "console errors or mixed content:\n{}",
            self.problems.join("\n")
        );
    }
}

/// The site as the test runs it: a container of the image on a fixed host port with a named
/// wp-content volume, against the test's MariaDB.
struct Site<'a> {
    name: String,
    image: String,
    port: u16,
    volume: String,
    db: &'a Mariadb,
}

impl Site<'_> {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Start a new container (the volume keeps wp-content across containers).
    fn run(&self) {
        run_wordpress(
            &self.name,
            &self.image,
            self.db,
            &format!("127.0.0.1:{}:80", self.port),
            &[
                "-v",
                &format!("{}:/var/lib/wordpress/wp-content", self.volume),
            ],
        );
        wait_for(&format!("{}/healthz/php", self.url()), 90);
    }

    /// `docker restart` (SIGTERM, then start the same container).
    fn restart(&self) {
        ok_stdout(Command::new("docker").args(["restart", "-t", "10", &self.name]));
        wait_for(&format!("{}/healthz/php", self.url()), 90);
    }

    /// Remove the container and start a new one on the same volume (a replaced ECS task).
    fn replace(&self) {
        ok_stdout(Command::new("docker").args(["rm", "-f", &self.name]));
        self.run();
    }

    /// The container's address on Docker's network.
    fn ip(&self) -> String {
        let ip = ok_stdout(Command::new("docker").args([
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            &self.name,
        ]));
        ip.split_whitespace().next().expect("no IP").to_string()
    }
}

/// Leave the page before the test stops a server, so that a late request of the page (its
/// favicon) does not fail.
fn leave(b: &Browser) {
    b.goto("about:blank");
}

/// Log out with the admin bar's "Log Out" link.
fn log_out(b: &Browser, url: &str) {
    b.goto(&format!("{url}/wp-admin/"));
    let link = b.wait_for("#wp-admin-bar-logout a", 30);
    let href = b.attribute(&link, "href").unwrap_or_default();
    assert!(
        href.starts_with(&format!("{url}/wp-login.php?action=logout")),
        "Log Out link {href}"
    );
    b.goto(&href);
    b.wait_for_xpath(
        "//*[contains(normalize-space(), 'You are now logged out.')]",
        30,
    );
    b.goto(&format!("{url}/"));
    assert!(
        b.find("#wpadminbar").is_none(),
        "still logged in after logging out"
    );
}

/// The administrator the install form creates.
struct Admin {
    user: &'static str,
    password: String,
}

/// Open the site: WordPress sends the browser to its install form, on the port the browser used.
fn install(b: &Browser, url: &str, title: &str, admin: &Admin) {
    b.goto(&format!("{url}/"));
    assert_eq!(
        b.url(),
        format!("{url}/wp-admin/install.php"),
        "opening the site must lead to the install form on the same host and port"
    );
    b.fill_form(&[
        ("#weblog_title", title),
        ("#user_login", admin.user),
        ("#pass1", &admin.password),
        ("#admin_email", "admin@example.com"),
    ]);
    b.click(&b.wait_for("#submit", 10));
    b.wait_for_xpath("//h1[normalize-space()='Success!']", 60);
    b.click(&b.wait_for_xpath("//a[normalize-space()='Log In']", 10));
    assert!(
        b.url().starts_with(&format!("{url}/wp-login.php")),
        "Log In leads to {}",
        b.url()
    );
}

/// Log in on wp-login.php and land on the dashboard.
fn log_in(b: &Browser, url: &str, admin: &Admin) {
    if !b.url().starts_with(&format!("{url}/wp-login.php")) {
        b.goto(&format!("{url}/wp-login.php"));
    }
    b.fill_form(&[("#user_login", admin.user), ("#user_pass", &admin.password)]);
    b.click(&b.wait_for("#wp-submit", 10));
    b.wait_for("#dashboard-widgets", 60);
    assert_eq!(b.url(), format!("{url}/wp-admin/"), "after logging in");
}

/// What the Media screen says about an upload.
struct Upload {
    /// Its URL (the Media screen's "Copy URL to clipboard").
    url: String,
    /// The attachment's post ID (from its Edit link).
    id: String,
}

/// Media > Add New: pick the file in the uploader, wait until WordPress shows it.
fn upload_image(b: &Browser, url: &str, file: &Path) -> Upload {
    b.goto(&format!("{url}/wp-admin/media-new.php"));
    // The uploader's file input (plupload's, under the "Select Files" button).
    let input = b.wait_for("#plupload-upload-ui input[type=file]", 30);
    b.type_text(&input, &file.display().to_string());
    let copy = b.wait_for("#media-items .media-item button.copy-attachment-url", 60);
    let upload_url = b
        .attribute(&copy, "data-clipboard-text")
        .unwrap_or_default();
    let edit = b.wait_for("#media-items .media-item a.edit-attachment", 10);
    let edit_url = b.attribute(&edit, "href").unwrap_or_default();
    let id = edit_url
        .split("post=")
        .nth(1)
        .and_then(|s| s.split('&').next())
        .unwrap_or_default()
        .to_string();
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        upload_url.starts_with(&format!("{url}/wp-content/uploads/"))
            && upload_url.ends_with(&name),
        "upload URL {upload_url}"
    );
    assert!(!id.is_empty(), "no attachment id in {edit_url}");
    Upload {
        url: upload_url,
        id,
    }
}

/// Posts > Add New in the block editor's code editor: a title and an image block, Publish,
/// then "View Post". Returns the post's URL.
fn publish_post(b: &Browser, url: &str, title: &str, upload: &Upload) -> String {
    b.goto(&format!("{url}/wp-admin/post-new.php"));
    b.wait_for(".edit-post-layout", 60);
    // The welcome guide opens on a first visit, shortly after the editor.
    let guide = ".edit-post-welcome-guide button[aria-label='Close dialog']";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while b.find(guide).is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    if let Some(close) = b.find(guide) {
        b.click(&close);
    }
    let options = b.wait_for(".edit-post-header button[aria-label='Options']", 10);
    b.click(&options);
    b.click(&b.wait_for_xpath(
        "//button[@role='menuitemradio'][.//text()[normalize-space()='Code editor']]",
        10,
    ));
    b.click(&options);
    let content = b.wait_for("textarea.editor-post-text-editor", 10);
    b.type_text(&b.wait_for(".editor-post-title__input", 10), title);
    let block = format!(
        concat!(
            "<!-- wp:paragraph -->\n<p>Uploaded through the Media screen:</p>\n<!-- /wp:paragraph -->\n\n",
            "<!-- wp:image {{\"id\":{id},\"sizeSlug\":\"full\",\"linkDestination\":\"none\"}} -->\n",
            "<figure class=\"wp-block-image size-full\"><img src=\"{src}\" alt=\"wpimg test image\" class=\"wp-image-{id}\"/></figure>\n",
            "<!-- /wp:image -->"
        ),
        id = upload.id,
        src = upload.url
    );
    b.type_text(&content, &block);
    b.click(&b.wait_for("button.editor-post-publish-panel__toggle", 10));
    b.click(&b.wait_for(
        ".editor-post-publish-panel button.editor-post-publish-button",
        10,
    ));
    let view = b.wait_for_xpath(
        "//div[contains(@class,'post-publish-panel__postpublish')]//a[normalize-space()='View Post']",
        60,
    );
    let post = b.attribute(&view, "href").unwrap_or_default();
    assert!(post.starts_with(&format!("{url}/")), "post URL {post}");
    post
}

/// The post page shows the uploaded image, loaded (natural size), and the file is intact.
fn assert_image_shown(b: &Browser, post: &str, title: &str, upload: &Upload, png: &[u8]) {
    b.goto(post);
    b.wait_for_xpath(&format!("//h1[normalize-space()='{title}']"), 30);
    let size = wait_until("the uploaded image on the post", 30, || {
        let v = b.execute(
            "const i = Array.from(document.images).find(i => i.src === arguments[0]);
             return i && i.complete ? [i.naturalWidth, i.naturalHeight] : null;",
            json!([upload.url]),
        );
        (!v.is_null()).then_some(v)
    });
    assert_eq!(size, json!([IMAGE_SIZE.0, IMAGE_SIZE.1]), "image on {post}");
    let o = run(Command::new("curl").args(["-fsS", "--max-time", "30", &upload.url]));
    assert!(
        o.status.success() && o.stdout == png,
        "{} differs from the uploaded file",
        upload.url
    );
}

/// A TLS-terminating proxy in front of the site, like a load balancer: nginx from the image
/// itself (Debian's, with ssl) in its own container, a throwaway certificate, Host kept and
/// X-Forwarded-Proto: https set. Returns its https origin.
fn start_tls_proxy(site: &Site, dir: &Path, name: &str) -> String {
    require("openssl");
    ok_stdout(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        &dir.join("key.pem").display().to_string(),
        "-out",
        &dir.join("cert.pem").display().to_string(),
    ]));
    let conf = format!(
        r#"pid /tmp/proxy.pid;
events {{}}
http {{
    access_log off;
    server {{
        listen 443 ssl;
        ssl_certificate /proxy/cert.pem;
        ssl_certificate_key /proxy/key.pem;
        location / {{
            proxy_pass http://{upstream}:80;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"#,
        upstream = site.ip()
    );
    write(&dir.join("nginx.conf"), &conf);
    let port = free_port();
    ok_stdout(Command::new("docker").args([
        "run",
        "-d",
        "--name",
        name,
        "-p",
        &format!("127.0.0.1:{port}:443"),
        "-v",
        &format!("{}:/proxy:ro", dir.display()),
        "--entrypoint",
        "nginx",
        &site.image,
        "-e",
        "stderr",
        "-c",
        "/proxy/nginx.conf",
        "-g",
        "daemon off;",
    ]));
    let origin = format!("https://127.0.0.1:{port}");
    wait_until("the TLS proxy", 30, || {
        curl(&["-kf", "-o", "/dev/null", &format!("{origin}/healthz")])
            .0
            .then_some(())
    });
    origin
}

/// Mixed content, whether or not chromium logs it: no stylesheet, script, image, frame or
/// form of the (https) page is http.
fn assert_no_http_resources(b: &Browser, page: &str) {
    let insecure = b.execute(
        "return Array.from(document.querySelectorAll(
             'link[rel~=stylesheet], link[rel~=preload], script[src], img[src], iframe[src], form[action]'))
           .map(e => e.getAttribute(e.matches('link') ? 'href' : e.matches('form') ? 'action' : 'src'))
           .filter(u => u)
           .map(u => new URL(u, document.baseURI).href)
           .filter(u => u.startsWith('http:'));",
        json!([]),
    );
    assert_eq!(insecure, json!([]), "http resources on the https {page}");
}

/// Through the proxy: the front page and the dashboard load over https, every resource they
/// name is https, and logging in ends on the dashboard (no redirect loop).
fn check_behind_tls_proxy(b: &Browser, origin: &str, admin: &Admin, console: &mut ConsoleCheck) {
    console.origins.push(origin.to_string());
    b.goto(&format!("{origin}/"));
    assert_eq!(
        b.url(),
        format!("{origin}/"),
        "front page through the proxy"
    );
    assert_no_http_resources(b, "front page");
    console.collect(b, "front page (https)");
    b.goto(&format!("{origin}/wp-login.php"));
    log_in(b, origin, admin);
    assert_no_http_resources(b, "dashboard");
    console.collect(b, "dashboard (https)");
}

#[test]
fn wordpress_in_a_browser_installs_uploads_publishes_and_keeps_uploads() {
    require("curl");
    let artifacts = artifacts_dir();
    announce(&format!("artifacts in {}", artifacts.display()));
    // First: a missing chromium fails the test before the build.
    let b = Browser::start(&artifacts);

    let reg = Registry::start();
    let oci = tempfile::tempdir().unwrap();
    let id = unique("browser");
    let built = build_wordpress(&reg, oci.path(), "browser");
    let versions = reported_versions(&built.events);
    announce(&format!("the play reported {versions}"));

    let db = Mariadb::start(&format!("db-{id}-Secret"));
    let port = free_port();
    assert!(port != 80 && port != 8080, "a non-default port");
    let site = Site {
        name: format!("wpimg-browser-{id}"),
        image: built.image.clone(),
        port,
        volume: format!("wpimg-browser-{id}"),
        db: &db,
    };
    // Dropped in reverse order: the container first, then its volume.
    let _volume = VolumeGuard(site.volume.clone());
    let _container = ContainerGuard(site.name.clone());
    site.run();
    let url = site.url();
    let mut console = ConsoleCheck::new(&url);

    let admin = Admin {
        user: "admin",
        password: format!("Wp-{}-b7!Qz", id.replace('-', "")),
    };
    let site_title = "wpimg in a browser";
    install(&b, &url, site_title, &admin);
    console.collect(&b, "install");
    log_in(&b, &url, &admin);
    console.collect(&b, "dashboard");
    b.screenshot(&artifacts.join("dashboard.png"));

    let image = png(IMAGE_SIZE.0, IMAGE_SIZE.1);
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join(format!("wpimg-{id}.png"));
    std::fs::write(&file, &image).unwrap();
    let upload = upload_image(&b, &url, &file);
    console.collect(&b, "media");
    let title = "A post with an uploaded image";
    let post = publish_post(&b, &url, title, &upload);
    console.collect(&b, "editor");
    assert_image_shown(&b, &post, title, &upload, &image);
    console.collect(&b, "post");

    // As a visitor: the front page names the post and the version the play reported.
    log_out(&b, &url);
    console.collect(&b, "log out");
    b.goto(&format!("{url}/"));
    b.wait_for_xpath(&format!("//a[normalize-space()='{title}']"), 30);
    let generator = b.execute(
        "const m = document.querySelector('meta[name=generator]'); return m && m.content;",
        json!([]),
    );
    assert_eq!(
        generator,
        json!(format!(
            "WordPress {}",
            versions["wordpress_version"].as_str().unwrap_or("?")
        )),
        "the version the play reported is the one the site runs"
    );
    console.collect(&b, "front page");
    b.screenshot(&artifacts.join("front-page.png"));
    assert_image_shown(&b, &post, title, &upload, &image);
    console.collect(&b, "post (visitor)");
    b.screenshot(&artifacts.join("post.png"));
    leave(&b);

    // Behind a TLS-terminating proxy: https URLs, no redirect loop, logging in works.
    {
        let proxy_dir = tempfile::tempdir().unwrap();
        let proxy = ContainerGuard(format!("wpimg-browser-tls-{id}"));
        let origin = start_tls_proxy(&site, proxy_dir.path(), &proxy.0);
        check_behind_tls_proxy(&b, &origin, &admin, &mut console);
        b.screenshot(&artifacts.join("dashboard-https.png"));
        leave(&b);
    }

    site.restart();
    assert_image_shown(&b, &post, title, &upload, &image);
    console.collect(&b, "post after a restart");
    leave(&b);
    site.replace();
    assert_image_shown(&b, &post, title, &upload, &image);
    console.collect(&b, "post in a new container");

    for shot in [
        "front-page.png",
        "dashboard.png",
        "post.png",
        "dashboard-https.png",
    ] {
        announce(&format!("screenshot {}", artifacts.join(shot).display()));
    }
    console.assert_clean();
}

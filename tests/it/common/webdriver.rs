//! A small W3C WebDriver client for browser tests: Debian's chromedriver on a free loopback
//! port driving headless chromium with a fresh profile. Synchronous calls over reqwest (already a
//! dependency) on a private current-thread runtime: no WebDriver crate to compile.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use super::registry::free_port;
use super::require;

/// Chromium's binary (Debian's launcher script).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// The W3C name of an element reference in WebDriver JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Deadline of one WebDriver command (page loads have their own 60 s timeout inside it).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// An element found on the current page.
#[derive(Clone, Debug)]
pub struct Element(String);

/// One entry of chromium's browser log (console messages, failed loads, mixed content).
#[derive(Clone, Debug)]
pub struct LogEntry {
    /// SEVERE, WARNING, INFO, DEBUG.
    pub level: String,
    /// `console-api`, `network`, `security`, `javascript`, ...
    pub source: String,
    /// The message as chromium wrote it (usually starts with the URL concerned).
    pub message: String,
}

/// A WebDriver error answer.
#[derive(Debug)]
pub struct WebDriverError {
    /// The W3C error code, e.g. `no such element`.
    pub error: String,
    /// chromedriver's message.
    pub message: String,
}

/// A chromedriver process with one headless chromium session; both end on drop.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    /// chromedriver's URL, then the session's.
    base: String,
    /// chromedriver's log and the failure screenshot.
    log_dir: PathBuf,
    driver: Child,
    profile: tempfile::TempDir,
}

impl Browser {
    /// Start chromedriver (its log in `log_dir`) and a headless chromium session.
    pub fn start(log_dir: &Path) -> Self {
        require("chromium");
        require("chromedriver");
        let port = free_port();
        std::fs::create_dir_all(log_dir).unwrap();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                log_dir.join("chromedriver.log").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start chromedriver: {e}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(COMMAND_TIMEOUT)
            .build()
            .unwrap();
        let profile = tempfile::Builder::new()
            .prefix("wpimg-chromium-")
            .tempdir()
            .unwrap();
        let mut b = Browser {
            rt,
            http,
            base: format!("http://127.0.0.1:{port}"),
            driver,
            log_dir: log_dir.to_path_buf(),
            profile,
        };
        b.wait_until_ready();
        b.new_session();
        b
    }

    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(v) = self.request(reqwest::Method::GET, "/status", None) {
                if v["ready"] == true {
                    return;
                }
            }
            if let Ok(Some(status)) = self.driver.try_wait() {
                panic!("chromedriver exited ({status}) before it was ready");
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn new_session(&mut self) {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", self.profile.path().display()),
            // Nothing but loopback resolves: the same pages on a machine with internet.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let v = self
            .request(reqwest::Method::POST, "/session", Some(caps))
            .unwrap_or_else(|e| panic!("chromium session: {}: {}", e.error, e.message));
        let id = v["sessionId"].as_str().expect("no sessionId").to_string();
        self.base = format!("{}/session/{id}", self.base);
        self.call(
            "POST",
            "/timeouts",
            json!({"implicit": 0, "pageLoad": 60_000, "script": 30_000}),
        );
    }

    /// One WebDriver request to `base + path`; the answer's `value` or its error.
    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WebDriverError> {
        let url = format!("{}{path}", self.base);
        let answer = self.rt.block_on(async {
            let mut req = self.http.request(method, &url);
            if let Some(body) = body {
                req = req.json(&body);
            }
            let resp = req.send().await?;
            resp.json::<Value>().await
        });
        let mut v = answer.map_err(|e| WebDriverError {
            error: "transport".into(),
            message: format!("{url}: {e}"),
        })?;
        let value = v["value"].take();
        match value["error"].as_str() {
            Some(error) => Err(WebDriverError {
                error: error.to_string(),
                message: value["message"].as_str().unwrap_or_default().to_string(),
            }),
            None => Ok(value),
        }
    }

    /// A session command that must succeed.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let body = (m != reqwest::Method::GET).then_some(body);
        self.request(m, path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {}: {}", e.error, e.message))
    }

    /// Navigate to `url` and wait for the page load.
    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url }));
    }

    /// The current page's URL.
    pub fn url(&self) -> String {
        self.call("GET", "/url", Value::Null)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The first element matching a CSS selector, if any.
    pub fn find(&self, css: &str) -> Option<Element> {
        self.find_by("css selector", css)
    }

    /// The first element matching an XPath expression, if any.
    pub fn find_xpath(&self, xpath: &str) -> Option<Element> {
        self.find_by("xpath", xpath)
    }

    fn find_by(&self, using: &str, value: &str) -> Option<Element> {
        let body = json!({ "using": using, "value": value });
        match self.request(reqwest::Method::POST, "/element", Some(body)) {
            Ok(v) => Some(Element(v[ELEMENT_KEY].as_str()?.to_string())),
            Err(e) if e.error == "no such element" => None,
            Err(e) => panic!("find {value}: {}: {}", e.error, e.message),
        }
    }

    /// Wait up to `secs` for an element matching a CSS selector.
    pub fn wait_for(&self, css: &str, secs: u64) -> Element {
        wait_until(&format!("element {css}"), secs, || self.find(css))
    }

    /// Wait up to `secs` for an element matching an XPath expression.
    pub fn wait_for_xpath(&self, xpath: &str, secs: u64) -> Element {
        wait_until(&format!("element {xpath}"), secs, || self.find_xpath(xpath))
    }

    /// Click an element (scrolled into view by chromedriver).
    pub fn click(&self, e: &Element) {
        self.call("POST", &format!("/element/{}/click", e.0), json!({}));
    }

    /// Empty an input or textarea.
    pub fn clear(&self, e: &Element) {
        self.call("POST", &format!("/element/{}/clear", e.0), json!({}));
    }

    /// Type text into an element (a file path into a file input selects that file).
    pub fn type_text(&self, e: &Element, text: &str) {
        self.call(
            "POST",
            &format!("/element/{}/value", e.0),
            json!({ "text": text }),
        );
    }

    /// Clear a field and type `text` into it.
    pub fn fill(&self, css: &str, text: &str) {
        let e = self.wait_for(css, 30);
        self.clear(&e);
        self.type_text(&e, text);
    }

    /// Fill several fields, then check that each holds its text, and start over (up to three
    /// times) when not: a page script that moves the focus while keys are typed (wp-login.php
    /// focuses its user field 200 ms after loading) sends them to another field.
    pub fn fill_form(&self, fields: &[(&str, &str)]) {
        for attempt in 1..=3 {
            for (css, text) in fields {
                self.fill(css, text);
            }
            let wrong: Vec<&str> = fields
                .iter()
                .filter(|(css, text)| {
                    let e = self.wait_for(css, 10);
                    self.property(&e, "value").as_str() != Some(*text)
                })
                .map(|(css, _)| *css)
                .collect();
            if wrong.is_empty() {
                return;
            }
            assert!(attempt < 3, "fields {wrong:?} do not hold what was typed");
        }
    }

    /// A DOM property of an element (e.g. an input's current `value`).
    pub fn property(&self, e: &Element, name: &str) -> Value {
        self.call(
            "GET",
            &format!("/element/{}/property/{name}", e.0),
            Value::Null,
        )
    }

    /// An attribute of an element.
    pub fn attribute(&self, e: &Element, name: &str) -> Option<String> {
        self.call(
            "GET",
            &format!("/element/{}/attribute/{name}", e.0),
            Value::Null,
        )
        .as_str()
        .map(str::to_string)
    }

    /// Run a script in the page (`arguments[i]` are `args`) and return its result.
    pub fn execute(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({ "script": script, "args": args }),
        )
    }

    /// Save a PNG screenshot of the viewport.
    pub fn screenshot(&self, path: &Path) -> PathBuf {
        let b64 = self.call("GET", "/screenshot", Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("screenshot is not base64");
        std::fs::write(path, png).unwrap();
        path.to_path_buf()
    }

    /// After a failure: a screenshot of the page in `failure.png` next to chromedriver's log,
    /// and its URL on stderr.
    fn save_failure(&self) {
        let path = self.log_dir.join("failure.png");
        let url = self.request(reqwest::Method::GET, "/url", None);
        let shot = self.request(reqwest::Method::GET, "/screenshot", None);
        if let Ok(png) = shot.map(|v| {
            base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default())
        }) {
            let _ = png.map(|png| std::fs::write(&path, png));
        }
        let _ = writeln!(
            std::io::stderr(),
            "browser at the failure: {} (screenshot {})",
            url.map(|u| u.to_string()).unwrap_or_default(),
            path.display()
        );
    }

    /// The browser log entries since the last call (chromedriver's log endpoint).
    pub fn take_log(&self) -> Vec<LogEntry> {
        let v = self.call("POST", "/se/log", json!({ "type": "browser" }));
        v.as_array()
            .into_iter()
            .flatten()
            .map(|e| LogEntry {
                level: e["level"].as_str().unwrap_or_default().to_string(),
                source: e["source"].as_str().unwrap_or_default().to_string(),
                message: e["message"].as_str().unwrap_or_default().to_string(),
            })
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.save_failure();
        }
        // Ends chromium; then chromedriver.
        let _ = self.request(reqwest::Method::DELETE, "", None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Poll `probe` every 250 ms until it gives a value; fail the test after `secs`.
pub fn wait_until<T>(what: &str, secs: u64, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not there after {secs} s"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

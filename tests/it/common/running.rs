//! A `wpimg ... --json` run watched event by event: tests act (send a signal, read
//! `/proc`) when a given event shows up, then collect the exit status and every line.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running wpimg with `--json` output.
pub struct Running {
    child: Child,
    events: Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
    stderr: Option<JoinHandle<String>>,
}

impl Running {
    /// Start `cmd` (which must print JSON lines on stdout).
    pub fn start(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "event": "not-json", "line": line }));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Self {
            child,
            events,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait (at most `limit`) for an event matching `want`; `None` when the run ended or the
    /// time ran out first.
    pub fn wait_for(
        &mut self,
        limit: Duration,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let e = self.events.recv_timeout(left).ok()?;
            self.seen.push(e.clone());
            if want(&e) {
                return Some(e);
            }
        }
    }

    /// Wait for `stage_start` of `stage`.
    pub fn wait_for_stage(&mut self, stage: &str, limit: Duration) -> Option<serde_json::Value> {
        self.wait_for(limit, |e| {
            e["event"] == "stage_start" && e["stage"] == stage
        })
    }

    /// Send a signal to wpimg.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Wait for the end: exit status, every event, stderr.
    pub fn finish(mut self) -> (ExitStatus, Vec<serde_json::Value>, String) {
        let status = self.child.wait().unwrap();
        while let Ok(e) = self.events.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(e);
        }
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        (status, std::mem::take(&mut self.seen), stderr)
    }

    /// Every event seen so far.
    pub fn seen(&self) -> &[serde_json::Value] {
        &self.seen
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Signal names for messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        _ => "signal",
    }
}

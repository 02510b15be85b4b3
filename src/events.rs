//! Progress events: library code reports through a [`Reporter`], only the CLI prints.

use std::sync::Arc;

use serde::Serialize;

/// What happened to one blob during a push or pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobOutcome {
    /// The destination already had it (HEAD answered 200), or the layout already had it (pull).
    Skipped,
    /// Cross-repository mount succeeded.
    Mounted,
    /// Uploaded (push) or downloaded (pull).
    Uploaded,
    /// Downloaded into the layout (pull).
    Downloaded,
}

/// One progress event. Serialized as JSON lines for `--json` (`{"event":"stage_start",...}`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A stage begins.
    StageStart {
        /// Stage name (`resolve`, `pull`, `load`, `provision`, `layer`, `assemble`, `push`, ...).
        stage: String,
    },
    /// A stage ends.
    StageFinish {
        /// Stage name.
        stage: String,
        /// Wall time in seconds.
        seconds: f64,
    },
    /// A blob transfer begins.
    BlobStart {
        /// Blob digest.
        digest: String,
        /// Blob size.
        size: u64,
        /// `push` or `pull`.
        direction: String,
    },
    /// Bytes transferred so far for a blob (sent at most a few times a second; not in --json).
    #[serde(skip)]
    BlobProgress {
        /// Blob digest.
        digest: String,
        /// Bytes done.
        done: u64,
    },
    /// A blob transfer ends.
    BlobDone {
        /// Blob digest.
        digest: String,
        /// Blob size.
        size: u64,
        /// What happened.
        outcome: BlobOutcome,
    },
    /// A line of output from a child process (ansible-playbook).
    Output {
        /// Which process (`ansible`).
        source: String,
        /// The line, without newline.
        line: String,
    },
    /// A human-oriented note (e.g. "retrying after 503").
    Note {
        /// The message.
        message: String,
    },
    /// A warning.
    Warning {
        /// The message.
        message: String,
    },
    /// Something a dead build left behind was removed (at the start of a build, or by
    /// `wpimg prune`).
    Removed {
        /// `container`, `image`, `process`, `temp-file` or `temp-dir`.
        kind: String,
        /// Its name.
        name: String,
        /// Why it was left over.
        reason: String,
    },
}

/// Receives events. Implementations must be cheap and never block for long.
pub trait Reporter: Send + Sync {
    /// Handle one event.
    fn event(&self, e: Event);
}

/// Shared reporter handle.
pub type SharedReporter = Arc<dyn Reporter>;

/// A reporter that drops everything.
pub struct NullReporter;

impl Reporter for NullReporter {
    fn event(&self, _e: Event) {}
}

/// A null reporter handle.
pub fn null() -> SharedReporter {
    Arc::new(NullReporter)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `--json` event shapes are a contract for CI consumers: snapshot them.
    #[test]
    fn json_event_shapes() {
        let cases = [
            (
                Event::StageStart {
                    stage: "pull".into(),
                },
                r#"{"event":"stage_start","stage":"pull"}"#,
            ),
            (
                Event::StageFinish {
                    stage: "pull".into(),
                    seconds: 1.5,
                },
                r#"{"event":"stage_finish","stage":"pull","seconds":1.5}"#,
            ),
            (
                Event::BlobStart {
                    digest: "sha256:ab".into(),
                    size: 3,
                    direction: "push".into(),
                },
                r#"{"event":"blob_start","digest":"sha256:ab","size":3,"direction":"push"}"#,
            ),
            (
                Event::BlobDone {
                    digest: "sha256:ab".into(),
                    size: 3,
                    outcome: BlobOutcome::Mounted,
                },
                r#"{"event":"blob_done","digest":"sha256:ab","size":3,"outcome":"mounted"}"#,
            ),
            (
                Event::Output {
                    source: "ansible".into(),
                    line: "ok".into(),
                },
                r#"{"event":"output","source":"ansible","line":"ok"}"#,
            ),
            (
                Event::Warning {
                    message: "w".into(),
                },
                r#"{"event":"warning","message":"w"}"#,
            ),
            (
                Event::Removed {
                    kind: "container".into(),
                    name: "c".into(),
                    reason: "r".into(),
                },
                r#"{"event":"removed","kind":"container","name":"c","reason":"r"}"#,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(serde_json::to_string(&e).unwrap(), want);
        }
    }
}

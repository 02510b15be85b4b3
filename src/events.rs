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
    /// A provisioning step begins.
    StepStart {
        /// The step's name.
        step: String,
    },
    /// A step's cache key matched no entry: which inputs differ from the newest entry of the
    /// same step (file paths, variable and environment names; never values).
    CacheMiss {
        /// The step's name.
        step: String,
        /// Why (`file changed: roles/app/templates/x.j2`, `variable changed: db_name`, ...).
        reasons: Vec<String>,
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
    /// An event of one platform's part of a multi-platform build (in `--json`: the event with a
    /// `platform` field).
    #[serde(skip)]
    Platform {
        /// `os/arch[/variant]`.
        platform: String,
        /// The event.
        event: Box<Event>,
    },
}

impl Event {
    /// The event as a `--json` line: its fields, with `platform` for a platform's event;
    /// `None` for events that are not printed as JSON (progress).
    pub fn to_json(&self) -> Option<serde_json::Value> {
        match self {
            Event::BlobProgress { .. } => None,
            Event::Platform { platform, event } => {
                let mut v = event.to_json()?;
                if let Some(m) = v.as_object_mut() {
                    m.insert("platform".into(), platform.clone().into());
                }
                Some(v)
            }
            other => serde_json::to_value(other).ok(),
        }
    }
}

/// Passes every event on as an [`Event::Platform`] of `platform`.
pub struct PlatformReporter {
    inner: SharedReporter,
    platform: String,
}

impl PlatformReporter {
    /// A reporter for `platform`'s part of a build.
    pub fn shared(inner: SharedReporter, platform: String) -> SharedReporter {
        Arc::new(Self { inner, platform })
    }
}

impl Reporter for PlatformReporter {
    fn event(&self, e: Event) {
        self.inner.event(Event::Platform {
            platform: self.platform.clone(),
            event: Box::new(e),
        });
    }
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

/// Passes everything but blob transfers on (small attachments would only add noise).
pub struct WithoutBlobs(pub SharedReporter);

impl Reporter for WithoutBlobs {
    fn event(&self, e: Event) {
        if !matches!(
            e,
            Event::BlobStart { .. } | Event::BlobProgress { .. } | Event::BlobDone { .. }
        ) {
            self.0.event(e);
        }
    }
}

/// `reporter` without blob transfer events.
pub fn without_blobs(reporter: &SharedReporter) -> SharedReporter {
    Arc::new(WithoutBlobs(reporter.clone()))
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
                Event::StepStart { step: "os".into() },
                r#"{"event":"step_start","step":"os"}"#,
            ),
            (
                Event::CacheMiss {
                    step: "app".into(),
                    reasons: vec!["file changed: roles/app/templates/x.j2".into()],
                },
                r#"{"event":"cache_miss","step":"app","reasons":["file changed: roles/app/templates/x.j2"]}"#,
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

    #[test]
    fn platform_events_carry_their_platform() {
        let e = Event::Platform {
            platform: "linux/arm64".into(),
            event: Box::new(Event::StageStart {
                stage: "provision".into(),
            }),
        };
        assert_eq!(
            e.to_json().unwrap().to_string(),
            r#"{"event":"stage_start","stage":"provision","platform":"linux/arm64"}"#
        );
        let progress = Event::BlobProgress {
            digest: "d".into(),
            done: 1,
        };
        assert!(progress.to_json().is_none());
    }
}

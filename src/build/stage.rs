//! Stage timers: a stage starts when its [`StageTimer`] is made and ends when it is finished;
//! an unfinished timer (the stage failed or was interrupted) records nothing.

use std::sync::Mutex;
use std::time::Instant;

use super::report::StageTime;
use crate::events::{Event, SharedReporter};

/// The stages of one build, in the order they finished.
pub struct Stages {
    reporter: SharedReporter,
    times: Mutex<Vec<StageTime>>,
}

impl Stages {
    /// Stages reported through `reporter`.
    pub fn new(reporter: SharedReporter) -> Self {
        Self {
            reporter,
            times: Mutex::new(Vec::new()),
        }
    }

    /// Start a stage (`stage_start`).
    pub fn start(&self, stage: &str) -> StageTimer<'_> {
        self.reporter.event(Event::StageStart {
            stage: stage.to_string(),
        });
        StageTimer {
            stages: self,
            stage: stage.to_string(),
            started: Instant::now(),
        }
    }

    /// The finished stages so far.
    pub fn times(&self) -> Vec<StageTime> {
        self.times.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// A running stage; [`StageTimer::finish`] records its wall time (`stage_finish`).
#[must_use = "a stage is only recorded when it is finished"]
pub struct StageTimer<'a> {
    stages: &'a Stages,
    stage: String,
    started: Instant,
}

impl StageTimer<'_> {
    /// End the stage.
    pub fn finish(self) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.stages.reporter.event(Event::StageFinish {
            stage: self.stage.clone(),
            seconds,
        });
        if let Ok(mut t) = self.stages.times.lock() {
            t.push(StageTime {
                stage: self.stage,
                seconds,
            });
        }
    }
}

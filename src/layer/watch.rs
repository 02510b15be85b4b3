//! What the tar writer checks as each entry goes by: cancellation, and build secrets (the leak
//! scan of names, link targets, xattrs and contents, before a byte of them is written).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::canon::{Entry, Kind};
use super::{LayerError, LayerOptions};
use crate::secrets::{Form, Hit, LeakFound, LeakScanner, StreamScan};

/// The checks of one layer.
pub(crate) struct Watch {
    cancel: Option<CancellationToken>,
    scanner: Option<Arc<LeakScanner>>,
    stream: Option<StreamScan>,
}

impl Watch {
    /// The checks `opts` asks for.
    pub(crate) fn new(opts: &LayerOptions) -> Self {
        Self {
            cancel: opts.cancel.clone(),
            stream: opts.leak_scan.as_ref().map(|s| s.stream()),
            scanner: opts.leak_scan.clone(),
        }
    }

    /// No checks.
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        Self {
            cancel: None,
            scanner: None,
            stream: None,
        }
    }

    /// Check an entry's header: its name, link target and xattrs.
    pub(crate) fn entry(&mut self, e: &Entry) -> Result<(), LayerError> {
        self.check_cancel()?;
        if let Some(s) = &mut self.stream {
            s.reset();
        }
        let Some(scanner) = &self.scanner else {
            return Ok(());
        };
        if let Some(hit) = scanner.find(&e.path) {
            return Err(leak(hit, e, " (file name)".into()));
        }
        if let Some(hit) = scanner.find(&e.link) {
            let what = match e.kind {
                Kind::Hardlink => " (hard link target)",
                _ => " (symlink target)",
            };
            return Err(leak(hit, e, what.into()));
        }
        for (name, value) in &e.xattrs {
            if let Some(hit) = scanner.find(name).or_else(|| scanner.find(value)) {
                let what = format!(" (xattr {})", String::from_utf8_lossy(name));
                return Err(leak(hit, e, what));
            }
        }
        Ok(())
    }

    /// Check the next piece of an entry's content.
    pub(crate) fn data(&mut self, e: &Entry, piece: &[u8]) -> Result<(), LayerError> {
        self.check_cancel()?;
        match self.stream.as_mut().and_then(|s| s.feed(piece)) {
            Some(hit) => Err(leak(hit, e, String::new())),
            None => Ok(()),
        }
    }

    fn check_cancel(&self) -> Result<(), LayerError> {
        match &self.cancel {
            Some(c) if c.is_cancelled() => Err(LayerError::Interrupted),
            _ => Ok(()),
        }
    }
}

fn leak(hit: Hit<'_>, e: &Entry, what: String) -> LayerError {
    let encoded = match hit.form {
        Form::Base64 => " (base64)",
        Form::Plain => "",
    };
    LayerError::Leak(LeakFound {
        secret: hit.secret.to_string(),
        location: format!("/{}{what}{encoded}", String::from_utf8_lossy(&e.path)),
    })
}

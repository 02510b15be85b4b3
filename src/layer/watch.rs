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

#[cfg(test)]
mod tests {
    use crate::layer::{layer_from_tar, LayerError, LayerOptions};
    use crate::layout::Layout;
    use crate::secrets::{LeakScanner, SecretValue, Secrets};

    const VALUE: &str = "hunter2-correct-horse";

    fn tar_with(path: &str, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, path, data).unwrap();
        b.into_inner().unwrap()
    }

    fn options() -> LayerOptions {
        let mut s = Secrets::default();
        s.insert("api_token", SecretValue::new(VALUE.into()));
        LayerOptions {
            leak_scan: LeakScanner::new(&s),
            threads: 1,
            ..Default::default()
        }
    }

    #[test]
    fn a_value_across_the_writers_buffer_fails_the_layer_and_leaves_no_blob() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::open_or_create(d.path()).unwrap();
        // The writer reads 256 KiB at a time: put the value across that boundary.
        let mut data = vec![b'x'; 256 * 1024 - 7];
        data.extend_from_slice(VALUE.as_bytes());
        data.extend_from_slice(&[b'y'; 1000]);
        let e =
            layer_from_tar(&tar_with("etc/app.conf", &data)[..], &layout, &options()).unwrap_err();
        match e {
            LayerError::Leak(l) => {
                assert_eq!(l.to_string(), "secret \"api_token\" found in /etc/app.conf")
            }
            other => panic!("{other}"),
        }
        let left: Vec<_> = std::fs::read_dir(d.path().join("ingest"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "temp blob left: {left:?}");
        let blobs = std::fs::read_dir(d.path().join("blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(blobs, 0);
    }

    #[test]
    fn a_clean_layer_passes_and_a_cancelled_one_stops() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::open_or_create(d.path()).unwrap();
        let tar = tar_with("etc/app.conf", b"nothing to see\n");
        layer_from_tar(&tar[..], &layout, &options()).unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        cancel.cancel();
        let opts = LayerOptions {
            cancel: Some(cancel),
            ..options()
        };
        assert!(matches!(
            layer_from_tar(&tar[..], &layout, &opts),
            Err(LayerError::Interrupted)
        ));
    }
}

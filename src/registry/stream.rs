//! Uploading a blob while it is still being produced (a new layer during compression), so that
//! compression, hashing and upload overlap: chunked PATCHes of `chunk_size` as the bytes come,
//! the last part and the digest in the final PUT (the digest is only known at the end).
//!
//! Best effort: on any failure the session is dropped and the blob stays in the layout for the
//! normal push, which then uploads it.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::client::{expect_status, Client, Repo, Retry};
use super::error::RegistryError;
use super::push::check_digest_header;
use crate::events::{Event, SharedReporter};
use crate::oci::Digest;
use crate::reference::Reference;

/// The synchronous end of a streaming upload: bytes written here are uploaded in parts.
/// It never fails: once the upload has given up, further bytes are dropped.
pub struct StreamWriter {
    tx: Option<mpsc::Sender<Bytes>>,
    buf: Vec<u8>,
    chunk: usize,
    residual: Arc<Mutex<Option<Bytes>>>,
}

impl Write for StreamWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.tx.is_none() {
            return Ok(data.len());
        }
        self.buf.extend_from_slice(data);
        while self.buf.len() >= self.chunk {
            let rest = self.buf.split_off(self.chunk);
            let part = Bytes::from(std::mem::replace(&mut self.buf, rest));
            // Blocks while the uploader is a part behind: memory stays at a few parts.
            let sent = self.tx.as_ref().map(|tx| tx.blocking_send(part).is_ok());
            if sent != Some(true) {
                self.tx = None;
                self.buf = Vec::new();
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            // The residual must be in place before the channel closes: closing is the signal.
            let rest = Bytes::from(std::mem::take(&mut self.buf));
            *self.residual.lock().unwrap_or_else(|p| p.into_inner()) = Some(rest);
            drop(tx);
        }
    }
}

/// The asynchronous end of a streaming upload.
pub struct BlobStream {
    finish: oneshot::Sender<(Digest, u64)>,
    task: JoinHandle<Result<(), RegistryError>>,
}

impl BlobStream {
    /// Complete the upload as blob `digest` of `size` bytes, once the writer is dropped.
    pub async fn finish(self, digest: &Digest, size: u64) -> Result<(), RegistryError> {
        let _ = self.finish.send((digest.clone(), size));
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(RegistryError::Protocol {
                repository: String::new(),
                operation: format!("streaming upload of {digest}"),
                message: e.to_string(),
            }),
        }
    }

    /// Give the upload up (the registry discards the session).
    pub fn abort(self) {
        drop(self.finish);
    }

    /// Give the upload up and wait (at most `deadline`) until the registry was told to discard
    /// the session; the writer must be dropped already.
    pub async fn discard(self, deadline: std::time::Duration) {
        drop(self.finish);
        let _ = tokio::time::timeout(deadline, self.task).await;
    }
}

impl Client {
    /// Start uploading a blob of not yet known digest to `dest`'s repository.
    pub fn stream_blob(
        self: &Arc<Self>,
        dest: &Reference,
        reporter: &SharedReporter,
    ) -> (StreamWriter, BlobStream) {
        let chunk = usize::try_from(self.opts.chunk_size).unwrap_or(usize::MAX);
        let (tx, rx) = mpsc::channel(1);
        let (finish, fin_rx) = oneshot::channel();
        let residual = Arc::new(Mutex::new(None));
        let writer = StreamWriter {
            tx: Some(tx),
            buf: Vec::with_capacity(chunk),
            chunk,
            residual: residual.clone(),
        };
        let client = self.clone();
        let dest = dest.clone();
        let rep = reporter.clone();
        let task = tokio::spawn(async move {
            let repo = client.repo(&dest.registry, &dest.repository).await?;
            let r = client.run_stream(&repo, rx, residual, fin_rx, &rep).await;
            if let Err(e) = &r {
                rep.event(Event::Note {
                    message: format!("streaming upload to {} given up: {e}", repo.name),
                });
            }
            r
        });
        (writer, BlobStream { finish, task })
    }

    async fn run_stream(
        &self,
        repo: &Repo,
        mut rx: mpsc::Receiver<Bytes>,
        residual: Arc<Mutex<Option<Bytes>>>,
        fin: oneshot::Receiver<(Digest, u64)>,
        reporter: &SharedReporter,
    ) -> Result<(), RegistryError> {
        let scopes = [repo.push_scope()];
        let mut session = self
            .start_upload(
                repo,
                &scopes,
                "a streamed layer",
                Retry::Temporary,
                reporter,
            )
            .await?;
        let mut offset = 0u64;
        let mut pending: Option<Bytes> = None;
        while let Some(part) = rx.recv().await {
            if let Some(p) = pending.replace(part) {
                session = self
                    .patch_part(repo, &scopes, &session, offset, p.clone(), reporter)
                    .await?;
                offset += p.len() as u64;
            }
        }
        let rest = residual
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        let last = match (pending, rest.is_empty()) {
            (Some(p), true) => p,
            (Some(p), false) => {
                session = self
                    .patch_part(repo, &scopes, &session, offset, p.clone(), reporter)
                    .await?;
                offset += p.len() as u64;
                rest
            }
            (None, _) => rest,
        };
        let cancel = |session: url::Url| async move {
            self.discard_upload(repo, session).await;
        };
        let Ok((digest, size)) = fin.await else {
            cancel(session).await;
            return Ok(());
        };
        let total = offset + last.len() as u64;
        if total != size {
            cancel(session).await;
            return Err(repo.protocol(
                &format!("streaming upload of {digest}"),
                format!("streamed {total} bytes, the blob has {size}"),
            ));
        }
        let op = format!("finish streaming upload of blob {digest}");
        let mut u = session.clone();
        u.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let len = last.len() as u64;
        let resp = self
            .send(repo, &scopes, &op, Retry::Temporary, reporter, |c| {
                let mut rb = c
                    .put(u.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, len)
                    .body(last.clone());
                if len > 0 {
                    rb = rb.header(CONTENT_RANGE, format!("{offset}-{}", total - 1));
                }
                Ok(rb)
            })
            .await?;
        let resp = expect_status(resp, &[201, 204], &repo.name, &op).await?;
        check_digest_header(repo, &resp, "blob", &digest)?;
        self.mark_streamed(&digest);
        Ok(())
    }

    /// Tell the registry to drop an upload session (best effort, without credentials, within
    /// the idle timeout and the URL rules).
    pub(super) async fn discard_upload(&self, repo: &Repo, session: url::Url) {
        let op = "discard a streamed upload";
        if self.credentials_go_to(repo, &session, op).is_err() {
            return;
        }
        if let Ok(req) = self.http.delete(session).build() {
            let _ = self.execute(req, &repo.name, op).await;
        }
    }

    async fn patch_part(
        &self,
        repo: &Repo,
        scopes: &[String],
        session: &url::Url,
        offset: u64,
        part: Bytes,
        reporter: &SharedReporter,
    ) -> Result<url::Url, RegistryError> {
        let end = offset + part.len() as u64 - 1;
        let op = format!("streaming upload bytes {offset}-{end}");
        let resp = self
            .send(repo, scopes, &op, Retry::Never, reporter, |c| {
                Ok(c.patch(session.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, part.len())
                    .header(CONTENT_RANGE, format!("{offset}-{end}"))
                    .body(part.clone()))
            })
            .await?;
        let resp = expect_status(resp, &[201, 202, 204], &repo.name, &op).await?;
        match resp.headers().get(LOCATION) {
            Some(l) => repo.resolve_location(&op, Some(l)),
            None => Ok(session.clone()),
        }
    }
}

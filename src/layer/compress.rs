//! Compression into a layout blob, with diff_id and digest computed in one pass.
//!
//! gzip is compressed pigz-style: the input is cut into fixed [`GZ_BLOCK`]-sized blocks, each
//! compressed independently as raw deflate ending in a sync flush (the last one with a final
//! block), concatenated behind one fixed gzip header, with the CRC32 combined from the blocks.
//! Block boundaries never depend on the thread count, so neither does the output.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, Crc, FlushCompress, Status};

use super::{Compression, LayerError, LayerInfo, LayerOptions};
use crate::layout::{BlobWriter, Layout};
use crate::oci::HashingWriter;

/// Uncompressed bytes per independently compressed gzip block.
pub(crate) const GZ_BLOCK: usize = 1 << 20;

/// gzip header: no name, mtime 0, no extra flags, OS 255 (unknown).
const GZ_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// Where the canonical tar goes: hashed (diff_id), compressed, hashed again (digest), stored.
pub(crate) struct LayerSink {
    w: HashingWriter<Encoder>,
    media_type: &'static str,
    dir: std::path::PathBuf,
}

enum Encoder {
    Gzip(ParGz<Out>),
    Zstd(zstd::stream::write::Encoder<'static, Out>),
    /// Uncompressed, into a spool file.
    Plain(io::BufWriter<std::fs::File>),
}

/// Where a canonical tar goes: compressed into a layout blob, or uncompressed into a spool
/// file (compressed later with [`super::compress_spool`]).
pub(crate) enum Dest<'a> {
    /// A compressed blob of `layout`.
    Blob {
        /// The layout.
        layout: &'a Layout,
        /// Compression and tee.
        opts: &'a LayerOptions,
    },
    /// An uncompressed tar file (created or truncated).
    Spool(&'a std::path::Path),
}

impl Dest<'_> {
    /// A new sink (a restart truncates a spool and abandons a blob).
    pub(crate) fn sink(&self) -> Result<LayerSink, LayerError> {
        match self {
            Dest::Blob { layout, opts } => LayerSink::new(layout, opts),
            Dest::Spool(path) => {
                let werr = |source| LayerError::Write {
                    dir: path.to_path_buf(),
                    source,
                };
                let f = std::fs::File::create(path).map_err(werr)?;
                Ok(LayerSink {
                    w: HashingWriter::new(Encoder::Plain(io::BufWriter::with_capacity(1 << 20, f))),
                    media_type: crate::oci::MEDIA_TYPE_OCI_LAYER_TAR,
                    dir: path.to_path_buf(),
                })
            }
        }
    }
}

/// The compressed bytes' destinations: the layout blob and, optionally, a tee.
struct Out {
    blob: BlobWriter,
    tee: Option<Box<dyn Write + Send>>,
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.blob.write(buf)?;
        if let Some(t) = &mut self.tee {
            if t.write_all(&buf[..n]).is_err() {
                self.tee = None;
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.blob.flush()
    }
}

impl Write for Encoder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(g) => g.write(buf),
            Encoder::Zstd(z) => z.write(buf),
            Encoder::Plain(p) => p.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(g) => g.flush(),
            Encoder::Zstd(z) => z.flush(),
            Encoder::Plain(p) => p.flush(),
        }
    }
}

impl LayerSink {
    /// Start a blob in `layout`.
    pub(crate) fn new(layout: &Layout, opts: &LayerOptions) -> Result<Self, LayerError> {
        let level = opts.compression.check_level(opts.level)?;
        let dir = layout.dir().to_path_buf();
        let blob = Out {
            blob: layout.blob_writer()?,
            tee: opts.tee.take(),
        };
        let werr = |source| LayerError::Write {
            dir: dir.clone(),
            source,
        };
        let enc = match opts.compression {
            Compression::Gzip => {
                Encoder::Gzip(ParGz::new(blob, level as u32, opts.threads).map_err(werr)?)
            }
            Compression::Zstd => {
                Encoder::Zstd(zstd_encoder(blob, level, opts.threads).map_err(werr)?)
            }
        };
        Ok(Self {
            w: HashingWriter::new(enc),
            media_type: opts.compression.media_type(),
            dir,
        })
    }

    /// The writer for the uncompressed tar.
    pub(crate) fn writer(&mut self) -> &mut HashingWriter<impl Write> {
        &mut self.w
    }

    /// Finish compression and commit the blob.
    pub(crate) fn finish(self, entries: u64) -> Result<LayerInfo, LayerError> {
        let dir = self.dir;
        let (enc, diff_id, uncompressed_size) = self.w.finish();
        let werr = |source| LayerError::Write {
            dir: dir.clone(),
            source,
        };
        let out = match enc {
            Encoder::Gzip(g) => g.finish(),
            Encoder::Zstd(z) => z.finish(),
            Encoder::Plain(mut p) => {
                p.flush().map_err(werr)?;
                p.get_ref().sync_data().map_err(werr)?;
                return Ok(LayerInfo {
                    digest: diff_id.clone(),
                    diff_id,
                    size: uncompressed_size,
                    uncompressed_size,
                    media_type: self.media_type,
                    entries,
                });
            }
        };
        let Out { blob, tee } = out.map_err(werr)?;
        drop(tee);
        let (digest, size) = blob.commit(None, None)?;
        Ok(LayerInfo {
            digest,
            diff_id,
            size,
            uncompressed_size,
            media_type: self.media_type,
            entries,
        })
    }
}

/// A multi-threaded zstd encoder; its output does not depend on the worker count (>= 1).
pub(crate) fn zstd_encoder<W: Write>(
    w: W,
    level: i32,
    threads: usize,
) -> io::Result<zstd::stream::write::Encoder<'static, W>> {
    let mut z = zstd::stream::write::Encoder::new(w, level)?;
    // Always multi-threaded mode: single-threaded mode (0 workers) writes different frames.
    z.multithread(threads.max(1) as u32)?;
    z.include_checksum(true)?;
    Ok(z)
}

struct Done {
    out: Vec<u8>,
    crc: Crc,
}

struct Job {
    data: Vec<u8>,
    last: bool,
    reply: SyncSender<io::Result<Done>>,
}

struct Pool {
    tx: Option<Sender<Job>>,
    handles: Vec<JoinHandle<()>>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx.take();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Parallel, thread-count-independent gzip writer.
pub(crate) struct ParGz<W: Write> {
    inner: W,
    level: u32,
    buf: Vec<u8>,
    crc: Crc,
    pool: Option<Pool>,
    pending: VecDeque<Receiver<io::Result<Done>>>,
    max_pending: usize,
}

impl<W: Write> ParGz<W> {
    /// Start a gzip stream on `inner` using `threads` compression threads (1 = inline).
    pub(crate) fn new(mut inner: W, level: u32, threads: usize) -> io::Result<Self> {
        inner.write_all(&GZ_HEADER)?;
        let pool = (threads > 1).then(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            let rx = Arc::new(Mutex::new(rx));
            let handles = (0..threads)
                .map(|_| {
                    let rx = Arc::clone(&rx);
                    std::thread::spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(g) => g.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let _ = job.reply.send(deflate_block(&job.data, level, job.last));
                    })
                })
                .collect();
            Pool {
                tx: Some(tx),
                handles,
            }
        });
        Ok(Self {
            inner,
            level,
            buf: Vec::with_capacity(GZ_BLOCK),
            crc: Crc::new(),
            pool,
            pending: VecDeque::new(),
            max_pending: threads.max(1) * 2,
        })
    }

    fn submit(&mut self, last: bool) -> io::Result<()> {
        let data = std::mem::replace(
            &mut self.buf,
            if last {
                Vec::new()
            } else {
                Vec::with_capacity(GZ_BLOCK)
            },
        );
        match self.pool.as_ref().and_then(|p| p.tx.as_ref()) {
            Some(tx) => {
                let (reply, rx) = mpsc::sync_channel(1);
                tx.send(Job { data, last, reply })
                    .map_err(|_| io::Error::other("gzip worker pool stopped"))?;
                self.pending.push_back(rx);
                while self.pending.len() > self.max_pending {
                    self.drain_one()?;
                }
            }
            None => {
                let done = deflate_block(&data, self.level, last)?;
                self.write_done(done)?;
            }
        }
        Ok(())
    }

    fn drain_one(&mut self) -> io::Result<()> {
        if let Some(rx) = self.pending.pop_front() {
            let done = rx
                .recv()
                .map_err(|_| io::Error::other("gzip worker thread died"))??;
            self.write_done(done)?;
        }
        Ok(())
    }

    fn write_done(&mut self, done: Done) -> io::Result<()> {
        self.inner.write_all(&done.out)?;
        self.crc.combine(&done.crc);
        Ok(())
    }

    /// Compress the rest, write the trailer and return the inner writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.submit(true)?;
        while !self.pending.is_empty() {
            self.drain_one()?;
        }
        self.pool.take();
        let mut trailer = [0u8; 8];
        trailer[..4].copy_from_slice(&self.crc.sum().to_le_bytes());
        trailer[4..].copy_from_slice(&self.crc.amount().to_le_bytes());
        self.inner.write_all(&trailer)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for ParGz<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(GZ_BLOCK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == GZ_BLOCK {
            self.submit(false)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Raw deflate of one block: a sync flush at the end, or a final block when `last`.
fn deflate_block(data: &[u8], level: u32, last: bool) -> io::Result<Done> {
    let mut c = Compress::new(flate2::Compression::new(level), false);
    // Room for incompressible data in one call, so the call sequence never depends on output.
    let mut out = Vec::with_capacity(data.len() + data.len() / 16 + 4096);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        let consumed = c.total_in() as usize;
        let status = c
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let all_in = c.total_in() as usize == data.len();
        let done = match status {
            Status::StreamEnd => true,
            Status::BufError => all_in,
            Status::Ok => !last && all_in && out.len() < out.capacity(),
        };
        if done {
            break;
        }
        out.reserve(64 * 1024);
    }
    let mut crc = Crc::new();
    crc.update(data);
    Ok(Done { out, crc })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(n: usize) -> Vec<u8> {
        // Deterministic, moderately compressible bytes.
        let mut x: u32 = 12345;
        (0..n)
            .map(|i| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if i % 7 < 4 {
                    b"the quick brown fox "[i % 20]
                } else {
                    (x >> 24) as u8
                }
            })
            .collect()
    }

    fn gz(data: &[u8], level: u32, threads: usize, chunk: usize) -> Vec<u8> {
        let mut g = ParGz::new(Vec::new(), level, threads).unwrap();
        for c in data.chunks(chunk.max(1)) {
            g.write_all(c).unwrap();
        }
        g.finish().unwrap()
    }

    fn gunzip(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(b)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn gzip_output_independent_of_threads_and_valid() {
        for len in [
            0,
            1,
            GZ_BLOCK - 1,
            GZ_BLOCK,
            GZ_BLOCK + 1,
            3 * GZ_BLOCK + 777,
        ] {
            let data = sample(len);
            let one = gz(&data, 6, 1, 4096);
            for (t, chunk) in [(2, 100_000), (3, 512), (8, GZ_BLOCK * 2)] {
                assert_eq!(one, gz(&data, 6, t, chunk), "len {len} threads {t}");
            }
            assert_eq!(gunzip(&one), data, "len {len}");
        }
    }

    #[test]
    fn gzip_levels_roundtrip() {
        let data = sample(GZ_BLOCK + 5000);
        for level in [0, 1, 9] {
            assert_eq!(gunzip(&gz(&data, level, 2, 65536)), data);
        }
    }

    /// Catches a switch of flate2's backend (e.g. a crate enabling C zlib), which changes digests.
    #[test]
    fn gzip_golden_digest_pins_backend() {
        let data = sample(2 * GZ_BLOCK + 12345);
        let d = crate::oci::Digest::of_bytes(&gz(&data, 6, 2, 65536));
        assert_eq!(
            d.to_string(),
            "sha256:b5d4c86a19f3583069a4b900c1736e15b792d81b5293f938466eb067389aaeaf",
            "gzip output changed: did flate2's backend change (zlib-rs is pinned in Cargo.toml)?"
        );
    }

    #[test]
    fn zstd_output_independent_of_workers() {
        let data = sample(5 * GZ_BLOCK);
        let run = |t: usize| {
            let mut z = zstd_encoder(Vec::new(), 3, t).unwrap();
            for c in data.chunks(100_000) {
                z.write_all(c).unwrap();
            }
            z.finish().unwrap()
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(4));
        assert_eq!(zstd::decode_all(&one[..]).unwrap(), data);
    }
}

//! OCI distribution registry client: push from and pull into the local layout, with auth
//! challenges (basic, bearer tokens per repository scope), retries, mounts and chunked uploads.
//!
//! Written on reqwest rather than oci-client: it needs HEAD-skips, mounts that accept a 202,
//! ECR-compatible chunking (>= 5 MiB, 201 PATCH answers, own offset tracking), streaming from
//! the layout, retries and per-scope tokens, which oci-client lacks or gets wrong.

mod client;
mod error;
mod pull;
mod push;
mod source;
mod sources;
mod stream;

pub use client::{
    Client, ClientOptions, RetryPolicy, DEFAULT_JOBS, MANIFEST_ACCEPT, MIN_CHUNK_SIZE,
};
pub use error::{ApiError, RegistryError};
pub use pull::PulledImage;
pub use push::{BlobReport, PushReport};
pub use sources::{BlobSources, SOURCES_FILE};
pub use stream::{BlobStream, StreamWriter};

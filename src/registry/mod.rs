//! OCI distribution registry client: push from and pull into the local layout, with auth
//! challenges (basic, bearer tokens per repository scope), retries, mounts and chunked uploads.
//! Credentials stay with the registry's origin, every request has an idle timeout and every
//! body read a size bound (`guard`).
//!
//! Written on reqwest rather than oci-client: it needs HEAD-skips, mounts that accept a 202,
//! ECR-compatible chunking (>= 5 MiB, 201 PATCH answers, own offset tracking), streaming from
//! the layout, retries and per-scope tokens, which oci-client lacks or gets wrong.

mod client;
mod error;
mod guard;
mod pull;
mod push;
mod referrers;
mod source;
mod sources;
mod stream;

pub use client::{
    Client, ClientOptions, RetryPolicy, DEFAULT_JOBS, DEFAULT_REGISTRY_TIMEOUT, MANIFEST_ACCEPT,
    MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, MAX_TOKEN_BYTES, MIN_CHUNK_SIZE,
};
pub use error::{ApiError, RegistryError, StallPhase};
pub use pull::PulledImage;
pub use push::{BlobReport, PushReport};
pub use sources::{BlobSources, SOURCES_FILE};
pub use stream::{BlobStream, StreamWriter};

//! Where a push goes — a registry repository or an Amazon ECR repository — with its tags, and
//! what a push did.

use std::sync::Arc;
use std::time::Instant;

use serde::ser::SerializeMap;
use serde::Serialize;

use super::{push_to_ecr, AttachReport, Attachments, EcrPushOptions, EcrPushReport, PublishError};
use crate::events::{BlobOutcome, Event, SharedReporter};
use crate::layout::Layout;
use crate::oci::{Descriptor, Digest};
use crate::reference::Reference;
use crate::registry::{BlobStream, Client, PushReport, StreamWriter};
use crate::spec::Target;

/// The tags of a push, one rule for registries and ECR: the tag in `--to` and the `--tag`
/// flags; when there are none, `target.tags` of image.yaml unless `--to` named another
/// destination; `latest` when still empty.
pub fn push_tags(
    flags: &[String],
    to_tag: Option<&str>,
    to_given: bool,
    target: Option<&Target>,
) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    for t in to_tag.into_iter().chain(flags.iter().map(String::as_str)) {
        if !tags.iter().any(|x| x == t) {
            tags.push(t.to_string());
        }
    }
    if tags.is_empty() && !to_given {
        tags = target.map(Target::tags).unwrap_or_default();
    }
    if tags.is_empty() {
        tags.push(crate::reference::DEFAULT_TAG.to_string());
    }
    tags
}

/// Where a push goes.
pub enum TargetKind {
    /// A repository of an OCI distribution registry.
    Registry {
        /// The client (destination credentials and endpoint, push options).
        client: Arc<Client>,
        /// The repository (no tag).
        repository: Reference,
    },
    /// An Amazon ECR repository (credentials and repository handled through the ECR API).
    Ecr(Box<EcrPushOptions>),
}

/// A push destination with its tags.
pub struct PushTarget {
    /// The destination.
    pub kind: TargetKind,
    /// The tags, first one first.
    pub tags: Vec<String>,
    /// Who signs the pushed image (`--sign-key`, `--sign-kms`), if anyone.
    pub signer: Option<Arc<crate::sign::Signer>>,
}

/// What a push did, by destination kind.
#[derive(Debug)]
pub enum PushDetails {
    /// A registry push.
    Registry(PushReport),
    /// An ECR push.
    Ecr(EcrPushReport),
}

/// What a push did.
#[derive(Debug)]
pub struct PushOutcome {
    /// `HOST/REPO@sha256:...` (ready for an ECS task definition).
    pub image_uri: String,
    /// The pushed manifest's digest.
    pub digest: Digest,
    /// `HOST/REPO` pushed to.
    pub repository: String,
    /// The tags now pointing at the image.
    pub tags: Vec<String>,
    /// Wall time in seconds.
    pub seconds: f64,
    /// An index's entries: each platform's manifest (empty for one image).
    pub platforms: Vec<Descriptor>,
    /// The destination's own report.
    pub details: PushDetails,
    /// The SBOMs and signature pushed with the image.
    pub attachments: Option<AttachReport>,
}

impl Serialize for PushOutcome {
    /// The `--json` result: the destination's report, then `image_uri` and `digest`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let report = match &self.details {
            PushDetails::Registry(r) => serde_json::to_value(r),
            PushDetails::Ecr(r) => serde_json::to_value(r),
        }
        .map_err(serde::ser::Error::custom)?;
        let mut m = s.serialize_map(None)?;
        if let serde_json::Value::Object(fields) = report {
            for (k, v) in fields.iter().filter(|(k, _)| *k != "image_uri") {
                m.serialize_entry(k, v)?;
            }
        }
        m.serialize_entry("image_uri", &self.image_uri)?;
        m.serialize_entry("digest", &self.digest)?;
        if let Some(a) = &self.attachments {
            m.serialize_entry("attachments", a)?;
        }
        if !self.platforms.is_empty() {
            m.serialize_entry("platforms", &self.platforms)?;
        }
        m.end()
    }
}

impl PushOutcome {
    /// What was pushed and how (one line, plus one per attachment).
    pub fn summary(&self) -> String {
        let mut s = self.image_summary();
        if let Some(a) = &self.attachments {
            for b in &a.sboms {
                s += &format!("\nSBOM ({}) of {} at {}", b.format, b.subject, b.reference);
            }
            if let Some(sig) = &a.signature {
                s += &format!("\nsigned by {} at {}", sig.signer, sig.reference);
            }
        }
        s
    }

    fn image_summary(&self) -> String {
        match &self.details {
            PushDetails::Registry(r) => format!(
                "pushed {} tags [{}]: {} uploaded, {} mounted, {} skipped, {:.1} MB in {:.1}s",
                self.image_uri,
                self.tags.join(", "),
                r.count(BlobOutcome::Uploaded),
                r.count(BlobOutcome::Mounted),
                r.count(BlobOutcome::Skipped),
                r.bytes_uploaded as f64 / 1e6,
                r.seconds
            ),
            PushDetails::Ecr(r) => match &r.scan {
                Some(scan) => format!("pushed {}\n{scan}", self.image_uri),
                None => format!("pushed {}", self.image_uri),
            },
        }
    }
}

impl PushTarget {
    /// Replace the tags (image.yaml's with their outputs resolved), for every kind of target.
    pub fn set_tags(&mut self, tags: Vec<String>) {
        if let TargetKind::Ecr(opts) = &mut self.kind {
            opts.tags = tags.clone();
        }
        self.tags = tags;
    }

    /// The destination as `HOST/REPO` (or the ECR repository as written).
    pub fn repository(&self) -> String {
        match &self.kind {
            TargetKind::Registry { repository, .. } => repository.repo_path(),
            TargetKind::Ecr(o) => o.repository.clone(),
        }
    }

    /// A streaming upload of a blob not yet complete (the new layer during `build --push`);
    /// only for registries: ECR pushes check immutable tags before uploading anything.
    pub fn stream_blob(&self, reporter: &SharedReporter) -> Option<(StreamWriter, BlobStream)> {
        match &self.kind {
            TargetKind::Registry { client, repository } => {
                Some(client.stream_blob(repository, reporter))
            }
            TargetKind::Ecr(_) => None,
        }
    }

    /// After an interrupted push: tell the registry to discard the upload sessions the dropped
    /// push left open. (An ECR push's sessions expire on their own.)
    pub async fn discard_open_uploads(&self) {
        if let TargetKind::Registry { client, .. } = &self.kind {
            client.discard_open_uploads().await;
        }
    }

    /// Push the image (or index) `manifest` of `layout`, then its tags, then its attachments
    /// (stage `push`).
    pub async fn push(
        &self,
        layout: &Layout,
        manifest: &Descriptor,
        reporter: &SharedReporter,
    ) -> Result<PushOutcome, PublishError> {
        reporter.event(Event::StageStart {
            stage: "push".into(),
        });
        let started = Instant::now();
        let attachments = Attachments::plan(layout, manifest, self.signer.clone())?;
        let mut outcome = match &self.kind {
            TargetKind::Registry { client, repository } => {
                let mode = match attachments.is_empty() {
                    true => None,
                    false => Some(
                        attachments
                            .mode(client, repository, &manifest.digest, reporter)
                            .await?,
                    ),
                };
                let report = client
                    .push_image(layout, manifest, repository, &self.tags, reporter)
                    .await
                    .map_err(Box::new)?;
                let attached = match mode {
                    Some(m) => Some(
                        attachments
                            .push(client, layout, repository, manifest, m, reporter)
                            .await?,
                    ),
                    None => None,
                };
                PushOutcome {
                    image_uri: format!("{}@{}", repository.repo_path(), report.manifest.digest),
                    digest: report.manifest.digest.clone(),
                    repository: repository.repo_path(),
                    tags: report.tags.clone(),
                    seconds: 0.0,
                    platforms: Vec::new(),
                    details: PushDetails::Registry(report),
                    attachments: attached,
                }
            }
            TargetKind::Ecr(options) => {
                let options = EcrPushOptions {
                    tags: self.tags.clone(),
                    ..options.as_ref().clone()
                };
                let (report, attached) =
                    push_to_ecr(layout, manifest, options, &attachments, reporter).await?;
                PushOutcome {
                    repository: report
                        .image_uri
                        .split_once('@')
                        .map_or_else(|| report.image_uri.clone(), |(r, _)| r.to_string()),
                    image_uri: report.image_uri.clone(),
                    digest: manifest.digest.clone(),
                    tags: self.tags.clone(),
                    seconds: 0.0,
                    attachments: attached,
                    platforms: Vec::new(),
                    details: PushDetails::Ecr(report),
                }
            }
        };
        outcome.seconds = started.elapsed().as_secs_f64();
        outcome.platforms = index_entries(layout, manifest);
        reporter.event(Event::StageFinish {
            stage: "push".into(),
            seconds: outcome.seconds,
        });
        Ok(outcome)
    }
}

/// The entries of `manifest` when it is an index of the layout (each platform's image).
pub fn index_entries(layout: &Layout, manifest: &Descriptor) -> Vec<Descriptor> {
    if !crate::oci::is_index_media_type(&manifest.media_type) {
        return Vec::new();
    }
    let parsed = layout
        .read_blob(&manifest.digest)
        .ok()
        .and_then(|raw| crate::oci::Manifest::parse(&raw, Some(&manifest.media_type)).ok());
    match parsed {
        Some(crate::oci::Manifest::Index(i)) => i.manifests,
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_tags_reach_an_ecr_push_too() {
        let mut t = PushTarget {
            kind: TargetKind::Ecr(Box::default()),
            tags: vec!["latest".into(), "${outputs.v}".into()],
            signer: None,
        };
        t.set_tags(vec!["latest".into(), "6.1.9".into()]);
        let TargetKind::Ecr(opts) = &t.kind else {
            panic!("not ECR")
        };
        assert_eq!(opts.tags, ["latest", "6.1.9"]);
        assert_eq!(t.tags, ["latest", "6.1.9"]);
    }

    fn target(tags: &[&str]) -> Target {
        Target {
            repository: "r.example/app".into(),
            tags: Some(tags.iter().map(|t| t.to_string()).collect()),
            ecr: None,
        }
    }

    #[test]
    fn one_tag_rule() {
        let t = target(&["v1", "latest"]);
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // image.yaml's tags without --to.
        assert_eq!(push_tags(&[], None, false, Some(&t)), s(&["v1", "latest"]));
        // --tag beats them.
        assert_eq!(push_tags(&s(&["x"]), None, false, Some(&t)), s(&["x"]));
        // --to names another destination: its tag, else latest; never image.yaml's tags.
        assert_eq!(push_tags(&[], None, true, Some(&t)), s(&["latest"]));
        assert_eq!(push_tags(&[], Some("t1"), true, Some(&t)), s(&["t1"]));
        assert_eq!(
            push_tags(&s(&["x", "t1"]), Some("t1"), true, Some(&t)),
            s(&["t1", "x"])
        );
        // Nothing at all: latest.
        assert_eq!(push_tags(&[], None, false, None), s(&["latest"]));
    }
}

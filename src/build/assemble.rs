//! Assembly: the base image, the steps' layers and image.yaml's `image:` settings give the
//! result (pure: [`crate::oci::Image::append`] does the work).

use std::collections::BTreeMap;

use super::step::StepOutcome;
use crate::oci::{Addendum, History, Image, ImageConfig, OciError};
use crate::spec::ImageSettings;

/// The result image: `base` with each step's layer appended and `settings` applied, dated by the
/// last step (a cached layer keeps its creation time, so an unchanged rebuild is identical).
pub fn assemble(
    base: &Image,
    steps: &[StepOutcome],
    settings: &ImageSettings,
) -> Result<Image, OciError> {
    let layers: Vec<_> = steps.iter().map(StepOutcome::addendum).collect();
    let created = steps.last().map_or(0, |s| s.created);
    base.append(&layers, created, |c| apply(settings, c))
}

/// The result with the steps' layers squashed into `squashed`: one layer, and still one
/// history entry per step (all but the last marked `empty_layer`).
pub fn assemble_squashed(
    base: &Image,
    steps: &[StepOutcome],
    squashed: &Addendum,
    settings: &ImageSettings,
) -> Result<Image, OciError> {
    let created = steps.last().map_or(0, |s| s.created);
    let when = crate::oci::rfc3339(created);
    let earlier = &steps[..steps.len().saturating_sub(1)];
    base.append(std::slice::from_ref(squashed), created, |c| {
        for s in earlier {
            c.history.push(History {
                created: Some(when.clone()),
                empty_layer: Some(true),
                ..s.history.clone()
            });
        }
        apply(settings, c)
    })
}

/// Apply image.yaml's `image:` settings to a config; unset fields inherit from the base.
pub fn apply(img: &ImageSettings, cfg: &mut ImageConfig) {
    if let Some(a) = &img.author {
        cfg.author = Some(a.clone());
    }
    let rc = &mut cfg.config;
    if let Some(v) = &img.entrypoint {
        rc.entrypoint = Some(v.clone());
        // Docker semantics: a new entrypoint resets an inherited cmd.
        if img.cmd.is_none() {
            rc.cmd = None;
        }
    }
    if let Some(v) = &img.cmd {
        rc.cmd = Some(v.clone());
    }
    if let Some(env) = &img.env {
        let mut list = rc.env.take().unwrap_or_default();
        for (k, v) in env {
            let prefix = format!("{k}=");
            list.retain(|e| !e.starts_with(&prefix));
            list.push(format!("{k}={v}"));
        }
        rc.env = Some(list);
    }
    if let Some(ports) = &img.expose {
        let m = rc.exposed_ports.get_or_insert_with(BTreeMap::new);
        for p in ports {
            m.insert(p.to_string(), serde_json::json!({}));
        }
    }
    if let Some(labels) = &img.labels {
        let m = rc.labels.get_or_insert_with(BTreeMap::new);
        m.extend(labels.clone());
    }
    if let Some(u) = &img.user {
        rc.user = Some(u.clone());
    }
    if let Some(w) = &img.workdir {
        rc.working_dir = Some(w.clone());
    }
    if let Some(vols) = &img.volumes {
        let m = rc.volumes.get_or_insert_with(BTreeMap::new);
        for v in vols {
            m.insert(v.clone(), serde_json::json!({}));
        }
    }
    if let Some(s) = &img.stop_signal {
        rc.stop_signal = Some(s.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entrypoint_resets_inherited_cmd_and_env_merges() {
        let mut cfg = ImageConfig::default();
        cfg.config.cmd = Some(vec!["bash".into()]);
        cfg.config.env = Some(vec!["A=1".into(), "B=2".into()]);
        let settings = ImageSettings {
            entrypoint: Some(vec!["/e".into()]),
            env: Some(BTreeMap::from([("A".to_string(), "9".to_string())])),
            ..Default::default()
        };
        apply(&settings, &mut cfg);
        assert_eq!(cfg.config.cmd, None);
        assert_eq!(
            cfg.config.env,
            Some(vec!["B=2".to_string(), "A=9".to_string()])
        );
    }
}

//! The build container: started from the parent image, kept alive for Ansible, and removed
//! whatever happens ([`BuildContainer::remove`] on every path the build controls, a best-effort
//! removal on drop for the others), unless `--keep-on-error` keeps it after a failed play.

use std::sync::Arc;

use crate::leftovers::{Owner, KEPT_SUFFIX};
use crate::runtime::{ContainerSpec, Engine, RuntimeError, BUILD_LABEL};

/// Label naming the image a build container belongs to.
pub const IMAGE_LABEL: &str = "io.wpimg.image";

/// A running build container, removed when the build is done with it.
pub struct BuildContainer {
    engine: Arc<dyn Engine>,
    id: String,
    name: String,
    armed: bool,
}

impl BuildContainer {
    /// What to start for image `image_name`: a container of `image` (an engine image ID) with
    /// a unique name and wpimg's labels (the image, and this process as its owner).
    pub fn spec(image: &str, image_name: &str, platform: Option<String>) -> ContainerSpec {
        ContainerSpec {
            image: image.to_string(),
            name: format!(
                "wpimg-build-{}-{:08x}",
                image_name.replace(['/', '.'], "-"),
                fastrand::u32(..)
            ),
            labels: Owner::current()
                .labels()
                .into_iter()
                .chain([
                    (BUILD_LABEL.to_string(), "1".to_string()),
                    (IMAGE_LABEL.to_string(), image_name.to_string()),
                ])
                .collect(),
            platform,
            volumes: Vec::new(),
        }
    }

    /// Start a keep-alive container.
    pub async fn start(
        engine: Arc<dyn Engine>,
        spec: &ContainerSpec,
    ) -> Result<Self, RuntimeError> {
        let id = engine.start_keepalive(spec).await?;
        Ok(Self {
            engine,
            id,
            name: spec.name.clone(),
            armed: true,
        })
    }

    /// The engine's container ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container name (Ansible's `ansible_host`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stop its processes, keeping its filesystem (before reading the layer).
    pub async fn stop(&self) -> Result<(), RuntimeError> {
        self.engine.kill(&self.id).await
    }

    /// Remove the container (and its anonymous volumes).
    pub async fn remove(mut self) -> Result<(), RuntimeError> {
        self.armed = false;
        self.engine.remove(&self.id).await
    }

    /// Remove the container in the background (the build goes on; it waits at its end).
    pub fn remove_in_background(mut self, ctx: &super::BuildContext<'_>) {
        self.armed = false;
        let (engine, id, name) = (
            self.engine.clone(),
            std::mem::take(&mut self.id),
            self.name.clone(),
        );
        let reporter = ctx.reporter.clone();
        ctx.spawn_background(async move {
            if let Err(e) = engine.remove(&id).await {
                reporter.event(crate::events::Event::Warning {
                    message: format!("could not remove build container {name}: {e}"),
                });
            }
        });
    }

    /// Leave the container in place (`--keep-on-error`), renamed `NAME-kept` so that no later
    /// collection of leftovers removes it; returns its name.
    pub async fn keep(mut self) -> String {
        self.armed = false;
        let kept = format!("{}{KEPT_SUFFIX}", self.name);
        match self.engine.rename(&self.id, &kept).await {
            Ok(()) => kept,
            Err(_) => std::mem::take(&mut self.name),
        }
    }
}

impl Drop for BuildContainer {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Reached only when the build's own future was dropped: remove it in the background.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let engine = self.engine.clone();
            let id = std::mem::take(&mut self.id);
            rt.spawn(async move {
                let _ = engine.remove(&id).await;
            });
        }
    }
}

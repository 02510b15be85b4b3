//! Reading a stopped build container's changes as a layer: from its overlayfs upper directory
//! when the engine is local with overlay2 (no copy through the engine), else through the Engine
//! API (`commit` + `save`, then the top layer of the archive).

use std::path::Path;

use serde::Serialize;

use super::container::BuildContainer;
use super::docker_archive;
use super::report::LayerSource;
use super::BuildError;
use crate::layer::{LayerInfo, LayerOptions};
use crate::layout::Layout;
use crate::runtime::{Engine, EngineInfo};

/// How the layer is read from the build container (`--layer-path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LayerPath {
    /// The overlayfs upper directory when the engine is local and uses overlay2, else the API.
    #[default]
    Auto,
    /// Always the container's overlayfs upper directory.
    Upperdir,
    /// Always the Engine API (`commit` + `save`).
    Api,
}

/// Where the changes of one container are read from.
pub struct Extraction<'a> {
    /// The engine.
    pub engine: &'a dyn Engine,
    /// What the engine said about itself (local, storage driver).
    pub info: &'a EngineInfo,
    /// `--layer-path`.
    pub path: LayerPath,
    /// Where the layer blob goes.
    pub layout: &'a Layout,
}

impl Extraction<'_> {
    /// Read the (stopped) container's changes into an uncompressed canonical layer tar at
    /// `spool` (compressed later: [`crate::layer::compress_spool`]). Cancellation
    /// (`opts.cancel`) is handled here, not by dropping this future: the layer writer stops and
    /// its temp file is gone, and a committed image is removed, before
    /// [`BuildError::Interrupted`] comes back.
    pub async fn spool(
        &self,
        container: &BuildContainer,
        opts: LayerOptions,
        spool: &Path,
    ) -> Result<(LayerInfo, LayerSource), BuildError> {
        match self.upper_dir(container).await? {
            Some(dir) => {
                let (layout, spool) = (self.layout.clone(), spool.to_path_buf());
                // The writer checks `opts.cancel` between pieces: awaited to its end, never dropped.
                let info = tokio::task::spawn_blocking(move || {
                    crate::layer::spool_from_dir(&dir, &spool, &layout, &opts)
                })
                .await??;
                Ok((info, LayerSource::Upperdir))
            }
            None => Ok((
                self.via_api(container, opts, spool).await?,
                LayerSource::Api,
            )),
        }
    }

    /// The upper directory to read, or `None` for the API path.
    async fn upper_dir(
        &self,
        container: &BuildContainer,
    ) -> Result<Option<std::path::PathBuf>, BuildError> {
        let usable = self.info.local && self.info.storage_driver == "overlay2";
        let upper = match self.path {
            LayerPath::Api => None,
            LayerPath::Auto | LayerPath::Upperdir if !usable => None,
            _ => self
                .engine
                .upper_dir(container.id())
                .await?
                .filter(|p| p.is_dir()),
        };
        if self.path == LayerPath::Upperdir && upper.is_none() {
            return Err(BuildError::LayerPathUnavailable {
                engine: format!(
                    "{} engine with the {} storage driver",
                    if self.info.local { "local" } else { "remote" },
                    self.info.storage_driver
                ),
            });
        }
        Ok(upper)
    }

    /// Commit + save, then the top layer of the saved archive.
    async fn via_api(
        &self,
        container: &BuildContainer,
        opts: LayerOptions,
        spool: &Path,
    ) -> Result<LayerInfo, BuildError> {
        let image = self.engine.commit(container.id()).await?;
        let result = self.layer_of_saved(&image, opts, spool).await;
        let _ = self.engine.remove_image(&image).await;
        result
    }

    async fn layer_of_saved(
        &self,
        image: &str,
        opts: LayerOptions,
        spool: &Path,
    ) -> Result<LayerInfo, BuildError> {
        use futures_util::StreamExt;
        use std::io::Write;
        let mut tmp = self.layout.ingest_file("save")?;
        let mut s = self.engine.save(image);
        let save = async {
            while let Some(chunk) = s.next().await {
                tmp.write_all(&chunk?)?;
            }
            tmp.flush()
        };
        match &opts.cancel {
            Some(cancel) => tokio::select! {
                r = save => r?,
                _ = cancel.cancelled() => return Err(BuildError::Interrupted),
            },
            None => save.await?,
        }
        let (layout, spool) = (self.layout.clone(), spool.to_path_buf());
        tokio::task::spawn_blocking(move || -> Result<LayerInfo, BuildError> {
            let mut f = tmp.reopen()?;
            let info = docker_archive::with_top_layer(&mut f, |r| {
                crate::layer::spool_from_tar(r, &spool, &layout, &opts)
            })?;
            Ok(info?)
        })
        .await?
    }
}

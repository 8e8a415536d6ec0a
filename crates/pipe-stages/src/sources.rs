//! Where the user's own files are, when a stage reads the store's copies of them: an input
//! that a `download` stage copied from a local path. Errors about such a file name the user's
//! file (which they can open and fix), not the copy under `cache/stages/<key>/out`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pipe_core::{Input, InputSource, Interrupted, StageContext, StageInfo};

/// Input name → the local file or directory its store copy was made from; learnt when the
/// pipeline is checked ([`pipe_core::Stage::check_upstream`]).
#[derive(Default)]
pub(crate) struct LocalSources(OnceLock<BTreeMap<String, PathBuf>>);

impl LocalSources {
    /// Notes, for each of `inputs` that reads a download of a local path, that path.
    pub(crate) fn learn<'a>(
        &self,
        inputs: &[Input],
        stage: &dyn Fn(&str) -> Option<StageInfo<'a>>,
    ) {
        let found = inputs
            .iter()
            .filter_map(|input| {
                let InputSource::Stage { stage: id, output } = &input.source else {
                    return None;
                };
                let up = stage(id).filter(|u| u.kind == "download")?;
                let InputSource::Path(local) = &up.inputs.first()?.source else {
                    return None;
                };
                let local = match output {
                    Some(o) if local.is_dir() => local.join(o),
                    _ => local.clone(),
                };
                // As the user would write it: `/work/data`, not `/work/./data`.
                let local: PathBuf = local
                    .components()
                    .filter(|c| *c != std::path::Component::CurDir)
                    .collect();
                Some((input.name.clone(), local))
            })
            .collect();
        let _ = self.0.set(found);
    }

    /// The user's file that `file`, read from input `name`, is the store's copy of; else
    /// `file` itself.
    pub(crate) fn user_path(&self, cx: &StageContext, name: &str, file: &Path) -> PathBuf {
        let (Some(local), Ok(copy)) = (self.0.get().and_then(|m| m.get(name)), cx.input(name))
        else {
            return file.to_path_buf();
        };
        if local.is_file() {
            return local.clone();
        }
        match file.strip_prefix(copy) {
            Ok(rel) if local.join(rel).exists() => local.join(rel),
            _ => file.to_path_buf(),
        }
    }

    /// `err` with every store copy it names replaced by the user's path (an interruption is
    /// passed on as it is).
    pub(crate) fn rename_in(&self, cx: &StageContext, err: anyhow::Error) -> anyhow::Error {
        let Some(map) = self.0.get().filter(|m| !m.is_empty()) else {
            return err;
        };
        if err.is::<Interrupted>() {
            return err;
        }
        let mut message = format!("{err:#}");
        for (name, local) in map {
            let Ok(copy) = cx.input(name) else { continue };
            // A single downloaded file: the copy is the one file in the input's directory.
            let copy = if local.is_file() && copy.is_dir() {
                match std::fs::read_dir(copy).map(|d| d.flatten().collect::<Vec<_>>()) {
                    Ok(entries) if entries.len() == 1 => entries[0].path(),
                    _ => continue,
                }
            } else {
                copy.to_path_buf()
            };
            message = message.replace(&copy.display().to_string(), &local.display().to_string());
        }
        anyhow::anyhow!(message)
    }
}

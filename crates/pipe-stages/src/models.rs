//! What the stages that read models share: where a model comes from (a directory, another
//! stage's output, or a seeded initialisation), what a model directory holds, and the device
//! that runs it.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use pipe_core::diag::{FieldError, Target};
use pipe_core::{Input, InputSource, ParseContext};
use pipe_model::LlamaConfig;
use serde::{Deserialize, Serialize};

/// A `model:` field: a stage or directory holding a checkpoint, or `{init: {…config.json
/// fields…}, seed: N}` for a model initialised from a seed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub(crate) enum ModelField {
    Source(String),
    Init {
        init: serde_json::Value,
        #[serde(default)]
        seed: u64,
    },
}

/// A parsed `model:` field.
#[derive(Debug, Clone)]
pub(crate) enum ModelSource {
    /// Read from the stage input of this name.
    Input(String),
    Init {
        config: LlamaConfig,
        seed: u64,
    },
}

impl ModelField {
    /// Reads the field `field` of the stage; a checkpoint becomes the input `field`.
    pub(crate) fn parse(
        &self,
        cx: &ParseContext<'_>,
        field: &str,
        inputs: &mut Vec<Input>,
    ) -> Result<ModelSource, FieldError> {
        match self {
            ModelField::Source(s) => {
                let source = cx
                    .as_stage_ref(s)
                    .unwrap_or_else(|| InputSource::Path(cx.resolve_path(s)));
                inputs.push(Input {
                    name: field.into(),
                    source,
                    field: cx.path.key(field),
                });
                Ok(ModelSource::Input(field.into()))
            }
            ModelField::Init { init, seed } => {
                let config = LlamaConfig::from_json(&init.to_string()).map_err(|e| {
                    FieldError::new(cx.path.key(field).key("init"), Target::Value, e)
                })?;
                Ok(ModelSource::Init {
                    config,
                    seed: *seed,
                })
            }
        }
    }
}

/// What a model input holds: a full model directory or a LoRA adapter directory.
pub(crate) enum Weights {
    Model(PathBuf),
    Adapter(PathBuf),
}

/// Finds the weights in `dir`, or in its `model/` or `adapter/` (a train stage's outputs).
pub(crate) fn find_weights(dir: &Path) -> anyhow::Result<Weights> {
    for d in [dir.to_path_buf(), dir.join("model"), dir.join("adapter")] {
        if d.join("adapter_config.json").exists() {
            return Ok(Weights::Adapter(d));
        }
        if d.join("config.json").exists() {
            return Ok(Weights::Model(d));
        }
    }
    bail!(
        "{} holds neither a model (config.json) nor a LoRA adapter (adapter_config.json)",
        dir.display()
    )
}

/// Where a stage's tensor work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// The device a field names (`cpu`, `cuda` = `cuda:0`, `cuda:N`), without looking for it.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        match text {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match text.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(index)) => Ok(Device::Cuda(index)),
                _ => Err(format!("unknown device `{text}` (cpu, cuda, cuda:N)")),
            },
        }
    }

    /// The device to run on: a GPU needs a build with the `cuda` feature and a driver.
    pub(crate) fn open(text: &str) -> anyhow::Result<Self> {
        let device = Self::parse(text).map_err(|e| anyhow!(e))?;
        if device == Device::Cpu {
            return Ok(device);
        }
        if !cfg!(feature = "cuda") {
            bail!(
                "`device: {text}` needs a pipe built with the `cuda` feature (cargo build --release --features cuda)"
            );
        }
        cuda_driver_present()?;
        Ok(device)
    }
}

/// burn-cuda panics inside a device thread when the driver library is missing; look for it
/// first and say what is wrong instead.
fn cuda_driver_present() -> anyhow::Result<()> {
    for lib in [c"libcuda.so.1", c"libcuda.so"] {
        // SAFETY: dlopen with a valid C string; the handle is closed right away.
        let h = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if !h.is_null() {
            unsafe { libc::dlclose(h) };
            return Ok(());
        }
    }
    Err(anyhow!(
        "no NVIDIA driver found (libcuda.so.1 cannot be loaded): is there a GPU with its driver installed? Use `device: cpu` otherwise"
    ))
}

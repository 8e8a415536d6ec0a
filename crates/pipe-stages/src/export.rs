//! `kind: export` — a trained model in the layouts the Python ecosystem loads unchanged:
//! `format: hf` (transformers: config.json, model.safetensors — sharded above
//! `max_shard_size` — tokenizer files, generation_config.json; LoRA adapters merged into the
//! base) or `format: peft` (adapter_config.json + adapter_model.safetensors with PEFT's names).
//!
//! ```yaml
//! export:
//!   kind: export
//!   model: train          # a train stage, or a model / adapter directory
//!   base: model           # the base model, for an adapter
//!   format: hf            # or peft
//!   dtype: bf16           # or f32
//!   max_shard_size: 5GB
//!   to: out/alpaca-7b     # also copy the result here (atomically), even on a cache hit
//! ```

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use pipe_core::diag::FieldError;
use pipe_core::{Input, InputSource, ParseContext, Stage, StageContext, StageKind};
use pipe_model::save::SaveDtype;
use pipe_model::{load_llama, Llama};
use serde::{Deserialize, Serialize};

use crate::models::{find_weights, Weights};

pub struct ExportKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
enum Format {
    Hf,
    Peft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
enum Dtype {
    Bf16,
    F32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    model: String,
    #[serde(default)]
    base: Option<String>,
    #[serde(default = "default_format")]
    format: Format,
    #[serde(default = "default_dtype")]
    dtype: Dtype,
    #[serde(default = "default_shard")]
    max_shard_size: String,
    #[serde(default)]
    to: Option<String>,
}

fn default_format() -> Format {
    Format::Hf
}
fn default_dtype() -> Dtype {
    Dtype::Bf16
}
fn default_shard() -> String {
    "5GB".into()
}

struct ExportStage {
    fields: Fields,
    shard_bytes: u64,
    to: Option<PathBuf>,
    inputs: Vec<Input>,
}

/// `5GB`, `500MB`, `64KB`, or a number of bytes (decimal units, as transformers reads them).
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_uppercase();
    let (num, mult) = [
        ("GB", 1_000_000_000u64),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.trim().to_string(), *m)))
    .unwrap_or((t.clone(), 1));
    let n: f64 = num.parse().ok()?;
    (n > 0.0).then_some((n * mult as f64) as u64)
}

impl StageKind for ExportKind {
    fn name(&self) -> &'static str {
        "export"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "write a model in Hugging Face (transformers) or PEFT layout, optionally to a path"
    }
    fn parse(
        &self,
        cx: &ParseContext<'_>,
        fields: serde_yaml::Value,
    ) -> Result<Box<dyn Stage>, FieldError> {
        let fields: Fields = cx.fields(fields)?;
        let shard_bytes = parse_size(&fields.max_shard_size).ok_or_else(|| {
            cx.error(
                "max_shard_size",
                format!(
                    "`{}` is not a size like 5GB or 500MB",
                    fields.max_shard_size
                ),
            )
        })?;
        let source = |text: &str| {
            cx.as_stage_ref(text)
                .unwrap_or_else(|| InputSource::Path(cx.resolve_path(text)))
        };
        let mut inputs = vec![Input {
            name: "model".into(),
            source: source(&fields.model),
            field: cx.path.key("model"),
        }];
        if let Some(b) = &fields.base {
            inputs.push(Input {
                name: "base".into(),
                source: source(b),
                field: cx.path.key("base"),
            });
        }
        let to = fields.to.as_deref().map(|t| cx.resolve_path(t));
        Ok(Box::new(ExportStage {
            fields,
            shard_bytes,
            to,
            inputs,
        }))
    }
}

type Cpu = pipe_model::CpuBackend;

/// Copies the tokenizer files found in `from` and writes the files transformers expects
/// beside them (special_tokens_map.json, generation_config.json).
fn tokenizer_files(from: &[&Path], out: &Path, model: Option<&Llama<Cpu>>) -> anyhow::Result<()> {
    let mut config = serde_json::json!({});
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        if let Some(src) = from.iter().map(|d| d.join(f)).find(|p| p.exists()) {
            std::fs::copy(&src, out.join(f)).with_context(|| format!("copying {f}"))?;
            if f == "tokenizer_config.json" {
                config = serde_json::from_slice(&std::fs::read(&src)?)?;
            }
        }
    }
    let token = |k: &str| match &config[k] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    };
    let mut map = serde_json::Map::new();
    for k in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        if let Some(t) = token(k) {
            map.insert(k.into(), serde_json::Value::String(t));
        }
    }
    std::fs::write(
        out.join("special_tokens_map.json"),
        serde_json::to_vec_pretty(&map)?,
    )?;
    if let Some(m) = model {
        let c = &m.config;
        let gen = serde_json::json!({
            "_from_model_config": true,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id,
        });
        std::fs::write(
            out.join("generation_config.json"),
            serde_json::to_vec_pretty(&gen)?,
        )?;
    }
    Ok(())
}

/// The tokenizer's vocabulary size (with added tokens), when the adapter carries one.
fn tokenizer_vocab(dir: &Path) -> Option<usize> {
    let t = pipe_data::tokenize::load_tokenizer(dir).ok()?;
    Some(t.tokenizer.get_vocab_size(true))
}

impl Stage for ExportStage {
    fn inputs(&self) -> Vec<Input> {
        self.inputs.clone()
    }
    fn params(&self) -> serde_json::Value {
        // `to` is a delivery, not part of the result.
        serde_json::json!({
            "format": self.fields.format,
            "dtype": self.fields.dtype,
            "max_shard_bytes": self.shard_bytes,
        })
    }
    fn run(&self, cx: &mut StageContext) -> anyhow::Result<()> {
        let weights = find_weights(cx.input("model")?)?;
        let dtype = match self.fields.dtype {
            Dtype::Bf16 => SaveDtype::Bf16,
            Dtype::F32 => SaveDtype::F32,
        };
        let out = cx.out_dir.clone();
        let device = Default::default();
        match (self.fields.format, weights) {
            (Format::Hf, Weights::Model(dir)) => {
                let model: Llama<Cpu> = load_llama(&dir, &device)?;
                model.save_hf_sharded(&out, dtype, self.shard_bytes)?;
                tokenizer_files(&[&dir], &out, Some(&model))?;
                cx.log(&format!(
                    "exported {} as a transformers model",
                    dir.display()
                ));
            }
            (Format::Hf, Weights::Adapter(dir)) => {
                let base = cx
                    .inputs
                    .get("base")
                    .ok_or_else(|| anyhow!("`model` is a LoRA adapter: set `base:` to the model it was trained on, to merge it"))?;
                let base = match find_weights(base)? {
                    Weights::Model(b) => b,
                    Weights::Adapter(_) => bail!("`base` must be a full model, not an adapter"),
                };
                let mut model: Llama<Cpu> = load_llama(&base, &device)?;
                if let Some(v) = tokenizer_vocab(&dir).filter(|&v| v > model.config.vocab_size) {
                    model = model.resize_embeddings(v);
                }
                let merged = model.load_peft_adapter(&dir, false)?.merge_lora();
                merged.save_hf_sharded(&out, dtype, self.shard_bytes)?;
                tokenizer_files(&[&dir, &base], &out, Some(&merged))?;
                cx.log(&format!(
                    "merged the adapter {} into {}",
                    dir.display(),
                    base.display()
                ));
            }
            (Format::Peft, Weights::Adapter(dir)) => {
                let ck = pipe_model::Checkpoint::open_file(&dir.join("adapter_model.safetensors"))?;
                let tensors = ck
                    .names()
                    .map(|n| {
                        let t = ck.read(n)?;
                        Ok(pipe_model::save::Named {
                            name: n.to_string(),
                            shape: t.shape,
                            data: t.data,
                        })
                    })
                    .collect::<Result<Vec<_>, pipe_model::ModelError>>()?;
                pipe_model::save::write_safetensors(
                    &out.join("adapter_model.safetensors"),
                    &tensors,
                    dtype,
                    &[("format", "pt")],
                )?;
                let mut cfg: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json"))?)?;
                if let Some(b) = &self.fields.base {
                    cfg["base_model_name_or_path"] = serde_json::Value::String(b.clone());
                }
                std::fs::write(
                    out.join("adapter_config.json"),
                    serde_json::to_vec_pretty(&cfg)?,
                )?;
                tokenizer_files(&[&dir], &out, None)?;
                cx.log(&format!(
                    "exported the adapter {} in PEFT layout",
                    dir.display()
                ));
            }
            (Format::Peft, Weights::Model(_)) => {
                bail!("`format: peft` exports a LoRA adapter, and `model` is a full model; use `format: hf`")
            }
        }
        Ok(())
    }
    fn deliver(&self, outputs: &Path) -> anyhow::Result<Option<String>> {
        let Some(to) = &self.to else { return Ok(None) };
        copy_atomically(outputs, to)?;
        Ok(Some(format!("copied to {}", to.display())))
    }
}

/// Copies `from` to `to` through a sibling temporary directory and a rename, so `to` is
/// either the old copy or the whole new one.
fn copy_atomically(from: &Path, to: &Path) -> anyhow::Result<()> {
    let parent = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    for (rel, src) in pipe_core::digest::walk_files(from)? {
        let dest = tmp.join(&rel);
        std::fs::create_dir_all(dest.parent().expect("parent"))?;
        std::fs::copy(&src, &dest)?;
        // Store files are read-only; the user's copy should not be.
        let mut perm = std::fs::metadata(&dest)?.permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&dest, perm)?;
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if to.exists() {
        std::fs::rename(to, &old)?;
    }
    std::fs::rename(&tmp, to)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("64kb"), Some(64_000));
        assert_eq!(parse_size("1.5MB"), Some(1_500_000));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("big"), None);
        assert_eq!(parse_size("0GB"), None);
    }
}

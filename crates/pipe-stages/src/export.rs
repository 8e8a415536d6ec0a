//! `kind: export` — a trained model in the layouts the Python ecosystem loads unchanged:
//! `format: hf` (transformers: config.json, model.safetensors — sharded above
//! `max_shard_size` — tokenizer files, generation_config.json; LoRA adapters merged into the
//! base), `format: peft` (adapter_config.json + adapter_model.safetensors with PEFT's names),
//! or `format: gguf` (one `model-<dtype>.gguf` for llama.cpp / Ollama / LM Studio, as
//! llama.cpp's `convert_hf_to_gguf.py` writes it; see [`crate::gguf`]).
//!
//! ```yaml
//! export:
//!   kind: export
//!   model: train          # a train stage, or a model / adapter directory
//!   base: model           # the base model, for an adapter
//!   tokenizer: model      # gguf: where tokenizer files the model lacks are (tokenizer.model)
//!   base_model_name_or_path: meta-llama/Llama-2-7b-hf   # `peft`: written into
//!                         # adapter_config.json, for AutoPeftModel (default: null)
//!   format: hf            # or peft, or gguf
//!   dtype: bf16           # or f32; gguf: f16 (its default), bf16, f32 or q8_0
//!   max_shard_size: 5GB
//!   to: out/alpaca-7b     # also copy the result here (atomically), even on a cache hit
//!   push: hf://org/alpaca-7b@main   # and upload it to the Hub (one commit; none if unchanged)
//! ```
//!
//! `to:` is a directory pipe owns once it delivered there: each delivery leaves a marker file
//! ([`MARKER`]) naming the stage and its key, and pipe replaces only a directory that holds
//! one (or an empty one). A directory with other contents is refused, never emptied; the
//! store, the directory pipe runs in, the pipeline's directory, the home directory and their
//! ancestors are refused by `pipe check` already.
//!
//! `push:` uploads the result to a Hugging Face Hub model repository on every run, cache hits
//! included, as one commit — and as no commit when the branch already holds these bytes (see
//! `pipe_fetch::push_folder`). A repository it creates is private unless `push_private: false`.
//! `HF_TOKEN` (write access) goes to the Hub (`HF_ENDPOINT`) only. Both are deliveries, not
//! part of the key.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use pipe_core::diag::FieldError;
use pipe_core::{Input, InputSource, KeyFields, ParseContext, Stage, StageContext, StageKind};
use pipe_model::gguf::FileType;
use pipe_model::save::SaveDtype;
use pipe_model::{load_model, CausalLm};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::models::{find_weights, Weights};

pub struct ExportKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Format {
    Hf,
    Peft,
    Gguf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Dtype {
    Bf16,
    F32,
    F16,
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl Dtype {
    fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Q8_0 => "q8_0",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Fields {
    model: String,
    #[serde(default)]
    base: Option<String>,
    /// `gguf`: a stage or directory to take tokenizer files from that the model's directory
    /// lacks (a SentencePiece `tokenizer.model`, for one).
    #[serde(default)]
    tokenizer: Option<String>,
    #[serde(default = "default_format")]
    format: Format,
    /// hf and peft: bf16 (default) or f32; gguf: f16 (default), bf16, f32 or q8_0.
    #[serde(default)]
    dtype: Option<Dtype>,
    #[serde(default = "default_shard")]
    max_shard_size: String,
    /// What a PEFT export's adapter_config.json names as its base (a Hub id or a path), so
    /// that `AutoPeftModel.from_pretrained` can find it.
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    to: Option<String>,
    /// `hf://ORG/REPO[@BRANCH]`: upload the result to this Hub repository.
    #[serde(default)]
    push: Option<String>,
    /// Whether a repository that `push` creates is private.
    #[serde(default = "default_private")]
    push_private: bool,
}

fn default_private() -> bool {
    true
}

/// What decides an export's result (see `pipe_core::key`): the layout, the dtype, the shard
/// size, and the base named in adapter_config.json. The model and base are inputs, by content;
/// `to:` and `push:` are deliveries, not part of the result.
#[derive(Serialize)]
struct ExportKey<'a> {
    format: Format,
    dtype: Dtype,
    max_shard_bytes: u64,
    base_model_name_or_path: Option<&'a str>,
}

fn default_format() -> Format {
    Format::Hf
}
fn default_shard() -> String {
    "5GB".into()
}

/// The file every delivered directory holds, so that pipe can tell its own delivery (which it
/// may replace) from a directory of the user's (which it must not touch).
pub const MARKER: &str = ".pipe-delivery.json";

struct ExportStage {
    stage_id: String,
    fields: Fields,
    /// `dtype`, or the format's default.
    dtype: Dtype,
    shard_bytes: u64,
    to: Option<PathBuf>,
    push: Option<pipe_fetch::HubTarget>,
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
    fn fields_schema(&self) -> serde_json::Value {
        crate::schema_of::<Fields>()
    }
    fn run_settings(&self) -> &'static [&'static str] {
        &["to", "push", "push_private"]
    }
    fn parse(
        &self,
        cx: &ParseContext<'_>,
        fields: serde_yaml::Value,
    ) -> Result<Box<dyn Stage>, FieldError> {
        let fields: Fields = cx.fields(fields)?;
        let dtype = match (fields.format, fields.dtype) {
            (Format::Gguf, None) => Dtype::F16,
            (_, None) => Dtype::Bf16,
            (Format::Hf | Format::Peft, Some(d @ (Dtype::F16 | Dtype::Q8_0))) => {
                return Err(cx.error(
                    "dtype",
                    format!(
                        "`{}` is a GGUF encoding; `format: {}` writes bf16 or f32",
                        d.name(),
                        if fields.format == Format::Hf {
                            "hf"
                        } else {
                            "peft"
                        }
                    ),
                ))
            }
            (_, Some(d)) => d,
        };
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
        if let Some(t) = &fields.tokenizer {
            if fields.format != Format::Gguf {
                return Err(cx.error(
                    "tokenizer",
                    "`tokenizer` is for `format: gguf`; the other formats copy the tokenizer beside the model",
                ));
            }
            inputs.push(Input {
                name: "tokenizer".into(),
                source: source(t),
                field: cx.path.key("tokenizer"),
            });
        }
        let to = match fields.to.as_deref() {
            Some(t) => Some(cx.delivery_target("to", t)?),
            None => None,
        };
        let push = match fields.push.as_deref() {
            Some(p) => Some(pipe_fetch::HubTarget::parse(p).map_err(|e| cx.error("push", e))?),
            None => None,
        };
        Ok(Box::new(ExportStage {
            stage_id: cx.stage_id.to_string(),
            fields,
            dtype,
            shard_bytes,
            to,
            push,
            inputs,
        }))
    }
}

type Cpu = pipe_model::CpuBackend;

/// Copies the tokenizer files found in `from` and writes the files transformers expects
/// beside them (special_tokens_map.json, generation_config.json).
fn tokenizer_files(
    from: &[&Path],
    out: &Path,
    model: Option<&CausalLm<Cpu>>,
) -> anyhow::Result<()> {
    let mut config = serde_json::json!({});
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        if let Some(src) = from.iter().map(|d| d.join(f)).find(|p| p.exists()) {
            std::fs::copy(&src, out.join(f)).with_context(|| format!("copying {f}"))?;
            if f == "tokenizer_config.json" {
                config = serde_json::from_slice(&std::fs::read(&src)?)?;
            }
        }
    }
    let mut map = serde_json::Map::new();
    for k in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        if let Some(t) = pipe_data::tokenize::config_token(Some(&config), k) {
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
    fn key_fields(&self) -> KeyFields {
        KeyFields::of(&ExportKey {
            format: self.fields.format,
            dtype: self.dtype,
            max_shard_bytes: self.shard_bytes,
            base_model_name_or_path: self.fields.base_model_name_or_path.as_deref(),
        })
    }
    fn run(&self, cx: &mut StageContext) -> anyhow::Result<()> {
        let weights = find_weights(cx.input("model")?)?;
        let out = cx.out_dir.clone();
        match (self.fields.format, weights) {
            (Format::Hf | Format::Gguf, weights) => {
                let (model, mut tokenizer_dirs, said) = self.full_model(cx, weights)?;
                if self.fields.format == Format::Hf {
                    let tokenizer_dirs: Vec<&Path> =
                        tokenizer_dirs.iter().map(PathBuf::as_path).collect();
                    model.save_hf_sharded(&out, self.save_dtype(), self.shard_bytes)?;
                    tokenizer_files(&tokenizer_dirs, &out, Some(&model))?;
                    cx.log(&format!("{said}, as a transformers model"));
                } else {
                    // Searched after the model's own directories (`tokenizer:` is gguf's only).
                    if let Some(t) = cx.inputs.get("tokenizer") {
                        tokenizer_dirs.push(if t.is_file() {
                            t.parent().unwrap_or(Path::new(".")).to_path_buf()
                        } else {
                            t.clone()
                        });
                    }
                    let tokenizer_dirs: Vec<&Path> =
                        tokenizer_dirs.iter().map(PathBuf::as_path).collect();
                    let file_type = match self.dtype {
                        Dtype::F32 => FileType::F32,
                        Dtype::F16 => FileType::F16,
                        Dtype::Bf16 => FileType::BF16,
                        Dtype::Q8_0 => FileType::Q8_0,
                    };
                    let file = out.join(format!("model-{}.gguf", self.dtype.name()));
                    let name = Path::new(&self.fields.model)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| self.fields.model.clone());
                    crate::gguf::write_gguf(&model, &tokenizer_dirs, &name, file_type, &file)?;
                    cx.log(&format!(
                        "{said}, as {} ({})",
                        file.file_name().unwrap_or_default().to_string_lossy(),
                        self.dtype.name()
                    ));
                }
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
                    self.save_dtype(),
                    &[("format", "pt")],
                )?;
                let mut cfg: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json"))?)?;
                if let Some(b) = &self.fields.base_model_name_or_path {
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
        // The store keeps a stage's outputs in `stages/<key>/out`.
        let key = outputs
            .parent()
            .and_then(Path::file_name)
            .map(|k| k.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut said = Vec::new();
        if let Some(to) = &self.to {
            said.push(self.deliver_to(outputs, to, &key)?);
        }
        if let Some(target) = &self.push {
            said.push(self.push_to(outputs, target, &key)?);
        }
        Ok((!said.is_empty()).then(|| said.join("; ")))
    }
}

impl ExportStage {
    fn save_dtype(&self) -> SaveDtype {
        match self.dtype {
            Dtype::F32 => SaveDtype::F32,
            _ => SaveDtype::Bf16,
        }
    }

    /// The model to write: `model` itself, or a LoRA adapter merged into `base`; with the
    /// directories its tokenizer files come from, and what was done, for the log.
    fn full_model(
        &self,
        cx: &StageContext,
        weights: Weights,
    ) -> anyhow::Result<(CausalLm<Cpu>, Vec<PathBuf>, String)> {
        let device = Default::default();
        match weights {
            Weights::Model(dir) => {
                let model: CausalLm<Cpu> = load_model(&dir, &device)?;
                let said = format!("exported {}", dir.display());
                Ok((model, vec![dir], said))
            }
            Weights::Adapter(dir) => {
                let base = cx
                    .inputs
                    .get("base")
                    .ok_or_else(|| anyhow!("`model` is a LoRA adapter: set `base:` to the model it was trained on, to merge it"))?;
                let base = match find_weights(base)? {
                    Weights::Model(b) => b,
                    Weights::Adapter(_) => bail!("`base` must be a full model, not an adapter"),
                };
                let mut model: CausalLm<Cpu> = load_model(&base, &device)?;
                if let Some(v) = tokenizer_vocab(&dir).filter(|&v| v > model.config.vocab_size) {
                    model = model.resize_embeddings(v);
                }
                let merged = model.load_peft_adapter(&dir, false)?.merge_lora();
                let said = format!(
                    "merged the adapter {} into {}",
                    dir.display(),
                    base.display()
                );
                Ok((merged, vec![dir, base], said))
            }
        }
    }

    /// Uploads the outputs to the Hub (see `pipe_fetch::push_folder`).
    fn push_to(
        &self,
        outputs: &Path,
        target: &pipe_fetch::HubTarget,
        key: &str,
    ) -> anyhow::Result<String> {
        let endpoint = crate::download::hub_endpoint();
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        if token.is_none() {
            bail!(
                "`push: {target}` needs HF_TOKEN: a Hub token with write access to the repository"
            );
        }
        let client = pipe_fetch::Client::new()
            .with_token(&endpoint, token)
            .context("HF_ENDPOINT")?;
        let summary = format!(
            "pipe: export stage `{}` (key {})",
            self.stage_id,
            &key[..key.len().min(12)]
        );
        let pushed = pipe_fetch::push_folder(
            &client,
            &endpoint,
            target,
            outputs,
            &summary,
            self.fields.push_private,
        )
        .with_context(|| format!("cannot push to {target}"))?;
        Ok(match pushed.commit {
            None => format!("{target} has these files already; no commit"),
            Some(commit) => {
                format!(
                "pushed to {target}{}: commit {commit} ({} file{}; {} LFS object{} sent, {} bytes)",
                if pushed.created_repo { " (created the repository)" } else { "" },
                pushed.files,
                if pushed.files == 1 { "" } else { "s" },
                pushed.objects_sent,
                if pushed.objects_sent == 1 { "" } else { "s" },
                pushed.bytes_sent
            )
            }
        })
    }

    /// Copies the outputs to `to:`, a directory pipe owns (see the module's doc).
    fn deliver_to(&self, outputs: &Path, to: &Path, key: &str) -> anyhow::Result<String> {
        let marker = serde_json::json!({
            "delivered_by": "pipe",
            "stage": self.stage_id,
            "key": key,
            "note": "pipe replaces this directory on its next delivery; delete this file to keep the directory as it is",
        });
        deliver_dir(outputs, to, &serde_json::to_vec_pretty(&marker)?)?;
        Ok(format!("copied to {}", to.display()))
    }
}

/// What lies at a delivery target before a delivery.
enum Existing {
    Nothing,
    /// An empty directory, or one a delivery left (it holds the marker).
    Replaceable,
}

fn existing(to: &Path) -> anyhow::Result<Existing> {
    let meta = match std::fs::symlink_metadata(to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(e) => return Err(anyhow!("cannot inspect {}: {e}", to.display())),
        Ok(m) => m,
    };
    let help = "pipe replaces only a directory it delivered itself (one holding its `.pipe-delivery.json`); move it away, or point `to:` at a new directory";
    if meta.file_type().is_symlink() {
        bail!(
            "{} is a symbolic link, not a directory pipe delivered\n  = help: {help}",
            to.display()
        );
    }
    if !meta.is_dir() {
        bail!(
            "{} exists and is not a directory\n  = help: {help}",
            to.display()
        );
    }
    if std::fs::symlink_metadata(to.join(MARKER)).is_ok_and(|m| m.is_file()) {
        return Ok(Existing::Replaceable);
    }
    let mut names: Vec<String> = std::fs::read_dir(to)
        .with_context(|| format!("cannot read {}", to.display()))?
        .take(4)
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    if names.is_empty() {
        return Ok(Existing::Replaceable);
    }
    names.sort();
    if names.len() > 3 {
        names.truncate(3);
        names.push("…".into());
    }
    bail!(
        "{} already holds files that pipe did not deliver ({}); it was left untouched\n  = help: {help}",
        to.display(),
        names.join(", ")
    )
}

/// Removes what it names when dropped, unless released: the temporary copies and the
/// directories a failed delivery created, so that no failure leaves debris.
struct Cleanup(Option<PathBuf>);

impl Cleanup {
    fn release(mut self) {
        self.0 = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Copies `from` to `to` through a sibling temporary directory and a rename, so `to` is
/// either the old delivery or the whole new one, and marks it as pipe's with `marker`.
fn deliver_dir(from: &Path, to: &Path, marker: &[u8]) -> anyhow::Result<()> {
    let before = existing(to)?;
    let parent = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| anyhow!("{} has no parent directory to deliver into", to.display()))?;
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| anyhow!("{} does not end in a directory name", to.display()))?;
    // The topmost parent this delivery creates goes again if the delivery fails.
    let created = parent
        .ancestors()
        .take_while(|a| !a.exists())
        .last()
        .map(Path::to_path_buf);
    let created = Cleanup(created);
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    remove_stale_temporaries(parent, &name);
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let tmp_guard = Cleanup(Some(tmp.clone()));
    // The marker first: a copy left by a kill is then recognisably pipe's.
    std::fs::write(tmp.join(MARKER), marker)?;
    for (rel, src) in pipe_core::digest::walk_files(from)? {
        let dest = tmp.join(&rel);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::copy(&src, &dest)
            .with_context(|| format!("cannot copy {rel} to {}", tmp.display()))?;
        // Store files are read-only; the user's copy should not be.
        let mut perm = std::fs::metadata(&dest)?.permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&dest, perm)?;
    }
    match before {
        Existing::Nothing => {
            std::fs::rename(&tmp, to)
                .with_context(|| format!("cannot move the copy to {}", to.display()))?;
        }
        Existing::Replaceable => {
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(to, &old)
                .with_context(|| format!("cannot replace {}", to.display()))?;
            if let Err(e) = std::fs::rename(&tmp, to) {
                // Put the previous delivery back rather than leave nothing.
                let _ = std::fs::rename(&old, to);
                return Err(anyhow!("cannot replace {}: {e}", to.display()));
            }
            let _ = std::fs::remove_dir_all(&old);
        }
    }
    tmp_guard.release();
    created.release();
    Ok(())
}

/// Removes the temporary directories an earlier, killed delivery to `name` left in `parent`
/// (`.NAME.partial-PID`, `.NAME.old-PID`). Only those holding the marker are pipe's.
fn remove_stale_temporaries(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&format!(".{name}.")) else {
            continue;
        };
        let ours = ["partial-", "old-"].iter().any(|p| {
            rest.strip_prefix(p)
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        });
        if ours && e.path().join(MARKER).is_file() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
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

//! `kind: download` — files from the Hugging Face Hub, a URL, or a local path.
//!
//! ```yaml
//! model:
//!   kind: download
//!   source: hf://meta-llama/Llama-2-7b-hf@<commit>   # or https://…, or a local path
//!   files: ["*.json", "*.safetensors"]              # optional (Hub, directories)
//! data:
//!   kind: download
//!   source: https://…/alpaca_data.json
//!   sha256: 2eddafc6…                               # pins the content (and the key)
//! ```
//!
//! Partial downloads stay in the stage's work directory and resume (HTTP Range) after a
//! failure or a kill, only while the server proves (ETag or Last-Modified) that the file is the
//! same. `HF_TOKEN` is sent to the Hub's origin only (scheme, host and port, also after a
//! redirect); `HF_ENDPOINT` names the Hub. Neither enters the cache key or any log. Every name
//! that becomes a file (`file_name:`, a Hub listing) is checked by
//! `pipe_core::relpath::relative_path` before anything is written.

use std::collections::BTreeMap;

use anyhow::Context;
use pipe_core::diag::{FieldError, Target};
use pipe_core::{
    Input, InputSource, Interrupted, KeyFields, ParseContext, Stage, StageContext, StageKind,
};
use pipe_fetch::{fetch, Checksum, Client, FetchError, FetchOptions, Source, Transfer};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub struct DownloadKind;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Fields {
    /// `hf://ORG/REPO[@REVISION]`, `hf://datasets/ORG/REPO`, `https://…`, `http://…`, a path.
    source: String,
    /// Globs choosing files from a repository or directory.
    #[serde(default)]
    files: Vec<String>,
    /// The sha256 of a single-file source.
    #[serde(default)]
    sha256: Option<String>,
    /// The blake3 of a single-file source.
    #[serde(default)]
    blake3: Option<String>,
    /// Per-file digests: name → `sha256:HEX` or `blake3:HEX`.
    #[serde(default)]
    checksums: BTreeMap<String, String>,
    /// The name to store a single file under (default: from the URL or path).
    #[serde(default)]
    file_name: Option<String>,
    /// Attempts after a transient failure.
    #[serde(default = "default_retries")]
    retries: u32,
}

fn default_retries() -> u32 {
    5
}

struct DownloadStage {
    fields: Fields,
    source: Source,
    options: FetchOptions,
    /// The name a single-file source is stored under.
    single: Option<String>,
    inputs: Vec<Input>,
}

/// What decides a download's result (see `pipe_core::key`): a remote source as written (a
/// local one is an input, by content), the files chosen, the checksums they must match, and
/// the name a single file is stored under.
#[derive(Serialize)]
struct DownloadKey<'a> {
    source: Option<&'a str>,
    files: &'a [String],
    checksums: BTreeMap<&'a str, String>,
    file_name: Option<&'a str>,
}

impl DownloadStage {
    fn key(&self) -> DownloadKey<'_> {
        DownloadKey {
            source: match self.source {
                Source::Local(_) => None,
                _ => Some(&self.fields.source),
            },
            files: &self.fields.files,
            checksums: self
                .options
                .checksums
                .iter()
                .map(|(k, v)| (k.as_str(), v.to_string()))
                .collect(),
            file_name: self.single.as_deref(),
        }
    }
}

pub(crate) const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The Hub's address: `HF_ENDPOINT`, else huggingface.co.
pub(crate) fn hub_endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
}

impl StageKind for DownloadKind {
    fn name(&self) -> &'static str {
        "download"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "fetch files from the Hugging Face Hub, a URL or a local path (resumable, verified)"
    }
    fn fields_schema(&self) -> serde_json::Value {
        crate::schema_of::<Fields>()
    }
    fn run_settings(&self) -> &'static [&'static str] {
        &["retries"]
    }
    fn parse(
        &self,
        cx: &ParseContext<'_>,
        fields: serde_yaml::Value,
    ) -> Result<Box<dyn Stage>, FieldError> {
        let fields: Fields = cx.fields(fields)?;
        if let Some(name) = &fields.file_name {
            pipe_core::relpath::relative_path(name).map_err(|e| {
                cx.error("file_name", format!("`file_name:` {e}"))
                    .with_help("name a file inside the stage's outputs, such as `data.json` or `raw/data.json`")
            })?;
        }
        let source = Source::parse(&fields.source, cx.base_dir)
            .map_err(|e| cx.error("source", e.to_string()))?;
        let mut checksums = BTreeMap::new();
        for (name, text) in &fields.checksums {
            let c = Checksum::parse(text).map_err(|e| {
                FieldError::new(
                    cx.path.key("checksums").key(name),
                    Target::Value,
                    e.to_string(),
                )
            })?;
            checksums.insert(name.clone(), c);
        }
        let single = match &source {
            Source::Url(u) => fields
                .file_name
                .clone()
                .or_else(|| pipe_fetch::url_file_name(u)),
            Source::Local(p) if !p.is_dir() => fields
                .file_name
                .clone()
                .or_else(|| p.file_name().map(|n| n.to_string_lossy().into_owned())),
            _ => None,
        };
        for (field, algo) in [("sha256", &fields.sha256), ("blake3", &fields.blake3)] {
            if let Some(hex) = algo {
                let Some(name) = &single else {
                    return Err(cx
                        .error(
                            field,
                            format!("`{field}:` pins a single file; this source has several"),
                        )
                        .with_help("use `checksums: {FILE: \"sha256:…\"}`"));
                };
                let c = Checksum::parse(&format!("{field}:{hex}"))
                    .map_err(|e| cx.error(field, e.to_string()))?;
                checksums.insert(name.clone(), c);
            }
        }
        if let (Source::Url(url), None, Some(name)) = (&source, &fields.file_name, &single) {
            if let Err(e) = pipe_core::relpath::relative_path(name) {
                return Err(cx
                    .error(
                        "source",
                        format!("the file name at the end of `{url}`, {e}"),
                    )
                    .with_help("set `file_name:` to the name to store it under"));
            }
        }
        if matches!(source, Source::Url(_)) && single.is_none() {
            return Err(cx
                .error("source", "the URL does not end in a file name")
                .with_help("set `file_name:`"));
        }
        if !fields.files.is_empty() && matches!(source, Source::Url(_)) {
            return Err(cx.error(
                "files",
                "`files:` selects from a repository or directory, not from a URL",
            ));
        }
        let inputs = match &source {
            Source::Local(p) => vec![Input {
                name: "source".into(),
                source: InputSource::Path(p.clone()),
                field: cx.path.key("source"),
            }],
            _ => Vec::new(),
        };
        let endpoint = hub_endpoint();
        let options = FetchOptions {
            files: fields.files.clone(),
            checksums,
            file_name: fields.file_name.clone(),
            endpoint,
        };
        Ok(Box::new(DownloadStage {
            fields,
            source,
            options,
            single,
            inputs,
        }))
    }
}

impl Stage for DownloadStage {
    fn inputs(&self) -> Vec<Input> {
        self.inputs.clone()
    }
    fn key_fields(&self) -> KeyFields {
        KeyFields::of(&self.key())
    }
    fn resumable(&self) -> bool {
        true
    }
    fn notes(&self) -> Vec<String> {
        if self.source.pinned(&self.options) {
            return Vec::new();
        }
        match &self.source {
            Source::Hub(r) => vec![format!(
                "unpinned source: `{}` follows the revision `{}`, which can move; the cached copy is reused until you --force it. Pin a commit (`@<sha>`) for a reproducible key",
                r.repo,
                r.revision.as_deref().unwrap_or("main")
            )],
            _ => vec!["unpinned source: a URL without `sha256:` is fetched once and reused until you --force it; add `sha256:` to pin it".into()],
        }
    }
    fn run(&self, cx: &mut StageContext) -> anyhow::Result<()> {
        let mut client = Client::new();
        client.retries = self.fields.retries;
        if let Source::Hub(_) = &self.source {
            client = client
                .with_token(&self.options.endpoint, std::env::var("HF_TOKEN").ok())
                .context("HF_ENDPOINT")?;
        }
        let work = cx.work_dir.join("partial");
        let out = cx.out_dir.clone();
        let transfer = StageTransfer {
            cx,
            announced: std::cell::Cell::new(None),
        };
        let report = fetch(
            &self.source,
            &self.fields.source,
            &self.options,
            &client,
            &out,
            &work,
            &transfer,
        );
        let report = match report {
            Ok(r) => r,
            Err(FetchError::Interrupted) => return Err(Interrupted.into()),
            Err(e) => return Err(e.into()),
        };
        for f in &report.files {
            let resumed = if f.resumed_from > 0 {
                format!(" (resumed from byte {})", f.resumed_from)
            } else {
                String::new()
            };
            cx.log(&format!("fetched {} ({} bytes){resumed}", f.name, f.bytes));
        }
        cx.set_metrics(serde_json::to_value(&report)?);
        Ok(())
    }
}

/// Shows a transfer on the stage's progress line and stops it on Ctrl-C.
struct StageTransfer<'a> {
    cx: &'a StageContext,
    announced: std::cell::Cell<Option<u64>>,
}

impl Transfer for StageTransfer<'_> {
    fn progress(&self, done: u64, total: Option<u64>) {
        if let Some(t) = total {
            if self.announced.get() != Some(t) {
                self.cx.progress().set_bytes_length(t);
                self.announced.set(Some(t));
            }
        }
        self.cx.progress().set_position(done);
    }
    fn cancelled(&self) -> bool {
        self.cx.is_cancelled()
    }
}

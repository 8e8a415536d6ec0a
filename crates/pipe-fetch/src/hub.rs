//! The Hugging Face Hub: `hf://[datasets/]ORG/REPO[@REVISION]` sources, revision resolution to a
//! commit, and the file list (with LFS sha256 digests) to fetch.

use globset::{Glob, GlobSetBuilder};
use serde::Deserialize;

use crate::http::{Client, FetchError};
use crate::source::SourceError;

/// Why no files can be chosen from a repository's file list.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("bad file pattern `{pattern}`")]
    Pattern {
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error(transparent)]
    Set(globset::Error),
    #[error("{repo} has only pickle weights (.bin/.pt), which pipe never loads because unpickling can run arbitrary code; use a revision or a copy of the model with .safetensors weights")]
    PickleOnly { repo: String },
    /// `patterns` and `listed` as shown: comma-separated, the first 20 files listed.
    #[error("no file of {repo} matches {patterns} (files: {listed})")]
    NoMatch {
        repo: String,
        patterns: String,
        listed: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

/// A repository on the Hub, at a revision (a branch, tag or commit; `main` when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRepo {
    pub kind: RepoKind,
    /// `ORG/REPO`.
    pub repo: String,
    pub revision: Option<String>,
}

/// One file of a repository at a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    pub name: String,
    pub size: Option<u64>,
    /// The LFS object's sha256, for files stored in LFS (weights).
    pub lfs_sha256: Option<String>,
}

/// What `pipe` fetches from a model repository when no `files:` are given: the config, the
/// tokenizer, and safetensors weights (never pickle).
pub fn default_model_files() -> &'static [&'static str] {
    &[
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        // SentencePiece's model (Llama 2, Mistral): what GGUF export reads the vocabulary from.
        "tokenizer.model",
        "*.safetensors",
        "model.safetensors.index.json",
    ]
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    #[serde(default)]
    size: Option<u64>,
}

impl HubRepo {
    /// Reads `hf://ORG/REPO[@REV]` or `hf://datasets/ORG/REPO[@REV]`.
    pub fn parse(source: &str) -> Result<Self, SourceError> {
        let rest = source
            .strip_prefix("hf://")
            .ok_or_else(|| SourceError::NotHub(source.to_string()))?;
        let (kind, rest) = match rest.strip_prefix("datasets/") {
            Some(r) => (RepoKind::Dataset, r),
            None => (
                RepoKind::Model,
                rest.strip_prefix("models/").unwrap_or(rest),
            ),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
            Some(_) => return Err(SourceError::EmptyRevision(source.to_string())),
            None => (rest, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let valid = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if parts.len() != 2 || !parts.iter().all(|p| valid(p)) {
            return Err(SourceError::HubRepo(source.to_string()));
        }
        Ok(HubRepo {
            kind,
            repo: repo.to_string(),
            revision,
        })
    }

    /// A commit id pins the content; a branch or tag can move.
    pub fn is_pinned(&self) -> bool {
        self.revision
            .as_deref()
            .is_some_and(|r| r.len() == 40 && r.chars().all(|c| c.is_ascii_hexdigit()))
    }

    fn kind_path(&self) -> &'static str {
        match self.kind {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }

    pub fn api_url(&self, endpoint: &str) -> String {
        let rev = self
            .revision
            .as_deref()
            .unwrap_or("main")
            .replace('/', "%2F");
        format!(
            "{}/api/{}/{}/revision/{rev}?blobs=true",
            endpoint.trim_end_matches('/'),
            self.kind_path(),
            self.repo
        )
    }

    pub fn file_url(&self, endpoint: &str, commit: &str, file: &str) -> String {
        let prefix = match self.kind {
            RepoKind::Model => String::new(),
            RepoKind::Dataset => "datasets/".to_string(),
        };
        format!(
            "{}/{prefix}{}/resolve/{commit}/{file}",
            endpoint.trim_end_matches('/'),
            self.repo
        )
    }

    /// Resolves the revision to a commit and lists the files there.
    pub fn resolve(
        &self,
        client: &Client,
        endpoint: &str,
    ) -> Result<(String, Vec<HubFile>), FetchError> {
        let help = format!(
            "check the repository name `{}` and the revision `{}`; private repositories also answer 404 without a valid HF_TOKEN",
            self.repo,
            self.revision.as_deref().unwrap_or("main")
        );
        let info: RevisionInfo = client.get_json(&self.api_url(endpoint), &help)?;
        let files = info
            .siblings
            .into_iter()
            .map(|s| HubFile {
                size: s.lfs.as_ref().and_then(|l| l.size).or(s.size),
                lfs_sha256: s.lfs.map(|l| l.sha256),
                name: s.rfilename,
            })
            .collect();
        Ok((info.sha, files))
    }
}

/// The files matching `globs` (or, for models without globs, [`default_model_files`]).
pub fn select(
    kind: RepoKind,
    files: &[HubFile],
    globs: &[String],
    repo: &str,
) -> Result<Vec<HubFile>, SelectError> {
    let patterns: Vec<String> = if globs.is_empty() {
        match kind {
            RepoKind::Model => default_model_files()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            RepoKind::Dataset => vec!["*".into()],
        }
    } else {
        globs.to_vec()
    };
    let mut set = GlobSetBuilder::new();
    for p in &patterns {
        set.add(Glob::new(p).map_err(|source| SelectError::Pattern {
            pattern: p.clone(),
            source,
        })?);
    }
    let set = set.build().map_err(SelectError::Set)?;
    let chosen: Vec<HubFile> = files
        .iter()
        .filter(|f| set.is_match(&f.name))
        .cloned()
        .collect();
    if kind == RepoKind::Model && globs.is_empty() {
        let has_safetensors = chosen.iter().any(|f| f.name.ends_with(".safetensors"));
        let has_pickle = files.iter().any(|f| {
            f.name.ends_with(".bin") || f.name.ends_with(".pt") || f.name.ends_with(".pth")
        });
        if !has_safetensors && has_pickle {
            return Err(SelectError::PickleOnly {
                repo: repo.to_string(),
            });
        }
    }
    if chosen.is_empty() {
        let listed: Vec<&str> = files.iter().map(|f| f.name.as_str()).take(20).collect();
        return Err(SelectError::NoMatch {
            repo: repo.to_string(),
            patterns: patterns.join(", "),
            listed: listed.join(", "),
        });
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        let r = HubRepo::parse("hf://meta-llama/Llama-2-7b-hf").unwrap();
        assert_eq!(
            (r.kind, r.repo.as_str(), r.revision.clone()),
            (RepoKind::Model, "meta-llama/Llama-2-7b-hf", None)
        );
        assert!(!r.is_pinned());
        let r = HubRepo::parse(&format!(
            "hf://datasets/tatsu-lab/alpaca@{}",
            "a".repeat(40)
        ))
        .unwrap();
        assert_eq!(r.kind, RepoKind::Dataset);
        assert!(r.is_pinned());
        assert!(HubRepo::parse("hf://just-a-name").is_err());
        assert!(HubRepo::parse("hf://a/b@").is_err());
        assert_eq!(
            HubRepo::parse("hf://a/b@refs/pr/1")
                .unwrap()
                .api_url("http://h/"),
            "http://h/api/models/a/b/revision/refs%2Fpr%2F1?blobs=true"
        );
    }

    #[test]
    fn default_selection_refuses_pickle_only_models() {
        let f = |n: &str| HubFile {
            name: n.into(),
            size: None,
            lfs_sha256: None,
        };
        let files = vec![f("config.json"), f("pytorch_model.bin"), f("README.md")];
        let e = select(RepoKind::Model, &files, &[], "x/y")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pickle"), "{e}");
        let files = vec![
            f("config.json"),
            f("model.safetensors"),
            f("README.md"),
            f("tokenizer.json"),
        ];
        let names: Vec<String> = select(RepoKind::Model, &files, &[], "x/y")
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(
            names,
            vec!["config.json", "model.safetensors", "tokenizer.json"]
        );
    }
}

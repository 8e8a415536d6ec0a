//! Where a `download` stage's files come from, and fetching all of them into a directory.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSetBuilder};
use serde::Serialize;

use crate::http::{url_file_name, Client, FetchError, Transfer};
use crate::hub::{self, HubRepo};
use crate::Checksum;

/// Why a `source:` cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error(
        "unsupported source scheme `{0}://` (use hf://, https://, http://, file:// or a path)"
    )]
    Scheme(String),
    #[error("`{0}` is not an hf:// source")]
    NotHub(String),
    #[error("`{0}`: empty revision after `@`")]
    EmptyRevision(String),
    #[error("`{0}`: expected hf://ORG/REPO[@REVISION] (or hf://datasets/ORG/REPO)")]
    HubRepo(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Hub(HubRepo),
    Url(String),
    /// A local file or directory (resolved against the pipeline's directory).
    Local(PathBuf),
}

/// One fetched file.
#[derive(Debug, Clone, Serialize)]
pub struct Fetched {
    pub name: String,
    pub bytes: u64,
    /// Bytes continued from an interrupted earlier attempt.
    #[serde(skip_serializing_if = "is_zero")]
    pub resumed_from: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a fetch resolved and got.
#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    pub source: String,
    /// The commit an hf:// revision resolved to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The ETag of a plain URL (what identifies an unpinned download's content).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    pub files: Vec<Fetched>,
}

/// Everything besides the source that decides what is fetched.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Globs selecting files (hf:// and local directories).
    pub files: Vec<String>,
    /// File name → expected digest.
    pub checksums: BTreeMap<String, Checksum>,
    /// The name to store a URL's file under (default: the URL path's last segment).
    pub file_name: Option<String>,
    /// The Hub's address (HF_ENDPOINT); not part of any key.
    pub endpoint: String,
}

impl Source {
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, SourceError> {
        if text.starts_with("hf://") {
            return HubRepo::parse(text).map(Source::Hub);
        }
        if text.starts_with("http://") || text.starts_with("https://") {
            return Ok(Source::Url(text.to_string()));
        }
        if let Some((scheme, _)) = text.split_once("://") {
            if scheme != "file" {
                return Err(SourceError::Scheme(scheme.to_string()));
            }
        }
        let p = Path::new(text.strip_prefix("file://").unwrap_or(text));
        Ok(Source::Local(if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        }))
    }

    /// Whether the source names fixed content: a commit, or a file with a checksum.
    pub fn pinned(&self, opts: &FetchOptions) -> bool {
        match self {
            Source::Hub(r) => r.is_pinned(),
            Source::Url(_) => !opts.checksums.is_empty(),
            Source::Local(_) => true, // hashed by content as an input
        }
    }
}

/// Fetches `source` into `out`, keeping partial downloads in `work`.
pub fn fetch(
    source: &Source,
    text: &str,
    opts: &FetchOptions,
    client: &Client,
    out: &Path,
    work: &Path,
    transfer: &dyn Transfer,
) -> Result<FetchReport, FetchError> {
    let mut report = FetchReport {
        source: text.to_string(),
        revision: None,
        etag: None,
        files: Vec::new(),
    };
    match source {
        Source::Url(url) => {
            let name = opts
                .file_name
                .clone()
                .or_else(|| url_file_name(url))
                .ok_or_else(|| FetchError::Invalid {
                    what: url.clone(),
                    detail: "the URL does not end in a file name; set `file_name:`".into(),
                })?;
            let dest = out.join(safe_name(&name, text, "the name to store the file under")?);
            let d = client.download(url, &dest, work, None, "check the URL", transfer)?;
            verify(opts, &name, &dest, None, work)?;
            report.etag = d.etag;
            report.files.push(Fetched {
                name,
                bytes: d.bytes,
                resumed_from: d.resumed_from,
            });
        }
        Source::Hub(repo) => {
            let (commit, listed) = repo.resolve(client, &opts.endpoint)?;
            // Every listed name is checked before anything is written, not only the chosen:
            // a listing with one hostile name is not to be trusted with the others.
            for f in &listed {
                safe_name(
                    &f.name,
                    text,
                    &format!("a file in the file list of {}@{commit}", repo.repo),
                )?;
            }
            let chosen =
                hub::select(repo.kind, &listed, &opts.files, &repo.repo).map_err(|source| {
                    FetchError::Select {
                        what: text.to_string(),
                        source,
                    }
                })?;
            let total: u64 = chosen.iter().filter_map(|f| f.size).sum();
            let mut offset = 0;
            for f in &chosen {
                let url = repo.file_url(&opts.endpoint, &commit, &f.name);
                let dest = out.join(&f.name);
                let sub = Offset {
                    inner: transfer,
                    offset,
                    total,
                };
                let help = format!(
                    "the file `{}` is listed in {}@{commit} but could not be fetched",
                    f.name, repo.repo
                );
                let d = client.download(
                    &url,
                    &dest,
                    &work.join(sanitize(&f.name)),
                    f.size,
                    &help,
                    &sub,
                )?;
                verify(opts, &f.name, &dest, f.lfs_sha256.as_deref(), work)?;
                offset += d.bytes;
                report.files.push(Fetched {
                    name: f.name.clone(),
                    bytes: d.bytes,
                    resumed_from: d.resumed_from,
                });
            }
            report.revision = Some(commit);
        }
        Source::Local(path) => {
            let meta = fs::metadata(path).map_err(|e| FetchError::Invalid {
                what: path.display().to_string(),
                detail: e.to_string(),
            })?;
            let files: Vec<(String, PathBuf)> = if meta.is_file() {
                let name = opts.file_name.clone().unwrap_or_else(|| {
                    path.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                });
                safe_name(&name, text, "the name to store the file under")?;
                vec![(name, path.clone())]
            } else {
                local_files(path, &opts.files)?
            };
            let total: u64 = files
                .iter()
                .filter_map(|(_, p)| p.metadata().ok())
                .map(|m| m.len())
                .sum();
            let mut done = 0;
            for (name, p) in files {
                if transfer.cancelled() {
                    return Err(FetchError::Interrupted);
                }
                let dest = out.join(&name);
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent)?;
                }
                let bytes = fs::copy(&p, &dest)?;
                verify(opts, &name, &dest, None, work)?;
                done += bytes;
                transfer.progress(done, Some(total));
                report.files.push(Fetched {
                    name,
                    bytes,
                    resumed_from: 0,
                });
            }
        }
    }
    for name in opts.checksums.keys() {
        if !report.files.iter().any(|f| &f.name == name) {
            return Err(FetchError::Invalid {
                what: text.to_string(),
                detail: format!("a checksum is given for `{name}`, which was not fetched"),
            });
        }
    }
    Ok(report)
}

/// Checks a fetched file against its declared checksum and the Hub's LFS sha256. A bad file is
/// removed (so it never reaches the store) along with its partial, so a retry starts clean.
fn verify(
    opts: &FetchOptions,
    name: &str,
    dest: &Path,
    lfs_sha256: Option<&str>,
    _work: &Path,
) -> Result<(), FetchError> {
    let mut checks: Vec<(Checksum, &str)> = Vec::new();
    if let Some(c) = opts.checksums.get(name) {
        checks.push((c.clone(), "the pipeline"));
    }
    if let Some(sha) = lfs_sha256 {
        checks.push((
            Checksum::Sha256(sha.to_ascii_lowercase()),
            "the Hub's LFS record",
        ));
    }
    for (c, from) in checks {
        if let Err(e) = c.verify(dest, name) {
            let _ = fs::remove_file(dest);
            return Err(match e {
                FetchError::Checksum {
                    what,
                    algo,
                    expected,
                    actual,
                } => FetchError::Checksum {
                    what: format!("{what} (expected digest from {from})"),
                    algo,
                    expected,
                    actual,
                },
                other => other,
            });
        }
    }
    Ok(())
}

fn local_files(dir: &Path, globs: &[String]) -> Result<Vec<(String, PathBuf)>, FetchError> {
    let mut set = GlobSetBuilder::new();
    for g in globs {
        set.add(Glob::new(g).map_err(|e| FetchError::Invalid {
            what: g.clone(),
            detail: e.to_string(),
        })?);
    }
    let set = set.build().map_err(|e| FetchError::Invalid {
        what: "files".into(),
        detail: e.to_string(),
    })?;
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let rel_name = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = fs::metadata(e.path())?;
            if meta.is_dir() {
                stack.push((e.path(), rel_name));
            } else if globs.is_empty() || set.is_match(&rel_name) {
                out.push((rel_name, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `name` as a path inside the output directory, or an error that names it, the source and
/// `what` it is.
fn safe_name<'a>(name: &'a str, source: &str, what: &str) -> Result<&'a Path, FetchError> {
    pipe_core::relpath::relative_path(name).map_err(|e| FetchError::Invalid {
        what: source.to_string(),
        detail: format!("{what}: {e}; pipe wrote nothing, since such a name could put a file outside the stage's outputs"),
    })
}

fn sanitize(name: &str) -> String {
    name.replace('/', "__")
}

/// Progress of one file reported as part of a multi-file total.
struct Offset<'a> {
    inner: &'a dyn Transfer,
    offset: u64,
    total: u64,
}

impl Transfer for Offset<'_> {
    fn progress(&self, done: u64, total: Option<u64>) {
        let all = if self.total > 0 {
            Some(self.total)
        } else {
            total.map(|t| t + self.offset)
        };
        self.inner.progress(self.offset + done, all);
    }
    fn cancelled(&self) -> bool {
        self.inner.cancelled()
    }
}

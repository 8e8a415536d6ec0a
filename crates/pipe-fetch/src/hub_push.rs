//! Uploads a directory to a Hugging Face Hub model repository as one commit
//! (`push: hf://ORG/REPO[@BRANCH]`), through the Hub's own HTTP protocol as `huggingface_hub`'s
//! `upload_folder` speaks it:
//!
//! 1. the branch's file list (`/api/models/…/revision/BRANCH?blobs=true`): files whose bytes
//!    the branch already holds (same sha256 for LFS files, same git blob id for others) are
//!    not sent again, and when every file is there, there is no commit at all;
//! 2. a missing repository is created (`/api/repos/create`), a missing branch is made from
//!    `main` (`/api/models/…/branch/BRANCH`);
//! 3. `preupload` says which files go through LFS; their objects go through the LFS batch API
//!    (`basic` or `multipart` transfers, then `verify`), which skips objects the Hub already
//!    has — so an upload cut short resumes with what is missing;
//! 4. one NDJSON commit names every changed file (small files inline, base64; LFS files by
//!    sha256).
//!
//! The token (`HF_TOKEN`) goes to the Hub's origin only — not to an LFS storage URL of another
//! host — and is never logged. Files on the Hub that the directory does not have are left
//! alone (a model card written on the Hub stays).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{json, Value};
use sha1::Digest as _;

use crate::http::{Body, Client, FetchError};

/// `hf://ORG/REPO[@BRANCH]`: where a push goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubTarget {
    /// `ORG/REPO`.
    pub repo: String,
    pub branch: String,
}

impl HubTarget {
    pub fn parse(text: &str) -> Result<HubTarget, String> {
        let rest = text.strip_prefix("hf://").ok_or_else(|| {
            format!("`{text}` is not a Hub repository: write hf://ORG/REPO[@BRANCH]")
        })?;
        let (repo, branch) = match rest.split_once('@') {
            Some((r, b)) => (r, b),
            None => (rest, "main"),
        };
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 96
                && !s.starts_with(['.', '-'])
                && !s.contains("..")
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 || !parts.iter().all(|p| name_ok(p)) {
            return Err(format!(
                "`{text}`: a Hub repository is ORG/REPO, each of letters, digits, `-`, `_` and `.`"
            ));
        }
        if parts[0].starts_with("datasets") || parts[0] == "spaces" {
            return Err(format!(
                "`{text}`: pipe pushes models; write hf://ORG/REPO for a model repository"
            ));
        }
        let branch_ok = !branch.is_empty()
            && !branch.contains("..")
            && !branch.starts_with(['/', '-', '.'])
            && !branch.ends_with(['/', '.'])
            && branch
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if !branch_ok {
            return Err(format!("`{text}`: `{branch}` is not a branch name"));
        }
        Ok(HubTarget {
            repo: repo.to_string(),
            branch: branch.to_string(),
        })
    }
}

impl std::fmt::Display for HubTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hf://{}@{}", self.repo, self.branch)
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq)]
pub struct Pushed {
    /// The new commit; `None` when the branch had every file already.
    pub commit: Option<String>,
    /// Files in the commit.
    pub files: usize,
    /// LFS objects sent, and their bytes (objects the Hub had are not sent).
    pub objects_sent: usize,
    pub bytes_sent: u64,
    pub created_repo: bool,
}

/// A file of the directory being pushed.
struct LocalFile {
    /// Its path in the repository (`/`-separated).
    path: String,
    abs: PathBuf,
    size: u64,
    sha256: String,
    /// Git's blob id (sha1 of `blob LEN\0` + bytes): what the Hub lists for a non-LFS file.
    git_blob: String,
    /// Its first 512 bytes, which preupload looks at.
    sample: Vec<u8>,
}

/// How the branch holds a file now.
#[derive(Debug, Clone, PartialEq)]
enum RemoteFile {
    Lfs { sha256: String },
    Git { blob: String },
}

/// Uploads every file under `dir` to `target` as one commit with `summary`, creating the
/// repository (private if `private`) or branch if missing; nothing when the branch already has
/// these bytes.
pub fn push_folder(
    client: &Client,
    endpoint: &str,
    target: &HubTarget,
    dir: &Path,
    summary: &str,
    private: bool,
) -> Result<Pushed, FetchError> {
    let endpoint = endpoint.trim_end_matches('/');
    let files = local_files(dir)?;
    let mut created_repo = false;
    let remote = match remote_files(client, endpoint, target)? {
        Some(r) => r,
        None => {
            created_repo = ensure_branch(client, endpoint, target, private)?;
            remote_files(client, endpoint, target)?.ok_or_else(|| FetchError::Invalid {
                what: target.to_string(),
                detail: "the Hub does not list the branch it just made".into(),
            })?
        }
    };
    let changed: Vec<&LocalFile> = files
        .iter()
        .filter(|f| {
            !matches!(remote.get(&f.path), Some(RemoteFile::Lfs { sha256 }) if *sha256 == f.sha256)
                && !matches!(remote.get(&f.path), Some(RemoteFile::Git { blob }) if *blob == f.git_blob)
        })
        .collect();
    if changed.is_empty() {
        return Ok(Pushed {
            commit: None,
            files: 0,
            objects_sent: 0,
            bytes_sent: 0,
            created_repo,
        });
    }
    let modes = preupload(client, endpoint, target, &changed)?;
    let changed: Vec<&LocalFile> = changed
        .into_iter()
        .filter(|f| modes.get(&f.path).is_some_and(|m| m.is_some()))
        .collect();
    let lfs: Vec<&LocalFile> = changed
        .iter()
        .copied()
        .filter(|f| modes.get(&f.path) == Some(&Some(true)))
        .collect();
    let (objects_sent, bytes_sent) = upload_lfs(client, endpoint, target, &lfs)?;
    let commit = commit(client, endpoint, target, summary, &changed, &modes)?;
    Ok(Pushed {
        commit: Some(commit),
        files: changed.len(),
        objects_sent,
        bytes_sent,
        created_repo,
    })
}

/// A path segment with everything but `[A-Za-z0-9._-]` percent-encoded (a branch `a/b` is
/// one segment).
fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn api(endpoint: &str, target: &HubTarget, what: &str) -> String {
    format!(
        "{endpoint}/api/models/{}/{what}/{}",
        target.repo,
        segment(&target.branch)
    )
}

/// Every file under `dir`, in path order, hashed.
fn local_files(dir: &Path) -> Result<Vec<LocalFile>, FetchError> {
    let mut paths = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                paths.push(entry.path());
            }
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|abs| {
            let rel = abs.strip_prefix(dir).expect("under dir");
            let path = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            let size = std::fs::metadata(&abs)?.len();
            let mut sha256 = sha2::Sha256::new();
            let mut git = sha1::Sha1::new();
            git.update(format!("blob {size}\0").as_bytes());
            let mut sample = Vec::new();
            let mut f = File::open(&abs)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                if sample.len() < 512 {
                    let take = (512 - sample.len()).min(n);
                    sample.extend_from_slice(&buf[..take]);
                }
                sha2::Digest::update(&mut sha256, &buf[..n]);
                git.update(&buf[..n]);
            }
            Ok(LocalFile {
                path,
                abs,
                size,
                sha256: hex::encode(sha2::Digest::finalize(sha256)),
                git_blob: hex::encode(git.finalize()),
                sample,
            })
        })
        .collect()
}

/// The branch's files, or `None` when the repository or the branch does not exist.
fn remote_files(
    client: &Client,
    endpoint: &str,
    target: &HubTarget,
) -> Result<Option<BTreeMap<String, RemoteFile>>, FetchError> {
    let url = format!("{}?blobs=true", api(endpoint, target, "revision"));
    let info: Value = match client.get_json(&url, "") {
        Ok(v) => v,
        Err(FetchError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut files = BTreeMap::new();
    for s in info["siblings"].as_array().into_iter().flatten() {
        let Some(name) = s["rfilename"].as_str() else {
            continue;
        };
        let file = match (s["lfs"]["sha256"].as_str(), s["blobId"].as_str()) {
            (Some(sha256), _) => RemoteFile::Lfs {
                sha256: sha256.to_string(),
            },
            (None, Some(blob)) => RemoteFile::Git {
                blob: blob.to_string(),
            },
            // Unknown bytes: sent again.
            (None, None) => continue,
        };
        files.insert(name.to_string(), file);
    }
    Ok(Some(files))
}

/// Creates the repository if it does not exist, then the branch if it is not `main` and does
/// not exist. True if the repository was created.
fn ensure_branch(
    client: &Client,
    endpoint: &str,
    target: &HubTarget,
    private: bool,
) -> Result<bool, FetchError> {
    let (org, name) = target.repo.split_once('/').expect("parsed as ORG/REPO");
    let body = json!({"name": name, "organization": org, "type": "model", "private": private});
    let created = match client.send(
        "POST",
        &format!("{endpoint}/api/repos/create"),
        &[],
        Body::Json(&body),
    ) {
        Ok(_) => true,
        Err(FetchError::Http { status: 409, .. }) => false,
        Err(e) => return Err(e),
    };
    if target.branch != "main" {
        match client.send(
            "POST",
            &api(endpoint, target, "branch"),
            &[],
            Body::Json(&json!({})),
        ) {
            Ok(_) | Err(FetchError::Http { status: 409, .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

fn read_json(resp: ureq::Response, url: &str) -> Result<Value, FetchError> {
    let mut body = String::new();
    resp.into_reader()
        .take(64 << 20)
        .read_to_string(&mut body)?;
    serde_json::from_str(&body).map_err(|e| FetchError::Invalid {
        what: url.to_string(),
        detail: format!("unexpected response: {e}"),
    })
}

/// Path → `Some(true)` for LFS, `Some(false)` for a regular file, `None` for a file the Hub
/// ignores (its .gitignore).
fn preupload(
    client: &Client,
    endpoint: &str,
    target: &HubTarget,
    files: &[&LocalFile],
) -> Result<BTreeMap<String, Option<bool>>, FetchError> {
    let url = api(endpoint, target, "preupload");
    let mut modes = BTreeMap::new();
    // The Hub takes a bounded number of files per request.
    for chunk in files.chunks(256) {
        let body = json!({"files": chunk.iter().map(|f| json!({
            "path": f.path,
            "size": f.size,
            "sample": base64::engine::general_purpose::STANDARD.encode(&f.sample),
        })).collect::<Vec<_>>()});
        let answer = read_json(client.send("POST", &url, &[], Body::Json(&body))?, &url)?;
        for f in answer["files"].as_array().into_iter().flatten() {
            let Some(path) = f["path"].as_str() else {
                continue;
            };
            let mode = if f["shouldIgnore"].as_bool() == Some(true) {
                None
            } else {
                Some(f["uploadMode"].as_str() == Some("lfs"))
            };
            modes.insert(path.to_string(), mode);
        }
    }
    if let Some(missing) = files.iter().find(|f| !modes.contains_key(&f.path)) {
        return Err(FetchError::Invalid {
            what: url,
            detail: format!("the Hub said nothing of `{}`", missing.path),
        });
    }
    Ok(modes)
}

/// Sends the LFS objects the Hub lacks: (objects, bytes) sent.
fn upload_lfs(
    client: &Client,
    endpoint: &str,
    target: &HubTarget,
    files: &[&LocalFile],
) -> Result<(usize, u64), FetchError> {
    if files.is_empty() {
        return Ok((0, 0));
    }
    let url = format!("{endpoint}/{}.git/info/lfs/objects/batch", target.repo);
    let lfs_json = "application/vnd.git-lfs+json";
    let body = json!({
        "operation": "upload",
        "transfers": ["basic", "multipart"],
        "objects": files.iter().map(|f| json!({"oid": f.sha256, "size": f.size})).collect::<Vec<_>>(),
        "hash_algo": "sha256",
        "ref": {"name": format!("refs/heads/{}", target.branch)},
    });
    let bytes = serde_json::to_vec(&body).expect("serialisable");
    let answer = read_json(
        client.send(
            "POST",
            &url,
            &[("Accept", lfs_json)],
            Body::Bytes(lfs_json, &bytes),
        )?,
        &url,
    )?;
    let by_oid: BTreeMap<&str, &LocalFile> =
        files.iter().map(|f| (f.sha256.as_str(), *f)).collect();
    let (mut objects, mut sent) = (0, 0);
    for o in answer["objects"].as_array().into_iter().flatten() {
        let oid = o["oid"].as_str().unwrap_or_default();
        let Some(file) = by_oid.get(oid) else {
            continue;
        };
        if let Some(err) = o.get("error") {
            return Err(FetchError::Invalid {
                what: format!("LFS upload of {}", file.path),
                detail: err["message"].as_str().unwrap_or("refused").to_string(),
            });
        }
        // No upload action: the Hub has this object already.
        let Some(upload) = o["actions"].get("upload") else {
            continue;
        };
        let href = upload["href"].as_str().unwrap_or_default();
        let header = upload["header"].as_object().cloned().unwrap_or_default();
        match header
            .get("chunk_size")
            .and_then(|c| c.as_str()?.parse::<u64>().ok())
        {
            Some(chunk) => upload_parts(client, file, href, &header, chunk)?,
            None => {
                let headers: Vec<(&str, &str)> = header
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
                    .collect();
                client.send(
                    "PUT",
                    href,
                    &headers,
                    Body::File {
                        path: &file.abs,
                        offset: 0,
                        len: file.size,
                    },
                )?;
            }
        }
        if let Some(verify) = o["actions"].get("verify") {
            let headers: Vec<(&str, &str)> = verify["header"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
                .collect();
            let body = serde_json::to_vec(&json!({"oid": file.sha256, "size": file.size}))
                .expect("serialisable");
            client.send(
                "POST",
                verify["href"].as_str().unwrap_or_default(),
                &headers,
                Body::Bytes(lfs_json, &body),
            )?;
        }
        objects += 1;
        sent += file.size;
    }
    Ok((objects, sent))
}

/// A multipart LFS transfer: each part to its own URL (the header's `00001`, `00002`, …),
/// then the list of parts and their ETags to `href`.
fn upload_parts(
    client: &Client,
    file: &LocalFile,
    href: &str,
    header: &serde_json::Map<String, Value>,
    chunk: u64,
) -> Result<(), FetchError> {
    let mut part_urls: Vec<(u32, &str)> = header
        .iter()
        .filter_map(|(k, v)| Some((k.parse::<u32>().ok()?, v.as_str()?)))
        .collect();
    part_urls.sort();
    if chunk == 0 || (part_urls.len() as u64) < file.size.div_ceil(chunk) {
        return Err(FetchError::Invalid {
            what: format!("LFS upload of {}", file.path),
            detail: "the Hub's multipart plan does not cover the file".into(),
        });
    }
    let mut parts = Vec::new();
    for (n, url) in part_urls {
        let offset = (n as u64 - 1) * chunk;
        if offset >= file.size {
            break;
        }
        let resp = client.send(
            "PUT",
            url,
            &[],
            Body::File {
                path: &file.abs,
                offset,
                len: chunk.min(file.size - offset),
            },
        )?;
        let etag = resp.header("ETag").unwrap_or_default().to_string();
        parts.push(json!({"partNumber": n, "etag": etag}));
    }
    let body = json!({"oid": file.sha256, "parts": parts});
    client.send("POST", href, &[], Body::Json(&body))?;
    Ok(())
}

/// The commit of `files` (LFS ones by sha256, the others inline): its id.
fn commit(
    client: &Client,
    endpoint: &str,
    target: &HubTarget,
    summary: &str,
    files: &[&LocalFile],
    modes: &BTreeMap<String, Option<bool>>,
) -> Result<String, FetchError> {
    let mut lines =
        vec![json!({"key": "header", "value": {"summary": summary, "description": ""}})];
    for f in files {
        if modes.get(&f.path) == Some(&Some(true)) {
            lines.push(json!({"key": "lfsFile", "value": {
                "path": f.path, "algo": "sha256", "oid": f.sha256, "size": f.size,
            }}));
        } else {
            let content = std::fs::read(&f.abs)?;
            lines.push(json!({"key": "file", "value": {
                "path": f.path,
                "encoding": "base64",
                "content": base64::engine::general_purpose::STANDARD.encode(content),
            }}));
        }
    }
    let mut body = Vec::new();
    for l in lines {
        serde_json::to_writer(&mut body, &l).expect("serialisable");
        body.push(b'\n');
    }
    let url = api(endpoint, target, "commit");
    let answer = read_json(
        client.send(
            "POST",
            &url,
            &[],
            Body::Bytes("application/x-ndjson", &body),
        )?,
        &url,
    )?;
    answer["commitOid"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| FetchError::Invalid {
            what: url,
            detail: "the Hub answered the commit without its id".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked_before_any_request() {
        assert_eq!(
            HubTarget::parse("hf://org/model").unwrap(),
            HubTarget {
                repo: "org/model".into(),
                branch: "main".into()
            }
        );
        assert_eq!(
            HubTarget::parse("hf://org/model@exp/v1").unwrap().branch,
            "exp/v1"
        );
        for bad in [
            "org/model",
            "hf://org",
            "hf://org/a/b",
            "hf://../x",
            "hf://org/..",
            "hf://org/m@",
            "hf://org/m@../x",
            "hf://org/m o",
            "hf://datasets/x",
        ] {
            assert!(HubTarget::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(segment("exp/v1"), "exp%2Fv1");
    }
}

//! Resumable HTTP downloads: a partial file and its validator live in a work directory;
//! a retry or a later run continues it with `Range` (guarded by `If-Range`), with back-off on
//! transient errors.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach {host}: {detail}\n  = help: check the network connection (or proxy settings); for the Hugging Face Hub, HF_ENDPOINT can name a mirror, or point `source:` at a local copy")]
    Unreachable { host: String, detail: String },
    #[error("{url}: HTTP {status} — access denied\n  = help: {help}")]
    Denied {
        url: String,
        status: u16,
        help: String,
    },
    #[error("{url}: HTTP 404 — not found\n  = help: {help}")]
    NotFound { url: String, help: String },
    #[error("{url}: HTTP {status}{detail}")]
    Http {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{url}: the transfer failed after {attempts} attempts: {detail}")]
    GaveUp {
        url: String,
        attempts: u32,
        detail: String,
    },
    #[error("checksum mismatch for {what}: expected {algo} {expected}, got {actual}; the file was not stored")]
    Checksum {
        what: String,
        algo: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reports transfer progress: bytes done, total if known.
pub trait Transfer {
    fn progress(&self, done: u64, total: Option<u64>);
    fn cancelled(&self) -> bool;
}

/// What a finished download was.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Download {
    pub url: String,
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Bytes that came from an earlier, interrupted attempt.
    pub resumed_from: u64,
}

/// What is remembered about a partial file, so that it is only continued against the same
/// remote file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct PartialMeta {
    url: String,
    etag: Option<String>,
    last_modified: Option<String>,
}

/// An HTTP client with the project's policies: timeouts, retries with back-off, auth header
/// only for its own host, messages that say what to do.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    pub retries: u32,
    pub backoff: Duration,
    /// `Authorization: Bearer …` sent to URLs on this host (the Hub endpoint) only.
    auth: Option<(String, String)>,
}

impl Client {
    pub fn new() -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(20))
            .timeout_read(Duration::from_secs(60))
            .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
            .user_agent(concat!("pipe/", env!("CARGO_PKG_VERSION")))
            .build();
        Client {
            agent,
            retries: 5,
            backoff: Duration::from_millis(500),
            auth: None,
        }
    }

    /// Sends `token` as a bearer token to `host` (never to other hosts, never logged).
    pub fn with_token(mut self, host: &str, token: Option<String>) -> Self {
        self.auth = token
            .filter(|t| !t.is_empty())
            .map(|t| (host.to_string(), t));
        self
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let mut req = self.agent.request(method, url);
        if let Some((host, token)) = &self.auth {
            if host_of(url) == *host {
                req = req.set("Authorization", &format!("Bearer {token}"));
            }
        }
        req
    }

    /// GET `url` and parse its JSON body, with retries.
    pub fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        not_found_help: &str,
    ) -> Result<T, FetchError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.request("GET", url).call() {
                Ok(resp) => {
                    let mut body = String::new();
                    match resp.into_reader().take(64 << 20).read_to_string(&mut body) {
                        Ok(_) => {
                            return serde_json::from_str(&body).map_err(|e| FetchError::Invalid {
                                what: url.to_string(),
                                detail: format!("unexpected response: {e}"),
                            })
                        }
                        Err(e) if attempt <= self.retries => {
                            tracing::debug!("{url}: {e}; retrying");
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => {
                    let err = classify(url, e, not_found_help);
                    if !retryable(&err) || attempt > self.retries {
                        return Err(err);
                    }
                    tracing::debug!("{err}; retrying");
                }
            }
            std::thread::sleep(self.backoff_for(attempt));
        }
    }

    fn backoff_for(&self, attempt: u32) -> Duration {
        (self.backoff * 2u32.saturating_pow(attempt.saturating_sub(1))).min(Duration::from_secs(16))
    }

    /// Downloads `url` to `dest`, keeping the partial file in `work` so that a failure or a
    /// kill is continued later with an HTTP Range request. `dest` appears only when complete.
    pub fn download(
        &self,
        url: &str,
        dest: &Path,
        work: &Path,
        expected_size: Option<u64>,
        not_found_help: &str,
        transfer: &dyn Transfer,
    ) -> Result<Download, FetchError> {
        fs::create_dir_all(work)?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let part = work.join(format!("{name}.part"));
        let meta_path = work.join(format!("{name}.part.json"));
        let mut meta: PartialMeta = fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|m: &PartialMeta| m.url == url)
            .unwrap_or_default();
        if meta.url != url && part.exists() {
            fs::remove_file(&part)?; // a partial of some other file
        }
        meta.url = url.to_string();
        let resumed_from = part.metadata().map(|m| m.len()).unwrap_or(0);
        let mut attempt = 0;
        loop {
            if transfer.cancelled() {
                return Err(FetchError::Interrupted);
            }
            attempt += 1;
            match self.try_download(
                url,
                &part,
                &meta_path,
                &mut meta,
                expected_size,
                not_found_help,
                transfer,
            ) {
                Ok(total) => {
                    if let Some(parent) = dest.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    fs::rename(&part, dest)?;
                    let _ = fs::remove_file(&meta_path);
                    return Ok(Download {
                        url: url.to_string(),
                        bytes: total,
                        etag: meta.etag.clone(),
                        resumed_from,
                    });
                }
                Err(FetchError::Interrupted) => return Err(FetchError::Interrupted),
                Err(e) if retryable(&e) && attempt <= self.retries => {
                    tracing::warn!(
                        "{e}; retrying (attempt {} of {})",
                        attempt + 1,
                        self.retries + 1
                    );
                }
                Err(e) if retryable(&e) => {
                    return Err(FetchError::GaveUp {
                        url: url.to_string(),
                        attempts: attempt,
                        detail: e.to_string(),
                    })
                }
                Err(e) => return Err(e),
            }
            std::thread::sleep(self.backoff_for(attempt));
        }
    }

    /// One attempt: continues `part` where it ends. Returns the complete size.
    #[allow(clippy::too_many_arguments)]
    fn try_download(
        &self,
        url: &str,
        part: &Path,
        meta_path: &Path,
        meta: &mut PartialMeta,
        expected_size: Option<u64>,
        not_found_help: &str,
        transfer: &dyn Transfer,
    ) -> Result<u64, FetchError> {
        let have = part.metadata().map(|m| m.len()).unwrap_or(0);
        if let Some(size) = expected_size {
            if have == size && size > 0 {
                return Ok(size);
            }
            if have > size {
                fs::remove_file(part)?;
                return self.try_download(
                    url,
                    part,
                    meta_path,
                    meta,
                    expected_size,
                    not_found_help,
                    transfer,
                );
            }
        }
        let mut req = self.request("GET", url);
        if have > 0 {
            req = req.set("Range", &format!("bytes={have}-"));
            // Continue only if the remote file is the one the partial came from.
            if let Some(v) = meta.etag.as_ref().or(meta.last_modified.as_ref()) {
                req = req.set("If-Range", v);
            }
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(416, _)) if have > 0 => {
                // The partial already holds the whole file (or a different one): start over
                // unless its size is the expected one.
                fs::remove_file(part)?;
                return Err(FetchError::Http {
                    url: url.to_string(),
                    status: 416,
                    detail: " (range not satisfiable; restarting)".into(),
                });
            }
            Err(e) => return Err(classify(url, e, not_found_help)),
        };
        let status = resp.status();
        let etag = resp.header("ETag").map(str::to_string);
        let last_modified = resp.header("Last-Modified").map(str::to_string);
        let content_length: Option<u64> =
            resp.header("Content-Length").and_then(|v| v.parse().ok());
        let (mut file, mut done) = if status == 206 {
            let start = resp
                .header("Content-Range")
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if start != Some(have) {
                fs::remove_file(part)?;
                return Err(FetchError::Http {
                    url: url.to_string(),
                    status,
                    detail: " (unexpected Content-Range; restarting)".into(),
                });
            }
            (OpenOptions::new().append(true).open(part)?, have)
        } else {
            (File::create(part)?, 0)
        };
        if status != 206 || meta.etag.is_none() {
            meta.etag = etag;
            meta.last_modified = last_modified;
            fs::write(
                meta_path,
                serde_json::to_vec(meta).expect("meta serialises"),
            )?;
        }
        let total = content_length.map(|l| l + done).or(expected_size);
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 256 << 10];
        transfer.progress(done, total);
        loop {
            if transfer.cancelled() {
                file.flush()?;
                return Err(FetchError::Interrupted);
            }
            let n = match reader.read(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    file.flush()?;
                    return Err(FetchError::Http {
                        url: url.to_string(),
                        status,
                        detail: format!(" (connection lost after {done} bytes: {e})"),
                    });
                }
            };
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])?;
            done += n as u64;
            transfer.progress(done, total);
        }
        file.sync_all()?;
        if let Some(t) = total {
            if done > t {
                fs::remove_file(part)?;
                return Err(FetchError::Invalid {
                    what: url.to_string(),
                    detail: format!("received {done} bytes, but {t} were announced"),
                });
            }
            if done < t {
                return Err(FetchError::Http {
                    url: url.to_string(),
                    status,
                    detail: format!(" (connection closed after {done} of {t} bytes)"),
                });
            }
        }
        Ok(done)
    }
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

fn retryable(e: &FetchError) -> bool {
    match e {
        // 0: a transport failure; 200/206: the connection broke mid-body; 416: a bad partial.
        FetchError::Http { status, .. } => {
            *status == 0 || *status >= 500 || matches!(*status, 429 | 200 | 206 | 416)
        }
        FetchError::Unreachable { .. } => false,
        FetchError::Io(_) => true,
        _ => false,
    }
}

/// Turns a ureq error into one that says what happened and what to do.
fn classify(url: &str, e: ureq::Error, not_found_help: &str) -> FetchError {
    match e {
        ureq::Error::Status(status @ (401 | 403), _) => FetchError::Denied {
            url: url.to_string(),
            status,
            help: "the file is private or gated: accept its terms on the Hub if it has any, and set HF_TOKEN to a token with read access".into(),
        },
        ureq::Error::Status(404, _) => FetchError::NotFound {
            url: url.to_string(),
            help: not_found_help.to_string(),
        },
        ureq::Error::Status(status, resp) => {
            let mut body = String::new();
            let _ = resp.into_reader().take(300).read_to_string(&mut body);
            FetchError::Http {
                url: url.to_string(),
                status,
                detail: if body.trim().is_empty() { String::new() } else { format!(": {}", body.trim()) },
            }
        }
        ureq::Error::Transport(t) => match t.kind() {
            ureq::ErrorKind::Dns | ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::ProxyConnect => {
                FetchError::Unreachable {
                    host: host_of(url),
                    detail: t.to_string(),
                }
            }
            ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => FetchError::Invalid {
                what: url.to_string(),
                detail: t.to_string(),
            },
            _ => FetchError::Http {
                url: url.to_string(),
                status: 0,
                detail: format!(" ({t})"),
            },
        },
    }
}

/// `host[:port]` of a URL.
pub fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split(['/', '?', '#'])
        .next()
        .unwrap_or("")
        .rsplit('@')
        .next()
        .unwrap_or("")
        .to_string()
}

/// The file name a URL's path ends with.
pub fn url_file_name(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next()?;
    let path = path.split_once("://").map(|(_, r)| r).unwrap_or(path);
    let (_, path) = path.split_once('/')?;
    let name = path.rsplit('/').next()?;
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_names() {
        assert_eq!(
            host_of("https://huggingface.co/api/models/x"),
            "huggingface.co"
        );
        assert_eq!(host_of("http://127.0.0.1:8080/a"), "127.0.0.1:8080");
        assert_eq!(
            url_file_name("https://e.org/a/b/data.json?x=1"),
            Some("data.json".into())
        );
        assert_eq!(url_file_name("https://e.org/"), None);
    }
}

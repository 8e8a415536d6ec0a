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
    /// No files can be chosen from the source's file list (the source says why).
    #[error("{what}")]
    Select {
        what: String,
        #[source]
        source: crate::hub::SelectError,
    },
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
    /// Set when a partial was thrown away, so the download does not claim it resumed.
    #[serde(skip)]
    restarted: bool,
}

/// The origin of a URL: scheme, host and port (the scheme's default port when none is
/// written), the unit a credential is sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl Origin {
    pub fn of(url: &str) -> Result<Self, FetchError> {
        let parsed = url::Url::parse(url).map_err(|e| FetchError::Invalid {
            what: url.to_string(),
            detail: format!("not a URL: {e}"),
        })?;
        Ok(Origin {
            scheme: parsed.scheme().to_string(),
            host: parsed.host_str().unwrap_or_default().to_ascii_lowercase(),
            port: parsed.port_or_known_default(),
        })
    }
}

/// What [`Client::send`] sends.
pub(crate) enum Body<'a> {
    Json(&'a serde_json::Value),
    /// A content type and the bytes.
    Bytes(&'a str, &'a [u8]),
    /// `len` bytes of a file from `offset`, streamed.
    File {
        path: &'a Path,
        offset: u64,
        len: u64,
    },
}

/// How many redirects one request follows.
const MAX_REDIRECTS: usize = 10;

/// An HTTP client with the project's policies: timeouts, retries with back-off, an auth
/// header only for its own origin, messages that say what to do.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    pub retries: u32,
    pub backoff: Duration,
    /// `Authorization: Bearer …` sent to URLs of this origin (the Hub endpoint) only.
    auth: Option<(Origin, String)>,
}

impl Client {
    pub fn new() -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(20))
            .timeout_read(Duration::from_secs(60))
            // Redirects are followed by `call`, which decides per hop whether the token goes.
            .redirects(0)
            .user_agent(concat!("pipe/", env!("CARGO_PKG_VERSION")))
            .build();
        Client {
            agent,
            retries: 5,
            backoff: Duration::from_millis(500),
            auth: None,
        }
    }

    /// Sends `token` as a bearer token to the origin (scheme, host and port) of `endpoint`
    /// only: never to another host, another port of the same host, or over another scheme,
    /// including where a redirect leads. Never logged.
    pub fn with_token(mut self, endpoint: &str, token: Option<String>) -> Result<Self, FetchError> {
        self.auth = match token.filter(|t| !t.is_empty()) {
            Some(t) => Some((Origin::of(endpoint)?, t)),
            None => None,
        };
        Ok(self)
    }

    /// GET `url` with `headers`, following redirects; the token goes only to hops on its
    /// origin. Errors are classified as [`classify`] does, against `url`.
    fn call(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        not_found_help: &str,
    ) -> Result<ureq::Response, FetchError> {
        let mut current = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.agent.get(&current);
            for (name, value) in headers {
                req = req.set(name, value);
            }
            if let Some((origin, token)) = &self.auth {
                if Origin::of(&current).is_ok_and(|o| o == *origin) {
                    req = req.set("Authorization", &format!("Bearer {token}"));
                }
            }
            let resp = req.call().map_err(|e| classify(url, e, not_found_help))?;
            let location = match resp.status() {
                301 | 302 | 303 | 307 | 308 => resp.header("Location").map(str::to_string),
                _ => None,
            };
            let Some(location) = location else {
                return Ok(resp);
            };
            let next = url::Url::parse(&current)
                .and_then(|base| base.join(&location))
                .map_err(|e| FetchError::Invalid {
                    what: url.to_string(),
                    detail: format!("{current} redirects to `{location}`, which is not a URL: {e}"),
                })?;
            tracing::debug!("{current} redirects to {next}");
            current = next.into();
        }
        Err(FetchError::Invalid {
            what: url.to_string(),
            detail: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// `method` `url` with `body` and `headers`, once, following no redirect; the token goes
    /// only to the token's origin. Errors are classified as [`classify`] does; a 401/403 says
    /// that writing needs a token with write access.
    pub(crate) fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
    ) -> Result<ureq::Response, FetchError> {
        let mut req = self.agent.request(method, url);
        for (name, value) in headers {
            req = req.set(name, value);
        }
        if let Some((origin, token)) = &self.auth {
            if Origin::of(url).is_ok_and(|o| o == *origin) {
                req = req.set("Authorization", &format!("Bearer {token}"));
            }
        }
        let sent = match body {
            Body::Json(v) => req
                .set("Content-Type", "application/json")
                .send_bytes(&serde_json::to_vec(v).expect("serialisable")),
            Body::Bytes(content_type, bytes) => {
                req.set("Content-Type", content_type).send_bytes(bytes)
            }
            Body::File { path, offset, len } => {
                let mut f = File::open(path)?;
                std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset))?;
                req.set("Content-Length", &len.to_string())
                    .send(f.take(len))
            }
        };
        sent.map_err(|e| match classify(url, e, "") {
            FetchError::Denied { url, status, .. } => FetchError::Denied {
                url,
                status,
                help: "writing to the Hub needs HF_TOKEN set to a token with write access to this repository".into(),
            },
            other => other,
        })
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
            match self.call(url, &[], not_found_help) {
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
                Err(err) => {
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
                        resumed_from: if meta.restarted { 0 } else { resumed_from },
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
        // Continue only if the remote file is the one the partial came from: a partial
        // without a validator to prove that starts over.
        let validator = meta.validator();
        if have > 0 && validator.is_none() {
            fs::remove_file(part)?;
            meta.restarted = true;
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
        let range = format!("bytes={have}-");
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let (true, Some(v)) = (have > 0, &validator) {
            headers.push(("Range", &range));
            headers.push(("If-Range", v.value()));
        }
        let resp = match self.call(url, &headers, not_found_help) {
            Ok(r) => r,
            Err(FetchError::Http { status: 416, .. }) if have > 0 => {
                // The partial already holds the whole file (or a different one): start over
                // unless its size is the expected one.
                fs::remove_file(part)?;
                return Err(FetchError::Http {
                    url: url.to_string(),
                    status: 416,
                    detail: " (range not satisfiable; restarting)".into(),
                });
            }
            Err(e) => return Err(e),
        };
        let status = resp.status();
        let etag = resp.header("ETag").map(str::to_string);
        let last_modified = resp.header("Last-Modified").map(str::to_string);
        let content_length: Option<u64> =
            resp.header("Content-Length").and_then(|v| v.parse().ok());
        if status == 206 {
            if let Some(sent) = &validator {
                if !sent.matches(etag.as_deref(), last_modified.as_deref()) {
                    // The server ignored If-Range and sent part of another version of the
                    // file; splicing it onto the partial would corrupt it.
                    tracing::warn!(
                        "{url} changed since the partial download ({}); starting over",
                        sent.describe_change(etag.as_deref(), last_modified.as_deref())
                    );
                    drop(resp);
                    fs::remove_file(part)?;
                    *meta = PartialMeta {
                        url: url.to_string(),
                        restarted: true,
                        ..Default::default()
                    };
                    let _ = fs::remove_file(meta_path);
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
        }
        if status != 206 {
            // A whole file: remember what identifies it before writing any of it.
            meta.etag = etag;
            meta.last_modified = last_modified;
            fs::write(
                meta_path,
                serde_json::to_vec(meta).expect("meta serialises"),
            )?;
        }
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

/// What a resumed request sends as `If-Range`: a strong ETag, else the Last-Modified date
/// (a weak ETag cannot be used for ranges).
enum Validator {
    ETag(String),
    LastModified(String),
}

impl Validator {
    fn value(&self) -> &str {
        match self {
            Validator::ETag(v) | Validator::LastModified(v) => v,
        }
    }

    /// Whether a 206 reply is of the version this validator names.
    fn matches(&self, etag: Option<&str>, last_modified: Option<&str>) -> bool {
        match self {
            Validator::ETag(v) => etag == Some(v.as_str()),
            Validator::LastModified(v) => last_modified == Some(v.as_str()),
        }
    }

    fn describe_change(&self, etag: Option<&str>, last_modified: Option<&str>) -> String {
        let (what, sent, got) = match self {
            Validator::ETag(v) => ("ETag", v, etag),
            Validator::LastModified(v) => ("Last-Modified", v, last_modified),
        };
        format!("{what} was {sent}, the reply has {}", got.unwrap_or("none"))
    }
}

impl PartialMeta {
    fn validator(&self) -> Option<Validator> {
        match (&self.etag, &self.last_modified) {
            (Some(e), _) if !e.starts_with("W/") => Some(Validator::ETag(e.clone())),
            (_, Some(d)) => Some(Validator::LastModified(d.clone())),
            _ => None,
        }
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

    #[test]
    fn origins_are_scheme_host_and_port() {
        let o = |u: &str| Origin::of(u).unwrap();
        assert_eq!(
            o("https://huggingface.co"),
            o("https://HuggingFace.co:443/api/x")
        );
        assert_eq!(o("http://127.0.0.1:8080/a"), o("http://127.0.0.1:8080/b?c"));
        assert_ne!(o("http://127.0.0.1:8080"), o("http://127.0.0.1:8081"));
        assert_ne!(o("https://huggingface.co"), o("http://huggingface.co"));
        assert_ne!(o("https://huggingface.co"), o("https://cdn.huggingface.co"));
        assert!(Origin::of("huggingface.co").is_err());
    }
}

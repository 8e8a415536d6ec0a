//! Remote caches on object storage: `s3://` (AWS or any S3-compatible server: MinIO, Ceph,
//! R2), `gs://`, `az://` and `file:///` (a shared file system), through the `object_store`
//! crate, behind pipe-core's [`Remote`] seam. The only crate of pipe with async and network
//! dependencies; the binary wires it in.
//!
//! Which remote a store uses ([`Settings::resolve`]): `--no-remote` wins, then `--remote URL` /
//! `PIPE_REMOTE`, then the store's `remote.yaml` (written by `pipe remote set`). Credentials
//! never appear in any of them: S3 reads the standard `AWS_*` variables (`AWS_ENDPOINT_URL`,
//! `AWS_REGION`, `AWS_ACCESS_KEY_ID`, …) or, failing those, the shared credentials and config
//! files' profile (`AWS_PROFILE`, default `default`); GCS and Azure read theirs
//! (`GOOGLE_*`, `AZURE_*`).

mod aws_profile;
mod settings;

use std::fmt;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};
use pipe_core::remote::{is_digest, Remote, RemoteError};

pub use settings::{Origin, Settings, SettingsError, CONFIG_FILE};

/// Objects at least this large are uploaded in parts (S3's minimum part is 5 MiB).
const MULTIPART_MIN: u64 = 16 << 20;
/// The size of each part of a multipart upload.
const PART_SIZE: usize = 16 << 20;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;
/// How long pipe waits for a connection before it calls the remote unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries of a failed request, and the time they may take, before it is reported.
const RETRIES: usize = 2;
const RETRY_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a remote cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("`{url}` is not a remote cache URL: {why} (use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX or file:///PATH)")]
    BadUrl { url: String, why: String },
    #[error("`{url}`: credentials do not belong in the URL, which is shown in messages and may be saved in remote.yaml; give them in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY, …)")]
    CredentialsInUrl { url: String },
    #[error("cannot open the remote cache {location}: {why}")]
    Backend { location: String, why: String },
}

/// A remote cache on an `object_store` backend, below a prefix.
pub struct ObjectStoreRemote {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    location: String,
    runtime: tokio::runtime::Runtime,
}

impl fmt::Debug for ObjectStoreRemote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStoreRemote")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl ObjectStoreRemote {
    /// Opens the remote at `url`. Nothing is contacted yet: an unreachable remote shows at its
    /// first use (and the run goes on without it).
    pub fn open(url: &str) -> Result<Self, OpenError> {
        let bad = |why: &str| OpenError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(OpenError::CredentialsInUrl {
                url: parsed.scheme().to_string() + "://…",
            });
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(OpenError::CredentialsInUrl {
                url: format!("{}://{}…", parsed.scheme(), parsed.host_str().unwrap_or("")),
            });
        }
        let location = url.trim_end_matches('/').to_string();
        let backend = |e: object_store::Error| OpenError::Backend {
            location: location.clone(),
            why: error_chain(&e),
        };
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match parsed.scheme() {
            "s3" | "s3a" => {
                let bucket = parsed.host_str().ok_or_else(|| bad("no bucket"))?;
                // Client options first: the profile's http:// endpoint allows plain HTTP in them.
                let builder = AmazonS3Builder::from_env().with_client_options(client_options());
                let builder = aws_profile::apply(builder)
                    .with_bucket_name(bucket)
                    .with_retry(retry_config());
                (
                    Arc::new(builder.build().map_err(backend)?),
                    key_prefix(&parsed),
                )
            }
            "gs" => {
                let bucket = parsed.host_str().ok_or_else(|| bad("no bucket"))?;
                let builder = GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(client_options())
                    .with_retry(retry_config());
                (
                    Arc::new(builder.build().map_err(backend)?),
                    key_prefix(&parsed),
                )
            }
            "az" | "azure" => {
                // az://CONTAINER/PREFIX: the account comes from AZURE_STORAGE_ACCOUNT_NAME.
                let container = parsed.host_str().ok_or_else(|| bad("no container"))?;
                let builder = MicrosoftAzureBuilder::from_env()
                    .with_container_name(container)
                    .with_client_options(client_options())
                    .with_retry(retry_config());
                (
                    Arc::new(builder.build().map_err(backend)?),
                    key_prefix(&parsed),
                )
            }
            "file" => {
                let path = parsed
                    .to_file_path()
                    .map_err(|_| bad("not an absolute local path"))?;
                std::fs::create_dir_all(&path).map_err(|e| OpenError::Backend {
                    location: location.clone(),
                    why: format!("cannot create {}: {e}", path.display()),
                })?;
                let fs = LocalFileSystem::new_with_prefix(&path).map_err(backend)?;
                (Arc::new(fs), String::new())
            }
            other => return Err(bad(&format!("unsupported scheme `{other}`"))),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pipe-remote")
            .enable_all()
            .build()
            .map_err(|e| OpenError::Backend {
                location: location.clone(),
                why: format!("cannot start the I/O runtime: {e}"),
            })?;
        Ok(ObjectStoreRemote {
            store,
            prefix,
            location,
            runtime,
        })
    }

    fn object(&self, digest: &str) -> Result<ObjectPath, RemoteError> {
        if !is_digest(digest) {
            return Err(RemoteError::Failed(format!("`{digest}` is not a digest")));
        }
        Ok(self.path(&format!("objects/{}/{}", &digest[..2], &digest[2..])))
    }

    fn manifest(&self, key: &str) -> Result<ObjectPath, RemoteError> {
        if !is_digest(key) {
            return Err(RemoteError::Failed(format!("`{key}` is not a key")));
        }
        Ok(self.path(&format!("stages/{key}.json")))
    }

    fn path(&self, rel: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// Reads the whole object at `path`, if it exists.
    async fn read_small(&self, path: &ObjectPath) -> Result<Option<Vec<u8>>, RemoteError> {
        match self.store.get(path).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(classify)?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(classify(e)),
        }
    }

    async fn download(
        &self,
        path: &ObjectPath,
        dest: &Path,
        progress: &dyn Fn(u64),
    ) -> Result<Option<u64>, RemoteError> {
        let got = match self.store.get(path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(classify(e)),
        };
        let mut file = std::fs::File::create(dest)
            .map_err(|e| RemoteError::Failed(format!("cannot write {}: {e}", dest.display())))?;
        let mut stream = got.into_stream();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(classify)?;
            file.write_all(&chunk).map_err(|e| {
                RemoteError::Failed(format!("cannot write {}: {e}", dest.display()))
            })?;
            n += chunk.len() as u64;
            progress(n);
        }
        Ok(Some(n))
    }

    async fn upload(
        &self,
        path: &ObjectPath,
        src: &Path,
        size: u64,
        progress: &dyn Fn(u64),
    ) -> Result<(), RemoteError> {
        let read_err =
            |e: std::io::Error| RemoteError::Failed(format!("cannot read {}: {e}", src.display()));
        if size < MULTIPART_MIN {
            let bytes = std::fs::read(src).map_err(read_err)?;
            let n = bytes.len() as u64;
            self.store
                .put(path, PutPayload::from(bytes))
                .await
                .map_err(classify)?;
            progress(n);
            return Ok(());
        }
        let upload = self.store.put_multipart(path).await.map_err(classify)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut file = std::fs::File::open(src).map_err(read_err)?;
        let mut buf = vec![0u8; PART_SIZE];
        let mut sent = 0u64;
        loop {
            let n = match read_full(&mut file, &mut buf) {
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(read_err(e));
                }
            };
            if n == 0 {
                break;
            }
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = writer.abort().await;
                return Err(classify(e));
            }
            writer.write(&buf[..n]);
            sent += n as u64;
            progress(sent);
        }
        writer.finish().await.map_err(classify)?;
        Ok(())
    }
}

/// Fills `buf` as far as the file allows; the count read (0 at the end).
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

impl Remote for ObjectStoreRemote {
    fn location(&self) -> &str {
        &self.location
    }

    fn get_manifest(&self, key: &str) -> Result<Option<Vec<u8>>, RemoteError> {
        let path = self.manifest(key)?;
        self.runtime.block_on(self.read_small(&path))
    }

    fn object_size(&self, digest: &str) -> Result<Option<u64>, RemoteError> {
        let path = self.object(digest)?;
        self.runtime.block_on(async {
            match self.store.head(&path).await {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(classify(e)),
            }
        })
    }

    fn get_object(
        &self,
        digest: &str,
        dest: &Path,
        progress: &dyn Fn(u64),
    ) -> Result<Option<u64>, RemoteError> {
        let path = self.object(digest)?;
        self.runtime.block_on(self.download(&path, dest, progress))
    }

    fn put_object(
        &self,
        digest: &str,
        src: &Path,
        size: u64,
        progress: &dyn Fn(u64),
    ) -> Result<(), RemoteError> {
        let path = self.object(digest)?;
        self.runtime
            .block_on(self.upload(&path, src, size, progress))
    }

    fn put_manifest(&self, key: &str, body: &[u8], replace: bool) -> Result<bool, RemoteError> {
        let path = self.manifest(key)?;
        let opts = PutOptions {
            mode: if replace {
                PutMode::Overwrite
            } else {
                PutMode::Create
            },
            ..Default::default()
        };
        self.runtime.block_on(async {
            match self
                .store
                .put_opts(&path, PutPayload::from(body.to_vec()), opts)
                .await
            {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(classify(e)),
            }
        })
    }
}

/// The key prefix of a bucket URL: its path without the slashes around it.
fn key_prefix(url: &url::Url) -> String {
    url.path().trim_matches('/').to_string()
}

fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(Duration::from_secs(300))
}

fn retry_config() -> RetryConfig {
    RetryConfig {
        max_retries: RETRIES,
        retry_timeout: RETRY_TIMEOUT,
        ..Default::default()
    }
}

/// An error's message with its causes, as one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// Whether an error means the remote cannot be used at all (no connection, refused
/// credentials) or only that this request failed.
fn classify(e: object_store::Error) -> RemoteError {
    let text = error_chain(&e);
    let denied = matches!(
        e,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    );
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut network = false;
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<reqwest::Error>() {
            network |= r.is_connect() || r.is_timeout() || r.is_builder();
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            network |= matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::TimedOut
            );
        }
        source = s.source();
    }
    let lower = text.to_ascii_lowercase();
    network |= lower.contains("error sending request")
        || lower.contains("connection refused")
        || lower.contains("dns error")
        || lower.contains("no such bucket")
        || lower.contains("nosuchbucket");
    if denied || network {
        RemoteError::Unreachable(text)
    } else {
        RemoteError::Failed(text)
    }
}

/// Installs the TLS crypto provider (ring) once per process, before any HTTPS request.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Opens the remote that `settings` name, for a [`pipe_core::remote::RemoteCache`].
pub fn connect(settings: &Settings) -> Result<pipe_core::remote::RemoteCache, OpenError> {
    init_tls();
    let remote = ObjectStoreRemote::open(&settings.url)?;
    Ok(pipe_core::remote::RemoteCache::new(
        Box::new(remote),
        !settings.read_only,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_credentials_are_refused() {
        for url in [
            "s3://AKIA:secret@bucket/prefix",
            "s3://user@bucket/prefix",
            "s3://bucket/prefix?token=abc",
        ] {
            let err = ObjectStoreRemote::open(url).unwrap_err().to_string();
            assert!(err.contains("credentials do not belong"), "{err}");
            assert!(!err.contains("secret") && !err.contains("abc"), "{err}");
        }
    }

    #[test]
    fn unknown_schemes_are_refused_naming_the_supported_ones() {
        let err = ObjectStoreRemote::open("ftp://host/x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported scheme `ftp`"), "{err}");
        assert!(err.contains("s3://BUCKET/PREFIX"), "{err}");
    }

    #[test]
    fn a_file_remote_round_trips_objects_and_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/remote", dir.path().display());
        let remote = ObjectStoreRemote::open(&url).unwrap();
        let digest = blake3::hash(b"hello").to_hex().to_string();
        assert_eq!(remote.object_size(&digest).unwrap(), None);
        let src = dir.path().join("src");
        std::fs::write(&src, b"hello").unwrap();
        remote.put_object(&digest, &src, 5, &|_| {}).unwrap();
        assert_eq!(remote.object_size(&digest).unwrap(), Some(5));
        let dest = dir.path().join("dest");
        assert_eq!(remote.get_object(&digest, &dest, &|_| {}).unwrap(), Some(5));
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        let key = blake3::hash(b"key").to_hex().to_string();
        assert!(remote.put_manifest(&key, b"first", false).unwrap());
        assert!(!remote.put_manifest(&key, b"second", false).unwrap());
        assert_eq!(remote.get_manifest(&key).unwrap().unwrap(), b"first");
        assert!(remote.put_manifest(&key, b"third", true).unwrap());
        assert_eq!(remote.get_manifest(&key).unwrap().unwrap(), b"third");
        assert!(dir
            .path()
            .join("remote/objects")
            .join(&digest[..2])
            .join(&digest[2..])
            .is_file());
        // Names that are not digests never become paths.
        assert!(remote.get_manifest("../../etc/passwd").is_err());
    }
}

//! The remote cache seam: a shared store on object storage that the run loop consults on a
//! local miss and fills after a stage completes.
//!
//! ```text
//! <remote>/
//!   objects/ab/cdef…      file contents by blake3 digest (as in the local store)
//!   stages/<key>.json     a complete entry's manifest, written last and only if absent
//! ```
//!
//! The rules that keep a shared remote consistent whatever is killed when:
//! - push: every object of an entry first, its manifest last, with a create-if-absent write.
//!   A remote therefore never holds a manifest whose objects are missing; a kill during a push
//!   leaves at most objects that no manifest references. Two stores pushing the same key at
//!   once both succeed: the first manifest stays, and both sets of objects are complete.
//! - pull: the manifest is checked (this format, this key, safe paths, its own outputs digest)
//!   before anything is written; each object is fetched into a temporary name in the local
//!   store, hashed, and kept only if its digest is the one asked for. A corrupt object is
//!   refused, named with both digests, and the stage runs locally instead. The local entry is
//!   published as a commit is (manifest last), so a kill during a pull leaves no entry that
//!   looks complete.
//! - an unreachable remote is reported once, and the run goes on without it.
//!
//! Backends (S3, GCS, Azure, a shared file system) implement [`Remote`] in the `pipe-remote`
//! crate; pipe-core has no network code.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::digest::{hash_file, tree_digest};
use crate::kind::Progress;
use crate::relpath::relative_path;
use crate::store::{Manifest, Store, MANIFEST_FORMAT};

/// Objects moved at once, at most (transfers wait on the network, not on the cores).
const PARALLEL_TRANSFERS: usize = 8;

/// Why a remote operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteError {
    /// The remote cannot be reached or refuses pipe (network, credentials, missing bucket):
    /// this process stops asking it, and runs without it.
    Unreachable(String),
    /// This one operation failed (the remote itself answers).
    Failed(String),
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteError::Unreachable(e) | RemoteError::Failed(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for RemoteError {}

/// A backend: a flat namespace of objects and manifests. Implementations never log or return
/// credentials; [`Remote::location`] is what messages show.
pub trait Remote: Send + Sync {
    /// Where it is, for messages (`s3://bucket/prefix`), without credentials.
    fn location(&self) -> &str;
    /// The manifest stored for `key`, if the remote holds one.
    fn get_manifest(&self, key: &str) -> Result<Option<Vec<u8>>, RemoteError>;
    /// The size of object `digest`, if the remote holds it.
    fn object_size(&self, digest: &str) -> Result<Option<u64>, RemoteError>;
    /// Writes the bytes of object `digest` into the new file `dest`; tells `progress` the
    /// bytes received so far. `Ok(None)`: the remote does not hold it.
    fn get_object(
        &self,
        digest: &str,
        dest: &Path,
        progress: &dyn Fn(u64),
    ) -> Result<Option<u64>, RemoteError>;
    /// Uploads the file `src` (`size` bytes) as object `digest`, in parts when it is large;
    /// tells `progress` the bytes sent so far.
    fn put_object(
        &self,
        digest: &str,
        src: &Path,
        size: u64,
        progress: &dyn Fn(u64),
    ) -> Result<(), RemoteError>;
    /// Writes the manifest of `key` unless the remote holds one already (or, with `replace`,
    /// whatever it holds): `Ok(true)` when this call wrote it, `Ok(false)` when another was
    /// there first.
    fn put_manifest(&self, key: &str, body: &[u8], replace: bool) -> Result<bool, RemoteError>;
}

/// Bytes and objects moved in one direction, and the time spent moving them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    pub entries: usize,
    pub objects: usize,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Traffic {
    /// Bytes per second over the time spent transferring (0 when nothing moved).
    pub fn rate(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if self.bytes == 0 || s == 0.0 {
            0.0
        } else {
            self.bytes as f64 / s
        }
    }
}

/// What one process moved to and from its remote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transfers {
    pub location: String,
    pub pulled: Traffic,
    pub pushed: Traffic,
    /// Set when the remote could not be reached (the run went on without it).
    pub unreachable: Option<String>,
}

/// Why a pull did not give a local entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullError {
    /// The remote is (now) unreachable.
    Unreachable(String),
    /// An object's bytes are not the ones its digest names.
    Corrupt {
        path: String,
        expected: String,
        found: String,
    },
    /// Anything else (an object missing from the remote, a local write failing).
    Failed(String),
}

impl fmt::Display for PullError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PullError::Unreachable(e) => write!(f, "the remote cannot be reached: {e}"),
            PullError::Corrupt {
                path,
                expected,
                found,
            } => write!(
                f,
                "the remote's copy of output {path} is corrupt: it should hash to {expected}, but it hashes to {found}"
            ),
            PullError::Failed(e) => f.write_str(e),
        }
    }
}

/// A remote bound to this process: it remembers that the remote is unreachable (and says so
/// once), counts the traffic, and knows whether pipe may write to it.
pub struct RemoteCache {
    backend: Box<dyn Remote>,
    writable: bool,
    unreachable: AtomicBool,
    why_unreachable: Mutex<Option<String>>,
    /// Objects whose remote copies were found corrupt: a push sends them again.
    corrupt: Mutex<std::collections::BTreeSet<String>>,
    /// Keys whose remote entries were found broken (a corrupt or missing object): a push of
    /// the key replaces their manifest, once its own objects are all in place.
    broken: Mutex<std::collections::BTreeSet<String>>,
    pulled: Counter,
    pushed: Counter,
}

#[derive(Default)]
struct Counter {
    entries: AtomicU64,
    objects: AtomicU64,
    bytes: AtomicU64,
    nanos: AtomicU64,
}

impl Counter {
    fn add(&self, objects: usize, bytes: u64, elapsed: Duration) {
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.objects.fetch_add(objects as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }
    fn traffic(&self) -> Traffic {
        Traffic {
            entries: self.entries.load(Ordering::Relaxed) as usize,
            objects: self.objects.load(Ordering::Relaxed) as usize,
            bytes: self.bytes.load(Ordering::Relaxed),
            elapsed: Duration::from_nanos(self.nanos.load(Ordering::Relaxed)),
        }
    }
}

/// What one push did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Objects uploaded (the others were in the remote already).
    pub objects: usize,
    pub bytes: u64,
    /// False when the remote held a manifest for the key already.
    pub manifest_written: bool,
}

impl RemoteCache {
    /// `writable: false` makes a read-only remote: pulled from, never pushed to.
    pub fn new(backend: Box<dyn Remote>, writable: bool) -> Self {
        RemoteCache {
            backend,
            writable,
            unreachable: AtomicBool::new(false),
            why_unreachable: Mutex::new(None),
            corrupt: Mutex::default(),
            broken: Mutex::default(),
            pulled: Counter::default(),
            pushed: Counter::default(),
        }
    }

    pub fn location(&self) -> &str {
        self.backend.location()
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    /// False once the remote was found unreachable in this process.
    pub fn reachable(&self) -> bool {
        !self.unreachable.load(Ordering::SeqCst)
    }

    pub fn transfers(&self) -> Transfers {
        Transfers {
            location: self.location().to_string(),
            pulled: self.pulled.traffic(),
            pushed: self.pushed.traffic(),
            unreachable: self.why_unreachable.lock().expect("lock").clone(),
        }
    }

    /// Notes a failure; an unreachable remote is reported once and not asked again.
    fn note(&self, e: &RemoteError) {
        if let RemoteError::Unreachable(why) = e {
            if !self.unreachable.swap(true, Ordering::SeqCst) {
                tracing::warn!(
                    "the remote cache {} cannot be reached: {why}; going on without it (stages that are not in the local store run here)",
                    self.location()
                );
                *self.why_unreachable.lock().expect("lock") = Some(why.clone());
            }
        }
    }

    /// The remote's manifest for `key`, if it holds a complete entry of this format whose
    /// manifest is sound (see [`check_manifest`]). A manifest that is not is reported and
    /// treated as absent.
    pub fn lookup(&self, key: &str) -> Option<Manifest> {
        if !self.reachable() {
            return None;
        }
        let bytes = match self.backend.get_manifest(key) {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => {
                self.note(&e);
                if let RemoteError::Failed(e) = e {
                    tracing::warn!(
                        "cannot read the manifest of {} from the remote cache {}: {e}",
                        short(key),
                        self.location()
                    );
                }
                return None;
            }
        };
        match check_manifest(key, &bytes) {
            Ok(Some(m)) => Some(m),
            Ok(None) => None,
            Err(why) => {
                tracing::warn!(
                    "the remote cache {} holds an unusable manifest for {}: {why}; it is ignored",
                    self.location(),
                    short(key)
                );
                None
            }
        }
    }

    /// Makes the remote entry `m` (from [`RemoteCache::lookup`]) a local one: fetches the
    /// objects the local store lacks (several at once, each verified on arrival), then
    /// publishes the entry.
    pub fn pull(
        &self,
        store: &Store,
        m: &Manifest,
        progress: &dyn Progress,
    ) -> Result<Manifest, PullError> {
        let t = Instant::now();
        // One fetch per digest the store lacks; its first output path names it in messages.
        let mut wanted: BTreeMap<&str, (&str, u64)> = BTreeMap::new();
        for f in &m.outputs {
            if !store.has_object(&f.digest, f.size) {
                wanted.entry(&f.digest).or_insert((&f.path, f.size));
            }
        }
        let total: u64 = wanted.values().map(|(_, size)| size).sum();
        progress.set_bytes_length(total);
        progress.set_message(format!("pulling from {}", self.location()));
        let done = AtomicU64::new(0);
        let pool = transfer_pool();
        let results: Vec<Result<(), PullError>> = pool.install(|| {
            wanted
                .par_iter()
                .map(|(&digest, &(path, size))| {
                    self.fetch_object(store, digest, path, size, &|n| {
                        let all = done.fetch_add(n, Ordering::Relaxed) + n;
                        progress.set_position(all);
                    })
                })
                .collect()
        });
        for r in results {
            if let Err(e) = r {
                match &e {
                    PullError::Unreachable(why) => {
                        self.note(&RemoteError::Unreachable(why.clone()))
                    }
                    PullError::Corrupt { expected, .. } => {
                        self.corrupt.lock().expect("lock").insert(expected.clone());
                        self.broken.lock().expect("lock").insert(m.key.clone());
                    }
                    PullError::Failed(_) => {
                        self.broken.lock().expect("lock").insert(m.key.clone());
                    }
                }
                return Err(e);
            }
        }
        crate::fault::point("pull-objects-fetched");
        let local = store
            .publish_pulled(m.clone())
            .map_err(|e| PullError::Failed(format!("cannot store the pulled entry: {e}")))?;
        self.pulled.add(wanted.len(), total, t.elapsed());
        Ok(local)
    }

    /// Fetches object `digest` into the local store: a temporary name, hashed, then renamed
    /// into place only if the digest matches.
    fn fetch_object(
        &self,
        store: &Store,
        digest: &str,
        path: &str,
        size: u64,
        progress: &dyn Fn(u64),
    ) -> Result<(), PullError> {
        let tmp = store
            .object_tmp_path(digest)
            .map_err(|e| PullError::Failed(format!("cannot make room for object {digest}: {e}")))?;
        let last = AtomicU64::new(0);
        let got = self.backend.get_object(digest, &tmp, &|so_far| {
            let before = last.swap(so_far, Ordering::Relaxed);
            progress(so_far.saturating_sub(before));
        });
        let cleanup = || {
            let _ = fs::remove_file(&tmp);
        };
        match got {
            Ok(Some(_)) => {}
            Ok(None) => {
                cleanup();
                return Err(PullError::Failed(format!(
                    "the remote holds the manifest but not object {digest} (output {path})"
                )));
            }
            Err(RemoteError::Unreachable(e)) => {
                cleanup();
                return Err(PullError::Unreachable(e));
            }
            Err(RemoteError::Failed(e)) => {
                cleanup();
                return Err(PullError::Failed(format!(
                    "cannot fetch object {digest} (output {path}): {e}"
                )));
            }
        }
        let found = hash_file(&tmp).map_err(|e| {
            cleanup();
            PullError::Failed(format!("cannot read the fetched object {digest}: {e}"))
        })?;
        let len = fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
        if found != digest || len != size {
            cleanup();
            return Err(PullError::Corrupt {
                path: path.to_string(),
                expected: digest.to_string(),
                found: if found != digest {
                    found
                } else {
                    format!("{found} ({len} bytes where the manifest says {size})")
                },
            });
        }
        store
            .adopt_object(&tmp, digest)
            .map_err(|e| PullError::Failed(format!("cannot store object {digest}: {e}")))
    }

    /// Pushes the complete local entry `m`: the objects the remote lacks first, the manifest
    /// last and only if the remote has none for the key.
    pub fn push(
        &self,
        store: &Store,
        m: &Manifest,
        progress: &dyn Progress,
    ) -> Result<Pushed, RemoteError> {
        if !self.writable {
            return Err(RemoteError::Failed(format!(
                "the remote cache {} is read-only",
                self.location()
            )));
        }
        if !self.reachable() {
            let why = self.why_unreachable.lock().expect("lock").clone();
            return Err(RemoteError::Unreachable(why.unwrap_or_default()));
        }
        let t = Instant::now();
        let result = self.push_inner(store, m, progress);
        match &result {
            Ok(p) => self.pushed.add(p.objects, p.bytes, t.elapsed()),
            Err(e) => self.note(e),
        }
        result
    }

    fn push_inner(
        &self,
        store: &Store,
        m: &Manifest,
        progress: &dyn Progress,
    ) -> Result<Pushed, RemoteError> {
        let mut unique: BTreeMap<&str, u64> = BTreeMap::new();
        for f in &m.outputs {
            unique.insert(&f.digest, f.size);
        }
        let pool = transfer_pool();
        let corrupt = self.corrupt.lock().expect("lock").clone();
        // What the remote has already is not sent again (a resumed push skips what it sent),
        // unless its copy was found corrupt.
        let missing: Vec<(&str, u64)> = pool.install(|| {
            unique
                .par_iter()
                .map(|(&digest, &size)| match self.backend.object_size(digest) {
                    Ok(Some(n)) if n == size && !corrupt.contains(digest) => Ok(None),
                    Ok(_) => Ok(Some((digest, size))),
                    Err(e) => Err(e),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.into_iter().flatten().collect())
        })?;
        let total: u64 = missing.iter().map(|(_, size)| size).sum();
        progress.set_bytes_length(total);
        progress.set_message(format!("pushing to {}", self.location()));
        let sent = AtomicU64::new(0);
        pool.install(|| {
            missing
                .par_iter()
                .map(|&(digest, size)| {
                    let last = AtomicU64::new(0);
                    self.backend
                        .put_object(digest, &store.object_path(digest), size, &|so_far| {
                            let before = last.swap(so_far, Ordering::Relaxed);
                            let all = sent
                                .fetch_add(so_far.saturating_sub(before), Ordering::Relaxed)
                                + so_far.saturating_sub(before);
                            progress.set_position(all);
                        })
                })
                .collect::<Result<(), _>>()
        })?;
        crate::fault::point("push-objects-sent");
        let body = serde_json::to_vec_pretty(m)
            .map_err(|e| RemoteError::Failed(format!("cannot encode the manifest: {e}")))?;
        let replace = self.broken.lock().expect("lock").contains(&m.key);
        let manifest_written = self.backend.put_manifest(&m.key, &body, replace)?;
        Ok(Pushed {
            objects: missing.len(),
            bytes: total,
            manifest_written,
        })
    }
}

/// A pool for transfers, separate from the cores' pool: transfers mostly wait.
fn transfer_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(PARALLEL_TRANSFERS)
            .thread_name(|i| format!("pipe-transfer-{i}"))
            .build()
            .expect("a thread pool")
    })
}

fn short(key: &str) -> &str {
    &key[..12.min(key.len())]
}

/// True for a blake3 digest (or key) as pipe writes them: 64 lowercase hex digits.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Reads a manifest that a remote holds for `key`, trusting nothing in it: `Ok(None)` when it
/// is of another cache format (never reused, as locally); an error when it is not a manifest
/// of `key`, names an output path that would leave the entry's directory, a digest that is
/// not one, or outputs that do not make its outputs digest.
pub fn check_manifest(key: &str, bytes: &[u8]) -> Result<Option<Manifest>, String> {
    #[derive(serde::Deserialize)]
    struct Format {
        format: u32,
    }
    let format: Format =
        serde_json::from_slice(bytes).map_err(|e| format!("it is not a manifest ({e})"))?;
    if format.format != MANIFEST_FORMAT {
        return Ok(None);
    }
    let m: Manifest =
        serde_json::from_slice(bytes).map_err(|e| format!("it is not a manifest ({e})"))?;
    if m.key != key {
        return Err(format!(
            "it is the manifest of another key ({})",
            short(&m.key)
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for f in &m.outputs {
        relative_path(&f.path).map_err(|e| format!("output path {e}"))?;
        if !is_digest(&f.digest) {
            return Err(format!("output {} has no valid digest", f.path));
        }
        if !seen.insert(f.path.as_str()) {
            return Err(format!("output {} is listed twice", f.path));
        }
    }
    // A file may not also be a directory of other outputs.
    for f in &m.outputs {
        let mut prefix = PathBuf::new();
        let parts: Vec<&str> = f.path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            prefix.push(part);
            if seen.contains(prefix.to_str().unwrap_or_default()) {
                return Err(format!(
                    "output {} is below output {}, which is a file",
                    f.path,
                    prefix.display()
                ));
            }
        }
    }
    let digest = tree_digest(&m.outputs);
    if digest != m.outputs_digest {
        return Err(format!(
            "its outputs hash to {digest}, not to the {} it records",
            m.outputs_digest
        ));
    }
    Ok(Some(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::{hash_bytes, FileEntry};

    fn manifest(key: &str, outputs: Vec<FileEntry>) -> Manifest {
        Manifest {
            outputs_digest: tree_digest(&outputs),
            outputs,
            ..crate::store::tests::manifest(key)
        }
    }

    fn file(path: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            digest: hash_bytes(path.as_bytes()),
            size: path.len() as u64,
            executable: false,
        }
    }

    #[test]
    fn a_sound_manifest_is_read() {
        let key = hash_bytes(b"k");
        let m = manifest(&key, vec![file("a/b.txt"), file("c")]);
        let read = check_manifest(&key, &serde_json::to_vec(&m).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(read.outputs, m.outputs);
    }

    #[test]
    fn hostile_manifests_are_refused() {
        let key = hash_bytes(b"k");
        let body = |m: &Manifest| serde_json::to_vec(m).unwrap();
        for path in ["../escape", "/etc/passwd", "a/../../b", "a//b", ""] {
            let m = manifest(&key, vec![file(path)]);
            let err = check_manifest(&key, &body(&m)).unwrap_err();
            assert!(err.contains("output path"), "{path}: {err}");
        }
        let other = manifest(&hash_bytes(b"other"), vec![file("a")]);
        assert!(check_manifest(&key, &body(&other))
            .unwrap_err()
            .contains("another key"));
        let mut bad_digest = manifest(&key, vec![file("a")]);
        bad_digest.outputs[0].digest = "../../x".into();
        bad_digest.outputs_digest = tree_digest(&bad_digest.outputs);
        assert!(check_manifest(&key, &body(&bad_digest))
            .unwrap_err()
            .contains("no valid digest"));
        let mut lying = manifest(&key, vec![file("a")]);
        lying.outputs_digest = hash_bytes(b"something else");
        assert!(check_manifest(&key, &body(&lying))
            .unwrap_err()
            .contains("hash to"));
        let nested = manifest(&key, vec![file("a"), file("a/b")]);
        assert!(check_manifest(&key, &body(&nested))
            .unwrap_err()
            .contains("which is a file"));
        let twice = manifest(&key, vec![file("a"), file("a")]);
        assert!(check_manifest(&key, &body(&twice))
            .unwrap_err()
            .contains("twice"));
        assert!(check_manifest(&key, b"{\"format\": 2}")
            .unwrap_err()
            .contains("not a manifest"));
    }

    #[test]
    fn another_format_is_a_miss() {
        let key = hash_bytes(b"k");
        let mut m = manifest(&key, vec![file("a")]);
        m.format = MANIFEST_FORMAT + 1;
        assert!(check_manifest(&key, &serde_json::to_vec(&m).unwrap())
            .unwrap()
            .is_none());
    }
}

//! The content-addressed store (default `cache/`).
//!
//! ```text
//! cache/
//!   objects/ab/cdef…         file contents by blake3 digest, read-only, shared by all entries
//!   stages/<key>/out/…       a completed stage's outputs (hard links to objects)
//!   stages/<key>/stamps.json     each output's (dev, inode, size, mtime, ctime) when last
//!                                known intact: a file whose stamp differs is re-hashed before use
//!   stages/<key>/manifest.json   written last: an entry is complete iff its manifest exists
//!   work/<key>/              in-progress state of an unfinished key (staged outputs, resume state)
//!   logs/<key>/<time>.log    one log per attempt
//!   logs/<key>/tensorboard/  a train stage's TensorBoard events (its attempts', side by side)
//!   refs/<pipeline>/<stage>.json  the key each stage last completed with (for status/explain)
//!   runs/<time>-<pid>.json   the keys each run used (for gc): written when the run starts and
//!                            whenever a stage starts or is a cache hit, so a killed run has one
//!   push-pending/<key>       an entry committed while a remote cache was in use whose push has
//!                            not finished: the next run that uses the entry pushes it
//!   remote.yaml              the remote cache this store uses (`pipe remote set`), if any
//!   hash-memo.json           digests of external inputs by (dev, inode, size, mtime, ctime)
//!   lock                     names the holder of the workspace lock (a flock on cache/ itself)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::digest::{hash_file, is_executable, tree_digest, walk_files, FileEntry, Stamp};

/// The format of manifests (and so of keys: it moves with [`crate::key::KEY_FORMAT`]). Entries
/// of another format are never read as results: a run treats them as misses and says so once,
/// `pipe gc` removes them. 1: keys of hand-written params; 2: typed key fields.
pub const MANIFEST_FORMAT: u32 = 2;

/// What a complete entry's manifest is (see [`Store::entry`]).
#[derive(Debug)]
pub enum Entry {
    Current(Box<Manifest>),
    /// Made by a pipe with this other cache format.
    OtherFormat(u32),
    Unreadable,
}

/// A completed stage: what it was made from, what it made, and how it went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: String,
    pub pipeline: String,
    pub stage: String,
    pub kind: String,
    pub kind_version: u32,
    /// The kind's key fields (see [`crate::key`]).
    pub fields: serde_json::Value,
    /// Input name → its digest and where it came from.
    pub inputs: BTreeMap<String, InputRecord>,
    pub outputs: Vec<FileEntry>,
    /// The digest of all outputs together (what a reference to the whole stage reads).
    pub outputs_digest: String,
    pub started: String,
    pub finished: String,
    pub wall_s: f64,
    #[serde(default)]
    pub metrics: Option<serde_json::Value>,
    /// The attempt's log, relative to the store root.
    pub log: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRecord {
    /// `stage:prep/data` for a stage output, or the path as written in the pipeline.
    pub source: String,
    pub digest: String,
}

impl Manifest {
    /// The digest and relative path prefix of an output addressed as `stage.output`
    /// (`None`: the whole stage).
    pub fn output_digest(&self, output: Option<&str>) -> Option<String> {
        let Some(name) = output else {
            return Some(self.outputs_digest.clone());
        };
        if let Some(f) = self.outputs.iter().find(|f| f.path == name) {
            return Some(f.digest.clone());
        }
        let prefix = format!("{}/", name.trim_end_matches('/'));
        let under: Vec<FileEntry> = self
            .outputs
            .iter()
            .filter_map(|f| {
                f.path.strip_prefix(&prefix).map(|rel| FileEntry {
                    path: rel.to_string(),
                    ..f.clone()
                })
            })
            .collect();
        if under.is_empty() {
            None
        } else {
            Some(tree_digest(&under))
        }
    }
}

/// The last completed key of a stage of a pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRef {
    pub key: String,
    pub finished: String,
}

/// A record of which keys one run used: every stage that was a cache hit or started, by id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub pipeline: String,
    pub started: String,
    pub keys: BTreeMap<String, String>,
    /// False while the run goes on, and forever for a run that was killed. Records written
    /// before this field existed were written when their run ended.
    #[serde(default = "ended")]
    pub finished: bool,
}

fn ended() -> bool {
    true
}

/// Problems `verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub entries: usize,
    /// Entries made by a pipe with another cache format: left alone (never reused; `pipe gc`
    /// removes them).
    pub other_format: usize,
    pub objects: usize,
    pub problems: Vec<String>,
    /// Keys whose manifests were removed so that the next run re-makes them.
    pub invalidated: Vec<String>,
    /// Entries removed because an input they were built from came from a corrupt entry: one
    /// line each, naming the entry and where its input came from.
    pub built_from_corrupt: Vec<String>,
}

/// What `gc` does with work directories (the resume state of unfinished stages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkDirs {
    /// Keep all of them (only those of keys that have completed since are removed).
    #[default]
    Keep,
    /// Remove them, except those of the stages that the latest run of each pipeline used:
    /// the next run of that pipeline resumes from them.
    Unused,
    /// Remove every one: interrupted stages start over.
    All,
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub objects_removed: usize,
    pub bytes_freed: u64,
    pub entries_removed: usize,
    /// Of the removed entries, those made by a pipe with another cache format.
    pub other_format_removed: usize,
    pub work_dirs_removed: usize,
    pub work_dirs_kept: usize,
    /// Of the kept work dirs, those kept because the latest run of a pipeline used them.
    pub work_dirs_of_latest_runs: usize,
}

/// An output file of a stored entry whose bytes are not the ones its manifest records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub key: String,
    pub stage: String,
    /// The output's path inside the entry.
    pub path: String,
    pub expected: String,
    /// What was found instead: another digest, or why it cannot be read.
    pub found: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stage `{}` ({}): output {} should hash to {}, but {}",
            self.stage,
            &self.key[..12.min(self.key.len())],
            self.path,
            self.expected,
            self.found
        )
    }
}

/// The store at one root directory.
#[derive(Debug, Clone)]
pub struct Store {
    pub root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        for sub in ["objects", "stages", "work", "logs", "refs", "runs"] {
            fs::create_dir_all(root.join(sub)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot create the store at {}: {e}", root.display()),
                )
            })?;
        }
        let root = root.canonicalize()?;
        Ok(Store { root })
    }

    /// Opens the store at `root` only if it exists (for read-only commands).
    pub fn existing(root: &Path) -> Option<Self> {
        root.join("stages").is_dir().then(|| Store {
            root: root.canonicalize().unwrap_or_else(|_| root.to_path_buf()),
        })
    }

    pub fn object_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("objects")
            .join(&digest[..2])
            .join(&digest[2..])
    }
    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join("stages").join(key)
    }
    pub fn manifest_path(&self, key: &str) -> PathBuf {
        self.entry_dir(key).join("manifest.json")
    }
    fn stamps_path(&self, key: &str) -> PathBuf {
        self.entry_dir(key).join("stamps.json")
    }
    /// Where a completed stage's outputs can be read.
    pub fn out_dir(&self, key: &str) -> PathBuf {
        self.entry_dir(key).join("out")
    }
    /// The logs of `key`'s attempts (and what else a stage writes beside them).
    pub fn log_dir(&self, key: &str) -> PathBuf {
        self.root.join("logs").join(key)
    }
    /// A new log file of key `key`'s, named for when it starts (RFC 3339, `:` as `-`), and
    /// that time.
    pub fn new_log(&self, key: &str) -> (PathBuf, String) {
        let stamp = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let path = self
            .log_dir(key)
            .join(format!("{}.log", stamp.replace(':', "-")));
        (path, stamp)
    }
    pub fn work_dir(&self, key: &str) -> PathBuf {
        self.root.join("work").join(key)
    }
    pub fn memo_path(&self) -> PathBuf {
        self.root.join("hash-memo.json")
    }
    fn ref_path(&self, pipeline: &str, stage: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(sanitize(pipeline))
            .join(format!("{stage}.json"))
    }

    /// The manifest of `key`, if that entry is complete and its outputs are all present.
    pub fn lookup(&self, key: &str) -> Option<Manifest> {
        let m = self.read_manifest(key)?;
        let out = self.out_dir(key);
        let intact = m.outputs.iter().all(|f| {
            fs::metadata(out.join(&f.path)).is_ok_and(|meta| meta.len() == f.size)
                && fs::metadata(self.object_path(&f.digest)).is_ok_and(|meta| meta.len() == f.size)
        });
        if intact {
            Some(m)
        } else {
            tracing::warn!(
                "cache entry {} is missing output files; it will be re-made",
                &key[..12]
            );
            None
        }
    }

    /// The outputs of `m` whose bytes are not the recorded ones. A file whose stamp equals the
    /// one recorded when it was last known intact is not read; any other is re-hashed (and, if
    /// intact, stamped again, so the next check is cheap).
    pub fn damage(&self, m: &Manifest) -> Vec<Damage> {
        let stamps_path = self.stamps_path(&m.key);
        let mut stamps: BTreeMap<String, Stamp> = fs::read(&stamps_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let out = self.out_dir(&m.key);
        let checked: Vec<(&FileEntry, Result<Option<Stamp>, String>)> = m
            .outputs
            .par_iter()
            .map(|f| {
                let view = out.join(&f.path);
                let meta = match fs::symlink_metadata(&view) {
                    Ok(meta) if meta.is_file() => meta,
                    Ok(_) => return (f, Err("it is no longer a regular file".to_string())),
                    Err(e) => return (f, Err(format!("it cannot be read: {e}"))),
                };
                let now = Stamp::of(&meta);
                if stamps.get(&f.path) == Some(&now) {
                    return (f, Ok(None));
                }
                match hash_file(&view) {
                    Ok(d) if d == f.digest => (f, Ok(Some(now))),
                    Ok(d) => (f, Err(format!("it hashes to {d}"))),
                    Err(e) => (f, Err(format!("it cannot be read: {e}"))),
                }
            })
            .collect();
        let mut damage = Vec::new();
        let mut restamped = false;
        for (f, result) in checked {
            match result {
                Ok(None) => {}
                Ok(Some(stamp)) => {
                    stamps.insert(f.path.clone(), stamp);
                    restamped = true;
                }
                Err(found) => damage.push(Damage {
                    key: m.key.clone(),
                    stage: m.stage.clone(),
                    path: f.path.clone(),
                    expected: f.digest.clone(),
                    found,
                }),
            }
        }
        if restamped && damage.is_empty() {
            // Only a cost if it fails: the files are re-hashed next time.
            if let Ok(body) = serde_json::to_vec(&stamps) {
                let _ = write_atomic(&stamps_path, &body, false);
            }
        }
        damage
    }

    /// Removes the damaged entry `key` and every object of it whose bytes are wrong (other
    /// entries linked to such an object find out when they are checked), and says so.
    pub fn discard(&self, key: &str, damage: &[Damage]) {
        for d in damage {
            tracing::warn!("cache entry damaged: {d}; the stage will run again");
            self.remove_object_if_corrupt(&d.expected);
        }
        if let Err(e) = self.invalidate(key) {
            tracing::warn!(
                "cannot remove the damaged entry {}: {e}",
                self.entry_dir(key).display()
            );
        }
    }

    fn remove_object_if_corrupt(&self, digest: &str) {
        let obj = self.object_path(digest);
        if obj.exists() && hash_file(&obj).ok().as_deref() != Some(digest) {
            let _ = fs::remove_file(&obj);
        }
    }

    /// Records the stamps of the entry's files as they are now (just after commit, when they
    /// are known to hold the bytes that were hashed).
    fn stamp_entry(&self, key: &str, entries: &[FileEntry]) -> io::Result<()> {
        let out = self.out_dir(key);
        let stamps: BTreeMap<&str, Stamp> = entries
            .iter()
            .map(|f| {
                Ok((
                    f.path.as_str(),
                    Stamp::of(&fs::metadata(out.join(&f.path))?),
                ))
            })
            .collect::<io::Result<_>>()?;
        write_atomic(&self.stamps_path(key), &serde_json::to_vec(&stamps)?, false)
    }

    /// The manifest of the complete entry `key`, if it is one of this format.
    pub fn read_manifest(&self, key: &str) -> Option<Manifest> {
        match self.entry(key) {
            Entry::Current(m) => Some(*m),
            _ => None,
        }
    }

    /// What the manifest of `key` is: one of this format, one of an older (or newer) pipe, or
    /// none that can be read. Only the first is ever read as a result.
    pub fn entry(&self, key: &str) -> Entry {
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let Ok(bytes) = fs::read(self.manifest_path(key)) else {
            return Entry::Unreadable;
        };
        match serde_json::from_slice::<Format>(&bytes) {
            Ok(f) if f.format != MANIFEST_FORMAT => return Entry::OtherFormat(f.format),
            Ok(_) => {}
            Err(_) => return Entry::Unreadable,
        }
        match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(m) if m.key == key => Entry::Current(Box::new(m)),
            _ => Entry::Unreadable,
        }
    }

    /// Moves the files staged in `staged` into the store as the outputs of `manifest.key`, then
    /// writes the manifest. Until the manifest's rename, the entry does not look complete.
    ///
    /// The store holds bytes only: a symbolic link among the staged files is replaced by a copy
    /// of what it points to (a file or a whole directory), and a staged file that has other
    /// hard links (perhaps a user's file outside the workspace) is copied rather than moved, so
    /// that nothing outside the store is ever moved, linked to or has its mode changed.
    pub fn commit(&self, staged: &Path, manifest: Manifest) -> io::Result<Manifest> {
        let key = manifest.key.clone();
        if fs::symlink_metadata(staged)?.file_type().is_symlink() {
            // The stage replaced its output directory by a link: store what it points to,
            // without reaching into it.
            let copy = unique_tmp_name(staged);
            copy_tree_following_links(staged, &copy, 0)?;
            fs::remove_file(staged)?;
            fs::rename(&copy, staged)?;
        }
        own_every_file(staged, staged, 0)?;
        let listed = walk_files(staged)?;
        let entries: Vec<FileEntry> = listed
            .par_iter()
            .map(|(rel, path)| {
                let meta = fs::metadata(path)?;
                Ok(FileEntry {
                    path: rel.clone(),
                    digest: hash_file(path)?,
                    size: meta.len(),
                    executable: is_executable(&meta),
                })
            })
            .collect::<io::Result<_>>()?;

        let view_tmp = self.begin_entry(&key)?;

        // One staged file per digest becomes the object (the others are only linked to it).
        let mut first_with_digest: BTreeMap<&str, &Path> = BTreeMap::new();
        for ((_, path), e) in listed.iter().zip(&entries) {
            first_with_digest.entry(&e.digest).or_insert(path);
        }
        first_with_digest
            .into_par_iter()
            .map(|(digest, path)| {
                let obj = self.object_path(digest);
                // An object that exists already is linked into this entry only if its bytes
                // are still the right ones; a damaged one is replaced by the staged bytes.
                if obj.exists() && hash_file(&obj).ok().as_deref() == Some(digest) {
                    return Ok(());
                }
                let tmp = self.object_tmp_path(digest)?;
                if fs::rename(path, &tmp).is_err() {
                    // A staged file on another device: copy its bytes instead.
                    fs::copy(path, &tmp)?;
                }
                self.adopt_object(&tmp, digest)
            })
            .collect::<io::Result<()>>()?;
        self.link_view(&entries, &view_tmp)?;

        crate::fault::point("commit-objects-stored");
        self.publish(manifest, entries, view_tmp)
    }

    /// Makes an entry complete whose objects are all in place: its view (`view_tmp`, already
    /// holding links to the objects) moved into place, its stamps, then its manifest.
    fn publish(
        &self,
        mut manifest: Manifest,
        entries: Vec<FileEntry>,
        view_tmp: PathBuf,
    ) -> io::Result<Manifest> {
        let key = manifest.key.clone();
        let entry = self.entry_dir(&key);
        let view = self.out_dir(&key);
        if view.exists() {
            make_writable(&view);
            fs::remove_dir_all(&view)?;
        }
        fs::rename(&view_tmp, &view)?;
        sync_dir(&entry);

        crate::fault::point("commit-view-built");
        self.stamp_entry(&key, &entries)?;
        manifest.outputs_digest = tree_digest(&entries);
        manifest.outputs = entries;
        let body = serde_json::to_vec_pretty(&manifest)?;
        write_atomic(&self.manifest_path(&key), &body, true)?;
        crate::fault::point("commit-manifest-written");
        Ok(manifest)
    }

    /// Starts (re)making entry `key`: it stops looking complete before anything changes (a
    /// forced re-run replaces an entry), and gets an empty view under construction.
    fn begin_entry(&self, key: &str) -> io::Result<PathBuf> {
        let entry = self.entry_dir(key);
        let _ = fs::remove_file(self.manifest_path(key));
        fs::create_dir_all(&entry)?;
        let view_tmp = entry.join("out.partial");
        if view_tmp.exists() {
            make_writable(&view_tmp);
            fs::remove_dir_all(&view_tmp)?;
        }
        fs::create_dir_all(&view_tmp)?;
        Ok(view_tmp)
    }

    /// Fills `view` with the outputs `entries`: hard links to their objects (copies for
    /// executables, whose mode differs, and where links cannot be made).
    fn link_view(&self, entries: &[FileEntry], view: &Path) -> io::Result<()> {
        entries
            .par_iter()
            .map(|e| {
                let obj = self.object_path(&e.digest);
                let dest = view.join(&e.path);
                fs::create_dir_all(dest.parent().expect("parent"))?;
                if e.executable {
                    fs::copy(&obj, &dest)?;
                    fs::set_permissions(&dest, fs::Permissions::from_mode(0o555))?;
                } else if fs::hard_link(&obj, &dest).is_err() {
                    fs::copy(&obj, &dest)?;
                    fs::set_permissions(&dest, fs::Permissions::from_mode(0o444))?;
                }
                Ok(())
            })
            .collect()
    }

    /// True when object `digest` is stored with these bytes (it is re-hashed).
    pub fn has_object(&self, digest: &str, size: u64) -> bool {
        let obj = self.object_path(digest);
        fs::metadata(&obj).is_ok_and(|m| m.len() == size)
            && hash_file(&obj).ok().as_deref() == Some(digest)
    }

    /// A fresh temporary name beside object `digest`'s place, for bytes on their way in
    /// (`gc` removes what a kill leaves).
    pub fn object_tmp_path(&self, digest: &str) -> io::Result<PathBuf> {
        let obj = self.object_path(digest);
        fs::create_dir_all(obj.parent().expect("object dir"))?;
        Ok(unique_tmp_name(&obj))
    }

    /// Makes the file `tmp` (from [`Store::object_tmp_path`], its bytes known to hash to
    /// `digest`) the object `digest`: synced, read-only, renamed into place.
    pub fn adopt_object(&self, tmp: &Path, digest: &str) -> io::Result<()> {
        fs::File::open(tmp)?.sync_all()?;
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o444))?;
        fs::rename(tmp, self.object_path(digest))
    }

    /// Makes `manifest` (read from a remote and checked) a complete local entry; every object
    /// it names must be stored already ([`Store::adopt_object`]).
    pub fn publish_pulled(&self, manifest: Manifest) -> io::Result<Manifest> {
        let view_tmp = self.begin_entry(&manifest.key)?;
        let entries = manifest.outputs.clone();
        self.link_view(&entries, &view_tmp)?;
        self.publish(manifest, entries, view_tmp)
    }

    fn push_pending_path(&self, key: &str) -> PathBuf {
        self.root.join("push-pending").join(key)
    }

    /// Notes that entry `key` is about to be pushed (so that a kill during the push is
    /// finished by the next run), or, with `pending: false`, that its push is complete.
    pub fn set_push_pending(&self, key: &str, pending: bool) -> io::Result<()> {
        let path = self.push_pending_path(key);
        if pending {
            fs::create_dir_all(path.parent().expect("push-pending dir"))?;
            write_atomic(&path, b"", false)
        } else {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
    }

    /// True when entry `key` was committed but its push to the remote did not finish.
    pub fn push_pending(&self, key: &str) -> bool {
        self.push_pending_path(key).exists()
    }

    pub fn read_ref(&self, pipeline: &str, stage: &str) -> Option<StageRef> {
        let bytes = fs::read(self.ref_path(pipeline, stage)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn write_ref(&self, pipeline: &str, stage: &str, r: &StageRef) -> io::Result<()> {
        let path = self.ref_path(pipeline, stage);
        fs::create_dir_all(path.parent().expect("refs dir"))?;
        write_atomic(&path, &serde_json::to_vec_pretty(r)?, false)
    }

    /// Writes (or rewrites: the name depends only on its start and this process) the record
    /// of a run.
    pub fn record_run(&self, run: &RunRecord) -> io::Result<()> {
        let name = format!(
            "{}-{}.json",
            run.started.replace([':', '.'], "-"),
            std::process::id()
        );
        write_atomic(
            &self.root.join("runs").join(name),
            &serde_json::to_vec_pretty(run)?,
            false,
        )
    }

    /// All complete entries' keys.
    pub fn keys(&self) -> io::Result<Vec<String>> {
        let mut keys = Vec::new();
        for e in fs::read_dir(self.root.join("stages"))? {
            let e = e?;
            let key = e.file_name().to_string_lossy().into_owned();
            if e.path().join("manifest.json").is_file() {
                keys.push(key);
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Re-hashes every object and output file of every complete entry. A corrupt object is
    /// removed, and every entry that uses it loses its manifest, so the next run re-makes it.
    pub fn verify(&self) -> io::Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut manifests = Vec::new();
        for key in self.keys()? {
            match self.entry(&key) {
                Entry::Current(m) => manifests.push(*m),
                Entry::OtherFormat(_) => report.other_format += 1,
                Entry::Unreadable => {
                    report
                        .problems
                        .push(format!("entry {key}: unreadable manifest"));
                    self.invalidate(&key)?;
                    report.invalidated.push(key);
                }
            }
        }
        report.entries = manifests.len();
        let digests: BTreeSet<&str> = manifests
            .iter()
            .flat_map(|m| m.outputs.iter().map(|f| f.digest.as_str()))
            .collect();
        report.objects = digests.len();
        let bad_objects: Vec<(String, String)> = digests
            .par_iter()
            .filter_map(|d| {
                let path = self.object_path(d);
                match hash_file(&path) {
                    Ok(actual) if actual == *d => None,
                    Ok(actual) => Some((d.to_string(), format!("contents hash to {actual}"))),
                    Err(e) => Some((d.to_string(), format!("unreadable: {e}"))),
                }
            })
            .collect();
        let bad: BTreeSet<&str> = bad_objects.iter().map(|(d, _)| d.as_str()).collect();
        for (d, why) in &bad_objects {
            report
                .problems
                .push(format!("object {d}: expected digest {d}, {why}"));
            let path = self.object_path(d);
            if path.exists() {
                fs::remove_file(&path)?;
            }
        }
        for m in &manifests {
            let out = self.out_dir(&m.key);
            let mut broken = m.outputs.iter().any(|f| bad.contains(f.digest.as_str()));
            for f in &m.outputs {
                if bad.contains(f.digest.as_str()) {
                    continue;
                }
                let view = out.join(&f.path);
                match hash_file(&view) {
                    Ok(actual) if actual == f.digest => {}
                    Ok(actual) => {
                        broken = true;
                        report.problems.push(format!(
                            "stage `{}` ({}): output {} expected digest {}, found {actual}",
                            m.stage,
                            &m.key[..12],
                            f.path,
                            f.digest
                        ));
                    }
                    Err(e) => {
                        broken = true;
                        report.problems.push(format!(
                            "stage `{}` ({}): output {} unreadable: {e}",
                            m.stage,
                            &m.key[..12],
                            f.path
                        ));
                    }
                }
            }
            if broken {
                self.invalidate(&m.key)?;
                report.invalidated.push(m.key.clone());
            }
        }
        // An entry built from a corrupt entry's output may hold results of the bad bytes, and
        // its key would still match once the corrupt entry is re-made with the right ones.
        let mut corrupt: Vec<&Manifest> = manifests
            .iter()
            .filter(|m| report.invalidated.contains(&m.key))
            .collect();
        let mut next = 0;
        while next < corrupt.len() {
            let bad = corrupt[next];
            next += 1;
            for m in &manifests {
                if corrupt.iter().any(|c| c.key == m.key) {
                    continue;
                }
                let Some((name, _)) = m.inputs.iter().find(|(_, input)| read_from(bad, input))
                else {
                    continue;
                };
                report.built_from_corrupt.push(format!(
                    "stage `{}` ({}): its input `{name}` came from stage `{}` ({}), which is corrupt",
                    m.stage,
                    &m.key[..12.min(m.key.len())],
                    bad.stage,
                    &bad.key[..12.min(bad.key.len())]
                ));
                self.invalidate(&m.key)?;
                report.invalidated.push(m.key.clone());
                corrupt.push(m);
            }
        }
        Ok(report)
    }

    /// Makes an entry incomplete (the manifest goes first), so that it is re-made.
    pub fn invalidate(&self, key: &str) -> io::Result<()> {
        let _ = fs::remove_file(self.manifest_path(key));
        let entry = self.entry_dir(key);
        if entry.exists() {
            make_writable(&entry);
            fs::remove_dir_all(&entry)?;
        }
        Ok(())
    }

    /// Removes what no kept entry needs: objects no manifest references and leftovers of
    /// interrupted commits. With `keep_last`, entries too, except those used by the last N
    /// runs (a killed run counts: its record is written as it goes) and those that refs point
    /// at (each stage's last result in each pipeline). Work directories are resume state:
    /// `work` says which go (see [`WorkDirs`]); those of completed keys always go.
    pub fn gc(
        &self,
        keep_last: Option<usize>,
        work: WorkDirs,
        dry_run: bool,
    ) -> io::Result<GcReport> {
        let mut report = GcReport::default();
        let mut keys: BTreeSet<String> = self.keys()?.into_iter().collect();
        let runs = self.run_records()?;
        if let Some(n) = keep_last {
            let mut keep: BTreeSet<String> = self.ref_keys()?;
            for (_, rec) in runs.iter().rev().take(n) {
                keep.extend(rec.keys.values().cloned());
            }
            for (old, _) in runs.iter().rev().skip(n) {
                if !dry_run {
                    fs::remove_file(old)?;
                }
            }
            let drop: Vec<String> = keys
                .iter()
                .filter(|k| !keep.contains(*k))
                .cloned()
                .collect();
            for k in drop {
                if !dry_run {
                    self.invalidate(&k)?;
                }
                report.entries_removed += 1;
                keys.remove(&k);
            }
            self.prune_refs(&keys, dry_run)?;
        }
        // Entries of another cache format are never reused: nothing keeps them.
        let other_format: Vec<String> = keys
            .iter()
            .filter(|k| matches!(self.entry(k), Entry::OtherFormat(_)))
            .cloned()
            .collect();
        for k in other_format {
            if !dry_run {
                self.invalidate(&k)?;
            }
            report.entries_removed += 1;
            report.other_format_removed += 1;
            keys.remove(&k);
        }
        let live: BTreeSet<String> = keys
            .iter()
            .filter_map(|k| self.read_manifest(k))
            .flat_map(|m| m.outputs.into_iter().map(|f| f.digest))
            .collect();
        for shard in fs::read_dir(self.root.join("objects"))? {
            let shard = shard?.path();
            if !shard.is_dir() {
                continue;
            }
            for obj in fs::read_dir(&shard)? {
                let obj = obj?;
                let digest = format!(
                    "{}{}",
                    shard.file_name().unwrap_or_default().to_string_lossy(),
                    obj.file_name().to_string_lossy()
                );
                if !live.contains(&digest) {
                    report.objects_removed += 1;
                    report.bytes_freed += obj.metadata().map(|m| m.len()).unwrap_or(0);
                    if !dry_run {
                        fs::remove_file(obj.path())?;
                    }
                }
            }
        }
        // Entry directories without a manifest are leftovers of interrupted commits.
        for e in fs::read_dir(self.root.join("stages"))? {
            let e = e?;
            if !e.path().join("manifest.json").exists() && !dry_run {
                make_writable(&e.path());
                fs::remove_dir_all(e.path())?;
            }
        }
        // The latest run of each pipeline: the next run of that pipeline resumes its stages.
        let mut latest: BTreeMap<&str, &RunRecord> = BTreeMap::new();
        for (_, rec) in &runs {
            latest.insert(&rec.pipeline, rec);
        }
        let resumable: BTreeSet<&String> = latest.values().flat_map(|r| r.keys.values()).collect();
        for e in fs::read_dir(self.root.join("work"))? {
            let e = e?;
            let key = e.file_name().to_string_lossy().into_owned();
            let remove = keys.contains(&key)
                || match work {
                    WorkDirs::Keep => false,
                    WorkDirs::Unused => !resumable.contains(&key),
                    WorkDirs::All => true,
                };
            if remove {
                report.work_dirs_removed += 1;
                if !dry_run {
                    make_writable(&e.path());
                    fs::remove_dir_all(e.path())?;
                }
            } else {
                report.work_dirs_kept += 1;
                report.work_dirs_of_latest_runs += resumable.contains(&key) as usize;
            }
        }
        Ok(report)
    }

    /// Every run record, oldest first (their names start with the run's start time).
    fn run_records(&self) -> io::Result<Vec<(PathBuf, RunRecord)>> {
        let mut paths: Vec<PathBuf> = fs::read_dir(self.root.join("runs"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        Ok(paths
            .into_iter()
            .filter_map(|p| {
                let rec = serde_json::from_slice::<RunRecord>(&fs::read(&p).ok()?).ok()?;
                Some((p, rec))
            })
            .collect())
    }

    /// The keys that refs point at.
    fn ref_keys(&self) -> io::Result<BTreeSet<String>> {
        let mut keys = BTreeSet::new();
        for p in fs::read_dir(self.root.join("refs"))? {
            let p = p?.path();
            if !p.is_dir() {
                continue;
            }
            for r in fs::read_dir(&p)? {
                if let Some(sr) = fs::read(r?.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<StageRef>(&b).ok())
                {
                    keys.insert(sr.key);
                }
            }
        }
        Ok(keys)
    }

    fn prune_refs(&self, keys: &BTreeSet<String>, dry_run: bool) -> io::Result<()> {
        for p in fs::read_dir(self.root.join("refs"))? {
            let p = p?.path();
            if !p.is_dir() {
                continue;
            }
            for r in fs::read_dir(&p)? {
                let r = r?.path();
                let stale = fs::read(&r)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<StageRef>(&b).ok())
                    .is_none_or(|sr| !keys.contains(&sr.key));
                if stale && !dry_run {
                    fs::remove_file(&r)?;
                }
            }
        }
        Ok(())
    }
}

/// Whether `input` (of some entry) was read from the outputs of the entry `producer`: it names
/// that stage as its source and has the digest of the output it names there.
fn read_from(producer: &Manifest, input: &InputRecord) -> bool {
    let Some(source) = input.source.strip_prefix("stage:") else {
        return false;
    };
    let (stage, output) = match source.split_once('/') {
        Some((stage, output)) => (stage, Some(output)),
        None => (source, None),
    };
    stage == producer.stage && producer.output_digest(output).as_ref() == Some(&input.digest)
}

/// A hidden temporary name beside `path` that no other thread or process uses: stages that
/// run at once may store objects with the same digest at the same moment. `gc` removes what a
/// kill leaves behind.
fn unique_tmp_name(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.tmp{}-{n}", std::process::id()))
}

/// Makes every file under `dir` (the staged outputs, `root` their top) one that only the
/// store's copy owns: a symbolic link becomes a copy of its target, a file with other hard
/// links becomes a private copy. Staged files are the stage's own; their targets are not.
fn own_every_file(dir: &Path, root: &Path, depth: usize) -> io::Result<()> {
    if depth > 64 {
        return Err(io::Error::other(format!(
            "{} is nested too deeply",
            dir.display()
        )));
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let meta = fs::symlink_metadata(&path)?;
        let rel = || {
            path.strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string()
        };
        if meta.file_type().is_symlink() {
            let link = fs::read_link(&path)?;
            let target = fs::metadata(&path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "output `{}` is a symbolic link to {}, which cannot be read ({e}); a stage's outputs must be files or directories",
                        rel(),
                        link.display()
                    ),
                )
            })?;
            let copy = unique_tmp_name(&path);
            if target.is_dir() {
                copy_tree_following_links(&path, &copy, 0)?;
                fs::remove_file(&path)?;
            } else if target.is_file() {
                fs::copy(&path, &copy)?;
            } else {
                continue;
            }
            fs::rename(&copy, &path)?;
        } else if meta.is_dir() {
            own_every_file(&path, root, depth + 1)?;
        } else if meta.is_file() && meta.nlink() > 1 {
            let copy = unique_tmp_name(&path);
            fs::copy(&path, &copy)?;
            fs::rename(&copy, &path)?;
        }
    }
    Ok(())
}

/// Copies the tree at `from` to `to`, with the bytes of every file that a link points to.
fn copy_tree_following_links(from: &Path, to: &Path, depth: usize) -> io::Result<()> {
    if depth > 64 {
        return Err(io::Error::other(format!(
            "{} is nested too deeply (a symbolic link loop?)",
            from.display()
        )));
    }
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (src, dest) = (entry.path(), to.join(entry.file_name()));
        let meta = fs::metadata(&src)?;
        if meta.is_dir() {
            copy_tree_following_links(&src, &dest, depth + 1)?;
        } else if meta.is_file() {
            fs::copy(&src, &dest)?;
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` so that a reader sees either the old file or the whole new one:
/// a temporary file, (optionally) fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = unique_tmp_name(path);
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, path)?;
    if durable {
        sync_dir(dir);
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Read-only objects protect the store from stages that write to their inputs; deleting a
/// tree that contains them needs its directories writable again.
fn make_writable(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&e.path());
            }
        }
    }
}

/// A pipeline name made safe as a directory name.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::digest::hash_bytes;

    /// A manifest of `key` with no inputs or outputs.
    pub(crate) fn manifest(key: &str) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            key: key.into(),
            pipeline: "p".into(),
            stage: "s".into(),
            kind: "command".into(),
            kind_version: 1,
            fields: serde_json::json!({}),
            inputs: BTreeMap::new(),
            outputs: vec![],
            outputs_digest: String::new(),
            started: String::new(),
            finished: String::new(),
            wall_s: 0.0,
            metrics: None,
            log: String::new(),
        }
    }

    fn staged(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
        let s = dir.join(format!("staged-{}", files.len()));
        for (p, c) in files {
            let path = s.join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, c).unwrap();
        }
        s
    }

    #[test]
    fn commit_dedups_objects_and_addresses_outputs() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("cache")).unwrap();
        let key = "a".repeat(64);
        let s = staged(
            tmp.path(),
            &[("x.txt", "same"), ("d/y.txt", "same"), ("d/z.txt", "other")],
        );
        let m = store.commit(&s, manifest(&key)).unwrap();
        assert_eq!(m.outputs.len(), 3);
        assert!(store.lookup(&key).is_some());
        assert_eq!(
            fs::read_to_string(store.out_dir(&key).join("d/y.txt")).unwrap(),
            "same"
        );
        // Two files with the same bytes are one object.
        let objects: usize = fs::read_dir(store.root.join("objects"))
            .unwrap()
            .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum();
        assert_eq!(objects, 2);
        assert_eq!(m.output_digest(Some("x.txt")), Some(hash_bytes(b"same")));
        assert!(m.output_digest(Some("d")).is_some());
        assert_eq!(m.output_digest(Some("nope")), None);
        assert_eq!(m.output_digest(None), Some(m.outputs_digest.clone()));
    }

    #[test]
    fn many_files_with_the_same_bytes_commit_as_one_object() {
        // Every file is stored by its digest from parallel threads: identical files must not
        // race each other into the same temporary object name.
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("cache")).unwrap();
        let names: Vec<String> = (0..256).map(|i| format!("shard-{i:03}.txt")).collect();
        // Several rounds, each with new bytes, because a race shows only some of the time.
        for round in 0..8 {
            let key = format!("{round}").repeat(64);
            let bytes = format!("same bytes, round {round}");
            let files: Vec<(&str, &str)> =
                names.iter().map(|n| (n.as_str(), bytes.as_str())).collect();
            let staged_dir = tmp.path().join(format!("round-{round}"));
            let m = store
                .commit(&staged(&staged_dir, &files), manifest(&key))
                .unwrap();
            assert_eq!(m.outputs.len(), 256);
            for n in &names {
                let view = store.out_dir(&key).join(n);
                assert_eq!(fs::read_to_string(view).unwrap(), bytes);
            }
        }
        let objects: usize = fs::read_dir(store.root.join("objects"))
            .unwrap()
            .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum();
        assert_eq!(objects, 8);
        assert!(store.verify().unwrap().problems.is_empty());
    }

    #[test]
    fn stages_committing_the_same_bytes_at_once_share_one_object() {
        // The runner commits independent stages from parallel threads.
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("cache")).unwrap();
        for round in 0..16 {
            let bytes = format!("shared bytes, round {round}");
            std::thread::scope(|scope| {
                for stage in 0..4 {
                    let (store, bytes, tmp) = (&store, &bytes, tmp.path());
                    scope.spawn(move || {
                        let key = format!("{round}{stage}").repeat(32);
                        let names: Vec<String> = (0..64).map(|i| format!("f{i}")).collect();
                        let files: Vec<(&str, &str)> =
                            names.iter().map(|n| (n.as_str(), bytes.as_str())).collect();
                        let dir = tmp.join(format!("round-{round}-stage-{stage}"));
                        store.commit(&staged(&dir, &files), manifest(&key)).unwrap();
                        let view = store.out_dir(&key).join("f63");
                        assert_eq!(fs::read_to_string(view).unwrap(), *bytes);
                    });
                }
            });
        }
        assert!(store.verify().unwrap().problems.is_empty());
    }

    #[test]
    fn verify_detects_corruption_and_invalidates_the_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("cache")).unwrap();
        let key = "b".repeat(64);
        let s = staged(tmp.path(), &[("x.txt", "good bytes")]);
        let m = store.commit(&s, manifest(&key)).unwrap();
        assert!(store.verify().unwrap().problems.is_empty());
        let obj = store.object_path(&m.outputs[0].digest);
        fs::set_permissions(&obj, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&obj, "evil bytes").unwrap(); // same size: a cheap lookup cannot tell
        let report = store.verify().unwrap();
        assert_eq!(report.invalidated, vec![key.clone()]);
        assert!(
            report.problems[0].contains(&m.outputs[0].digest),
            "{:?}",
            report.problems
        );
        assert!(
            store.lookup(&key).is_none(),
            "a corrupt entry must not be used"
        );
    }

    #[test]
    fn commit_stores_the_bytes_of_links_and_never_touches_their_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("cache")).unwrap();
        let outside = tmp.path().join("outside.txt");
        fs::write(&outside, "mine").unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).unwrap();
        let s = staged(tmp.path(), &[("plain.txt", "plain")]);
        std::os::unix::fs::symlink(&outside, s.join("sym.txt")).unwrap();
        fs::hard_link(&outside, s.join("hard.txt")).unwrap();
        let key = "e".repeat(64);
        store.commit(&s, manifest(&key)).unwrap();
        let meta = fs::metadata(&outside).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        assert_eq!(
            meta.nlink(),
            1,
            "the store must not share the outside file's inode"
        );
        for name in ["sym.txt", "hard.txt"] {
            let view = store.out_dir(&key).join(name);
            assert!(fs::symlink_metadata(&view).unwrap().is_file());
            assert_eq!(fs::read_to_string(view).unwrap(), "mine");
        }
        fs::write(&outside, "changed").unwrap();
        assert!(store.verify().unwrap().problems.is_empty());
    }

    #[test]
    fn damage_is_found_by_stamp_and_bytes_and_the_entry_discarded() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("cache")).unwrap();
        let key = "f".repeat(64);
        let s = staged(tmp.path(), &[("x.txt", "good bytes")]);
        let m = store.commit(&s, manifest(&key)).unwrap();
        assert!(store.damage(&m).is_empty());
        let view = store.out_dir(&key).join("x.txt");
        // A change of mode alone moves ctime: re-hashed, found intact, stamped again.
        fs::set_permissions(&view, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(store.damage(&m).is_empty());
        fs::write(&view, "evil bytes").unwrap();
        let damage = store.damage(&m);
        assert_eq!(damage.len(), 1);
        assert!(
            damage[0]
                .to_string()
                .contains("output x.txt should hash to"),
            "{}",
            damage[0]
        );
        store.discard(&key, &damage);
        assert!(store.lookup(&key).is_none(), "the damaged entry is gone");
        assert!(!store.object_path(&m.outputs[0].digest).exists());
    }

    #[test]
    fn gc_removes_unreferenced_objects_and_abandoned_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("cache")).unwrap();
        let key = "c".repeat(64);
        let s = staged(tmp.path(), &[("x.txt", "kept")]);
        store.commit(&s, manifest(&key)).unwrap();
        let orphan = store.object_path(&hash_bytes(b"orphan"));
        fs::create_dir_all(orphan.parent().unwrap()).unwrap();
        fs::write(&orphan, "orphan").unwrap();
        fs::create_dir_all(store.entry_dir(&"d".repeat(64)).join("out.partial")).unwrap();
        let r = store.gc(None, WorkDirs::Keep, false).unwrap();
        assert_eq!(r.objects_removed, 1);
        assert!(!orphan.exists());
        assert!(!store.entry_dir(&"d".repeat(64)).exists());
        assert!(store.lookup(&key).is_some());
    }
}

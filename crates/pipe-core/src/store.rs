//! The content-addressed store (default `cache/`).
//!
//! ```text
//! cache/
//!   objects/ab/cdef…         file contents by blake3 digest, read-only, shared by all entries
//!   stages/<key>/out/…       a completed stage's outputs (hard links to objects)
//!   stages/<key>/manifest.json   written last: an entry is complete iff its manifest exists
//!   work/<key>/              in-progress state of an unfinished key (staged outputs, resume state)
//!   logs/<key>/<time>.log    one log per attempt
//!   refs/<pipeline>/<stage>.json  the key each stage last completed with (for status/explain)
//!   runs/<time>-<pid>.json   the keys each run used (for gc --keep-last)
//!   hash-memo.json           digests of external inputs by (dev, inode, size, mtime, ctime)
//!   lock                     the workspace lock
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::digest::{hash_file, is_executable, tree_digest, walk_files, FileEntry};

pub const MANIFEST_FORMAT: u32 = 1;

/// A completed stage: what it was made from, what it made, and how it went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: String,
    pub pipeline: String,
    pub stage: String,
    pub kind: String,
    pub kind_version: u32,
    pub params: serde_json::Value,
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

/// A record of which keys one run used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub pipeline: String,
    pub started: String,
    pub keys: BTreeMap<String, String>,
}

/// Problems `verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub entries: usize,
    pub objects: usize,
    pub problems: Vec<String>,
    /// Keys whose manifests were removed so that the next run re-makes them.
    pub invalidated: Vec<String>,
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub objects_removed: usize,
    pub bytes_freed: u64,
    pub entries_removed: usize,
    pub work_dirs_removed: usize,
    pub work_dirs_kept: usize,
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
    /// Where a completed stage's outputs can be read.
    pub fn out_dir(&self, key: &str) -> PathBuf {
        self.entry_dir(key).join("out")
    }
    pub fn work_dir(&self, key: &str) -> PathBuf {
        self.root.join("work").join(key)
    }
    pub fn memo_path(&self) -> PathBuf {
        self.root.join("hash-memo.json")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.root.join("lock")
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

    pub fn read_manifest(&self, key: &str) -> Option<Manifest> {
        let bytes = fs::read(self.manifest_path(key)).ok()?;
        serde_json::from_slice::<Manifest>(&bytes)
            .ok()
            .filter(|m| m.format == MANIFEST_FORMAT && m.key == key)
    }

    /// Moves the files staged in `staged` into the store as the outputs of `manifest.key`, then
    /// writes the manifest. Until the manifest's rename, the entry does not look complete.
    pub fn commit(&self, staged: &Path, mut manifest: Manifest) -> io::Result<Manifest> {
        let key = manifest.key.clone();
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

        // A forced re-run replaces an entry: it stops looking complete before anything changes.
        let entry = self.entry_dir(&key);
        let _ = fs::remove_file(self.manifest_path(&key));
        fs::create_dir_all(&entry)?;
        let view_tmp = entry.join("out.partial");
        if view_tmp.exists() {
            make_writable(&view_tmp);
            fs::remove_dir_all(&view_tmp)?;
        }
        fs::create_dir_all(&view_tmp)?;

        // One staged file per digest becomes the object (the others are only linked to it).
        let mut first_with_digest: BTreeMap<&str, &Path> = BTreeMap::new();
        for ((_, path), e) in listed.iter().zip(&entries) {
            first_with_digest.entry(&e.digest).or_insert(path);
        }
        first_with_digest
            .into_par_iter()
            .map(|(digest, path)| {
                let obj = self.object_path(digest);
                if !obj.exists() {
                    fs::create_dir_all(obj.parent().expect("object dir"))?;
                    fs::File::open(path)?.sync_all()?;
                    let tmp = unique_tmp_name(&obj);
                    if fs::rename(path, &tmp).is_err() {
                        // A symlinked or cross-device staged file: copy its bytes instead.
                        fs::copy(path, &tmp)?;
                    }
                    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))?;
                    fs::rename(&tmp, &obj)?;
                }
                Ok(())
            })
            .collect::<io::Result<()>>()?;
        entries
            .par_iter()
            .map(|e| {
                let obj = self.object_path(&e.digest);
                let dest = view_tmp.join(&e.path);
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
            .collect::<io::Result<()>>()?;

        crate::fault::point("commit-objects-stored");
        let view = self.out_dir(&key);
        if view.exists() {
            make_writable(&view);
            fs::remove_dir_all(&view)?;
        }
        fs::rename(&view_tmp, &view)?;
        sync_dir(&entry);

        crate::fault::point("commit-view-built");
        manifest.outputs_digest = tree_digest(&entries);
        manifest.outputs = entries;
        let body = serde_json::to_vec_pretty(&manifest)?;
        write_atomic(&self.manifest_path(&key), &body, true)?;
        crate::fault::point("commit-manifest-written");
        Ok(manifest)
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
            match self.read_manifest(&key) {
                Some(m) => manifests.push(m),
                None => {
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

    /// Removes what no kept entry needs. With `keep_last`, only the entries used by the last
    /// N runs (and the ones refs point at) are kept. Work directories of unfinished keys are
    /// resume state: they are kept unless `work` is set.
    pub fn gc(&self, keep_last: Option<usize>, work: bool, dry_run: bool) -> io::Result<GcReport> {
        let mut report = GcReport::default();
        let mut keys: BTreeSet<String> = self.keys()?.into_iter().collect();
        if let Some(n) = keep_last {
            let mut runs: Vec<PathBuf> = fs::read_dir(self.root.join("runs"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect();
            runs.sort();
            let recent: Vec<PathBuf> = runs.iter().rev().take(n).cloned().collect();
            let mut keep = BTreeSet::new();
            for r in &recent {
                if let Some(rec) = fs::read(r)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<RunRecord>(&b).ok())
                {
                    keep.extend(rec.keys.into_values());
                }
            }
            for old in runs.iter().rev().skip(n) {
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
        for e in fs::read_dir(self.root.join("work"))? {
            let e = e?;
            let key = e.file_name().to_string_lossy().into_owned();
            if keys.contains(&key) || work {
                report.work_dirs_removed += 1;
                if !dry_run {
                    fs::remove_dir_all(e.path())?;
                }
            } else {
                report.work_dirs_kept += 1;
            }
        }
        Ok(report)
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

/// A hidden temporary name beside `path` that no other thread or process uses: stages that
/// run at once may store objects with the same digest at the same moment. `gc` removes what a
/// kill leaves behind.
fn unique_tmp_name(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.tmp{}-{n}", std::process::id()))
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
mod tests {
    use super::*;
    use crate::digest::hash_bytes;

    fn manifest(key: &str) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            key: key.into(),
            pipeline: "p".into(),
            stage: "s".into(),
            kind: "command".into(),
            kind_version: 1,
            params: serde_json::json!({}),
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
        let r = store.gc(None, false, false).unwrap();
        assert_eq!(r.objects_removed, 1);
        assert!(!orphan.exists());
        assert!(!store.entry_dir(&"d".repeat(64)).exists());
        assert!(store.lookup(&key).is_some());
    }
}

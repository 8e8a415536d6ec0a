//! Content digests (blake3, hex): of files, of file trees, and of external inputs, which are
//! remembered by (device, inode, size, mtime, ctime) so an unchanged large file is read once.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Files at least this large are hashed memory-mapped, on all cores.
const PARALLEL_HASH_MIN: u64 = 4 << 20;

/// The blake3 digest of a file's contents, in hex.
pub fn hash_file(path: &Path) -> io::Result<String> {
    let len = fs::metadata(path)?.len();
    let mut hasher = blake3::Hasher::new();
    if len >= PARALLEL_HASH_MIN {
        hasher.update_mmap_rayon(path)?;
    } else {
        let mut f = fs::File::open(path)?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

pub fn hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// One file of an artifact tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative path with `/` separators.
    pub path: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub executable: bool,
}

/// The digest of a set of files: their relative paths, contents and executable bits.
pub fn tree_digest<'a>(entries: impl IntoIterator<Item = &'a FileEntry>) -> String {
    let mut sorted: Vec<&FileEntry> = entries.into_iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut h = blake3::Hasher::new();
    h.update(b"pipe-tree-v1\n");
    for e in sorted {
        h.update(e.path.as_bytes());
        h.update(b"\0");
        h.update(e.digest.as_bytes());
        h.update(if e.executable { b"\0x\n" } else { b"\0-\n" });
    }
    h.finalize().to_hex().to_string()
}

/// Lists the regular files below `root` (following symlinks), as relative `/` paths, sorted.
pub fn walk_files(root: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    fn go(dir: &Path, rel: &str, depth: usize, out: &mut Vec<(String, PathBuf)>) -> io::Result<()> {
        if depth > 64 {
            return Err(io::Error::other(format!(
                "{} is nested too deeply (a symlink loop?)",
                dir.display()
            )));
        }
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let rel_path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = fs::metadata(&path)?;
            if meta.is_dir() {
                go(&path, &rel_path, depth + 1, out)?;
            } else if meta.is_file() {
                out.push((rel_path, path));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(root, "", 0, &mut out)?;
    out.sort();
    Ok(out)
}

pub fn is_executable(meta: &fs::Metadata) -> bool {
    meta.mode() & 0o111 != 0
}

/// What a file looked like when its bytes were last known to be right. Any write, replacement
/// or mode change moves mtime or ctime (ctime cannot be set back), so an equal stamp means the
/// bytes need not be read again (the hash memo of external inputs, the store's object stamps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stamp {
    pub(crate) fn of(meta: &fs::Metadata) -> Self {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    }
    /// A file modified this recently may change again within the same timestamp tick, so its
    /// digest is not remembered yet.
    fn settled(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos() as i64;
        now - self.mtime_ns.max(self.ctime_ns) > 1_000_000_000
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemoEntry {
    #[serde(flatten)]
    stamp: Stamp,
    digest: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct MemoFile {
    version: u32,
    entries: HashMap<PathBuf, MemoEntry>,
}

/// Digests of external inputs, remembered across runs in the store.
pub struct HashMemo {
    file: Option<PathBuf>,
    entries: HashMap<PathBuf, MemoEntry>,
    dirty: bool,
    /// How many bytes were actually read to hash (the rest came from the memo).
    pub bytes_hashed: u64,
}

/// The digest of an external input, and its files when it is a directory.
#[derive(Debug, Clone)]
pub struct PathDigest {
    pub digest: String,
    pub is_dir: bool,
    pub files: Vec<FileEntry>,
}

impl HashMemo {
    /// Loads the memo kept at `file` (a missing or unreadable memo is simply empty).
    pub fn load(file: &Path) -> Self {
        let entries = fs::read(file)
            .ok()
            .and_then(|b| serde_json::from_slice::<MemoFile>(&b).ok())
            .filter(|m| m.version == 1)
            .map(|m| m.entries)
            .unwrap_or_default();
        HashMemo {
            file: Some(file.to_path_buf()),
            entries,
            dirty: false,
            bytes_hashed: 0,
        }
    }

    /// A memo that is not saved anywhere.
    pub fn in_memory() -> Self {
        HashMemo {
            file: None,
            entries: HashMap::new(),
            dirty: false,
            bytes_hashed: 0,
        }
    }

    /// Writes the memo back if it changed (atomically; a failure only costs a re-hash later).
    pub fn save(&mut self) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        // Forget files that no longer exist, so the memo does not grow forever.
        self.entries.retain(|p, _| p.exists());
        let body = serde_json::to_vec(&MemoFile {
            version: 1,
            entries: self.entries.clone(),
        })?;
        crate::store::write_atomic(file, &body, false)?;
        self.dirty = false;
        Ok(())
    }

    /// The digest of a file or directory outside the store.
    pub fn digest_path(&mut self, path: &Path) -> io::Result<PathDigest> {
        let meta = fs::metadata(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        if meta.is_file() {
            let (digest, _) = self.digest_files(&[path.to_path_buf()])?.remove(0);
            return Ok(PathDigest {
                digest,
                is_dir: false,
                files: Vec::new(),
            });
        }
        let listed = walk_files(path)?;
        let paths: Vec<PathBuf> = listed.iter().map(|(_, p)| p.clone()).collect();
        let digests = self.digest_files(&paths)?;
        let files: Vec<FileEntry> = listed
            .into_iter()
            .zip(digests)
            .map(|((rel, _), (digest, meta))| FileEntry {
                path: rel,
                digest,
                size: meta.size(),
                executable: is_executable(&meta),
            })
            .collect();
        Ok(PathDigest {
            digest: tree_digest(&files),
            is_dir: true,
            files,
        })
    }

    /// Digests of several files, hashing in parallel those the memo does not know.
    fn digest_files(&mut self, paths: &[PathBuf]) -> io::Result<Vec<(String, fs::Metadata)>> {
        let metas: Vec<(PathBuf, fs::Metadata)> = paths
            .iter()
            .map(|p| {
                let abs = fs::canonicalize(p)?;
                let meta = fs::metadata(&abs)?;
                Ok((abs, meta))
            })
            .collect::<io::Result<_>>()?;
        let todo: Vec<usize> = metas
            .iter()
            .enumerate()
            .filter(|(_, (abs, meta))| {
                self.entries
                    .get(abs)
                    .is_none_or(|e| e.stamp != Stamp::of(meta))
            })
            .map(|(i, _)| i)
            .collect();
        let fresh: Vec<(usize, String)> = todo
            .par_iter()
            .map(|&i| hash_file(&metas[i].0).map(|d| (i, d)))
            .collect::<io::Result<_>>()?;
        for (i, digest) in fresh {
            let (abs, meta) = &metas[i];
            self.bytes_hashed += meta.size();
            let stamp = Stamp::of(meta);
            if stamp.settled() {
                self.entries
                    .insert(abs.clone(), MemoEntry { stamp, digest });
                self.dirty = true;
            } else {
                // Keep it for this process only: the answer is right now, just not memorable.
                self.entries
                    .insert(abs.clone(), MemoEntry { stamp, digest });
            }
        }
        Ok(metas
            .into_iter()
            .map(|(abs, meta)| (self.entries[&abs].digest.clone(), meta))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_digest_depends_on_paths_contents_and_modes_not_order() {
        let a = FileEntry {
            path: "a".into(),
            digest: hash_bytes(b"1"),
            size: 1,
            executable: false,
        };
        let b = FileEntry {
            path: "b".into(),
            digest: hash_bytes(b"2"),
            size: 1,
            executable: false,
        };
        let t = tree_digest([&a, &b]);
        assert_eq!(t, tree_digest([&b, &a]));
        let mut b2 = b.clone();
        b2.path = "c".into();
        assert_ne!(t, tree_digest([&a, &b2]));
        let mut b3 = b.clone();
        b3.executable = true;
        assert_ne!(t, tree_digest([&a, &b3]));
    }

    #[test]
    fn memo_rehashes_only_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        fs::write(&f, b"hello").unwrap();
        // Back-date it so the memo may remember it.
        let old = SystemTime::now() - Duration::from_secs(10);
        fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let memo_path = dir.path().join("memo.json");
        let mut memo = HashMemo::load(&memo_path);
        let d1 = memo.digest_path(&f).unwrap().digest;
        assert_eq!(d1, hash_bytes(b"hello"));
        // ctime is "now" after set_modified; the entry becomes memorable a second later.
        std::thread::sleep(Duration::from_millis(1100));
        let mut memo = HashMemo::load(&memo_path);
        memo.digest_path(&f).unwrap();
        memo.save().unwrap();
        let mut memo = HashMemo::load(&memo_path);
        memo.digest_path(&f).unwrap();
        assert_eq!(
            memo.bytes_hashed, 0,
            "unchanged file must come from the memo"
        );
        fs::write(&f, b"world").unwrap();
        let d2 = memo.digest_path(&f).unwrap().digest;
        assert_eq!(d2, hash_bytes(b"world"));
        assert_eq!(memo.bytes_hashed, 5);
    }
}

//! The workspace lock: one writer per store.
//!
//! The kernel's advisory lock (`flock`) on the store directory itself decides who holds it:
//! a killed run can never keep it, and deleting a file cannot hand it to a second writer (the
//! directory is never unlinked while the store exists). The file `lock` in the store only
//! names the holder (PID and process start time), so that a second run can say who holds it,
//! and a run that finds a dead holder's record says it cleared it.

use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Held for as long as the value lives.
#[derive(Debug)]
pub struct WorkspaceLock {
    /// The store directory, opened: its `flock` is the lock.
    dir: File,
    record: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the store {} is in use by another pipe process ({})\n  = help: wait for it to finish, or stop it; two runs on one store would corrupt it",
        path.display(),
        describe(holder.as_ref())
    )]
    Busy {
        path: PathBuf,
        /// `None` when the holder's record could not be read (see [`describe`]).
        holder: Option<Holder>,
    },
    #[error("cannot lock the store {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn describe(holder: Option<&Holder>) -> String {
    match holder {
        Some(h) if h.since.is_empty() => format!("pid {}", h.pid),
        Some(h) => format!("pid {}, started {}", h.pid, h.since),
        None => "its process id could not be read".into(),
    }
}

/// What a lock record says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// The process's start time in clock ticks since boot (/proc/PID/stat field 22), which
    /// tells a live holder from a new process that reused its PID.
    pub start_ticks: u64,
    /// When it took the lock (RFC 3339); empty when only the kernel's lock table named it.
    pub since: String,
}

impl Holder {
    fn current() -> Self {
        let pid = std::process::id();
        Holder {
            pid,
            start_ticks: process_start_ticks(pid).unwrap_or(0),
            since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }
    fn parse(text: &str) -> Option<Self> {
        let mut it = text.split_whitespace();
        Some(Holder {
            pid: it.next()?.parse().ok()?,
            start_ticks: it.next()?.parse().ok()?,
            since: it.next().unwrap_or("").to_string(),
        })
    }
    /// Whether the recorded process is still running (and is the same process).
    pub fn alive(&self) -> bool {
        process_start_ticks(self.pid).is_some_and(|t| t == self.start_ticks)
    }
}

/// How long a refused run waits for the holder to write its record: two runs that start at
/// the same instant find the lock taken before the winner has said who it is.
const RECORD_WAIT: Duration = Duration::from_secs(2);

impl WorkspaceLock {
    /// Takes the lock of the store at `root`, or says who holds it.
    pub fn acquire(root: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: root.to_path_buf(),
            source,
        };
        let dir = File::open(root).map_err(io)?;
        let record = root.join("lock");
        match dir.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Busy {
                    path: root.to_path_buf(),
                    holder: wait_for_holder(&record, &dir),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        if let Some(old) = fs::read_to_string(&record)
            .ok()
            .and_then(|t| Holder::parse(&t))
        {
            if old.pid != std::process::id() {
                tracing::warn!(
                    "cleared a stale lock left by pid {} (started {}), which is no longer running; its unfinished work resumes where it stopped",
                    old.pid,
                    if old.since.is_empty() { "?" } else { &old.since }
                );
            }
        }
        let me = Holder::current();
        // Written whole under a temporary name, so that a reader never sees half a record.
        crate::store::write_atomic(
            &record,
            format!("{} {} {}\n", me.pid, me.start_ticks, me.since).as_bytes(),
            true,
        )
        .map_err(io)?;
        Ok(WorkspaceLock { dir, record })
    }

    /// Who holds the lock of the store at `root`, if anyone does.
    pub fn holder(root: &Path) -> Option<Holder> {
        let dir = File::open(root).ok()?;
        match dir.try_lock_shared() {
            Ok(()) => None,
            Err(_) => wait_for_holder(&root.join("lock"), &dir),
        }
    }
}

/// The live holder named by the record, waiting briefly for a winner that has not written it
/// yet; failing that, the process the kernel's lock table names for the store directory.
fn wait_for_holder(record: &Path, dir: &File) -> Option<Holder> {
    let t = Instant::now();
    loop {
        let named = fs::read_to_string(record)
            .ok()
            .and_then(|t| Holder::parse(&t))
            .filter(Holder::alive);
        if named.is_some() {
            return named;
        }
        if t.elapsed() >= RECORD_WAIT {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    flock_holder(dir).map(|pid| Holder {
        pid,
        start_ticks: process_start_ticks(pid).unwrap_or(0),
        since: String::new(),
    })
}

/// The process that holds a `flock` on `file`, from /proc/locks (lines such as
/// `1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF`).
fn flock_holder(file: &File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let wanted = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = fs::read_to_string("/proc/locks").ok()?;
    // `->` lines are processes waiting for a lock, not holding it.
    locks
        .lines()
        .filter(|l| !l.contains("->"))
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let at = fields.iter().position(|f| *f == "FLOCK")?;
            let pid = fields.get(at + 3)?.parse().ok()?;
            (fields.get(at + 4)? == &wanted).then_some(pid)
        })
}

impl Drop for WorkspaceLock {
    fn drop(&mut self) {
        // An empty record is a cleanly released lock.
        // Replaced, never written through: the record may have been swapped for a link.
        let _ = crate::store::write_atomic(&self.record, b"", false);
        let _ = self.dir.unlock();
        tracing::debug!("released {}", self.record.display());
    }
}

fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it follow the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lock taken by another process (flock locks belong to open files, so this one holds
    /// its own, as a second pipe would).
    fn other_process_holding(root: &Path) -> std::process::Child {
        let child = std::process::Command::new("flock")
            .arg(root)
            .args(["sleep", "30"])
            .spawn()
            .expect("flock(1) runs");
        let t = Instant::now();
        while WorkspaceLock::holder(root).is_none() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    #[test]
    fn second_lock_is_refused_and_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = WorkspaceLock::acquire(dir.path()).unwrap();
        let err = WorkspaceLock::acquire(dir.path()).unwrap_err();
        assert!(
            matches!(&err, LockError::Busy { holder: Some(h), .. } if h.pid == std::process::id()),
            "{err}"
        );
        drop(a);
        assert!(WorkspaceLock::holder(dir.path()).is_none());
        assert_eq!(fs::read_to_string(dir.path().join("lock")).unwrap(), "");
        WorkspaceLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn deleting_the_record_does_not_free_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let _held = WorkspaceLock::acquire(dir.path()).unwrap();
        fs::remove_file(dir.path().join("lock")).unwrap();
        let err = WorkspaceLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(err, LockError::Busy { .. }), "{err}");
    }

    #[test]
    fn a_holder_without_a_record_is_named_from_the_kernels_lock_table() {
        // What a second run sees when the first has the lock but has not written its record.
        let dir = tempfile::tempdir().unwrap();
        let mut child = other_process_holding(dir.path());
        let err = WorkspaceLock::acquire(dir.path()).unwrap_err();
        let _ = child.kill();
        let _ = child.wait();
        let msg = err.to_string();
        assert!(msg.contains(&format!("(pid {})", child.id())), "{msg}");
        assert!(!msg.contains("pid 0"), "{msg}");
    }

    #[test]
    fn a_dead_holder_is_recognised() {
        let h = Holder::parse("999999999 12345 2026-01-01T00:00:00Z").unwrap();
        assert!(!h.alive());
        assert!(Holder::current().alive());
    }
}

//! The workspace lock: one writer per store.
//!
//! The kernel's advisory lock (`flock`) decides who holds it, so a killed run can never keep
//! it; the file also names the holder (PID and process start time) so that a second run can
//! say who holds it, and a run that finds a dead holder's record says it cleared it.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Held for as long as the value lives.
#[derive(Debug)]
pub struct WorkspaceLock {
    file: File,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the store {} is in use by another pipe process (pid {pid}, started {since})\n  = help: wait for it to finish, or stop it; two runs on one store would corrupt it",
        path.display()
    )]
    Busy {
        path: PathBuf,
        pid: u32,
        since: String,
    },
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a lock file says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// The process's start time in clock ticks since boot (/proc/PID/stat field 22), which
    /// tells a live holder from a new process that reused its PID.
    pub start_ticks: u64,
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
            since: it.next().unwrap_or("?").to_string(),
        })
    }
    /// Whether the recorded process is still running (and is the same process).
    pub fn alive(&self) -> bool {
        process_start_ticks(self.pid).is_some_and(|t| t == self.start_ticks)
    }
}

impl WorkspaceLock {
    /// Takes the lock of the store whose lock file is `path`, or says who holds it.
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let h = Holder::parse(&previous);
                return Err(LockError::Busy {
                    path: path.parent().unwrap_or(path).to_path_buf(),
                    pid: h.as_ref().map(|h| h.pid).unwrap_or(0),
                    since: h.map(|h| h.since).unwrap_or_else(|| "?".into()),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        if let Some(old) = Holder::parse(&previous) {
            if old.pid != std::process::id() {
                tracing::warn!(
                    "cleared a stale lock left by pid {} (started {}), which is no longer running; its unfinished work resumes where it stopped",
                    old.pid,
                    old.since
                );
            }
        }
        let me = Holder::current();
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{} {} {}", me.pid, me.start_ticks, me.since).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(WorkspaceLock {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Who holds the lock at `path`, if anyone does.
    pub fn holder(path: &Path) -> Option<Holder> {
        let file = File::open(path).ok()?;
        match file.try_lock_shared() {
            Ok(()) => None,
            Err(_) => Holder::parse(&fs::read_to_string(path).ok()?),
        }
    }
}

impl Drop for WorkspaceLock {
    fn drop(&mut self) {
        // An empty lock file is a cleanly released one.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
        tracing::debug!("released {}", self.path.display());
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

    #[test]
    fn second_lock_is_refused_and_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let a = WorkspaceLock::acquire(&p).unwrap();
        let err = WorkspaceLock::acquire(&p).unwrap_err();
        assert!(
            matches!(err, LockError::Busy { pid, .. } if pid == std::process::id()),
            "{err}"
        );
        assert_eq!(
            WorkspaceLock::holder(&p).map(|h| h.pid),
            Some(std::process::id())
        );
        drop(a);
        assert!(WorkspaceLock::holder(&p).is_none());
        WorkspaceLock::acquire(&p).unwrap();
    }

    #[test]
    fn a_dead_holder_is_recognised() {
        let h = Holder::parse("999999999 12345 2026-01-01T00:00:00Z").unwrap();
        assert!(!h.alive());
        assert!(Holder::current().alive());
    }
}

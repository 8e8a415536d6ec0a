//! Which remote cache a command uses, and the store's `remote.yaml` that remembers it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file in the store's directory that names its remote (`pipe remote set`).
pub const CONFIG_FILE: &str = "remote.yaml";

/// A remote cache: where it is, and whether pipe may write to it. Never credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX`, `az://CONTAINER/PREFIX` or `file:///PATH`.
    pub url: String,
    /// Pull from it, never push (for consumers of a team's results).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// Where the settings in use came from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `--remote` or `PIPE_REMOTE`.
    CommandLine,
    /// The store's `remote.yaml`.
    File(PathBuf),
}

#[derive(Debug)]
pub enum SettingsError {
    Read { path: PathBuf, error: io::Error },
    Parse { path: PathBuf, error: String },
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SettingsError::Read { path, error } => {
                write!(f, "cannot read {}: {error}", path.display())
            }
            SettingsError::Parse { path, error } => write!(
                f,
                "{}:{error} (expected `url: s3://BUCKET/PREFIX` and optionally `read_only: true`; `pipe remote set URL` writes it)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for SettingsError {}

impl Settings {
    /// The remote a command uses: none with `no_remote`; else `url` (from `--remote` or
    /// `PIPE_REMOTE`, read-only with `read_only`); else the store's `remote.yaml`, if any.
    pub fn resolve(
        store_root: &Path,
        url: Option<&str>,
        read_only: bool,
        no_remote: bool,
    ) -> Result<Option<(Settings, Origin)>, SettingsError> {
        if no_remote {
            return Ok(None);
        }
        if let Some(url) = url.filter(|u| !u.is_empty()) {
            let settings = Settings {
                url: url.to_string(),
                read_only,
            };
            return Ok(Some((settings, Origin::CommandLine)));
        }
        let path = store_root.join(CONFIG_FILE);
        Ok(Settings::load(&path)?.map(|mut s| {
            s.read_only |= read_only;
            (s, Origin::File(path))
        }))
    }

    /// Reads `path`, if it exists.
    pub fn load(path: &Path) -> Result<Option<Settings>, SettingsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(SettingsError::Read {
                    path: path.to_path_buf(),
                    error,
                })
            }
        };
        serde_yaml::from_str(&text)
            .map(Some)
            .map_err(|e| SettingsError::Parse {
                path: path.to_path_buf(),
                error: match e.location() {
                    Some(l) => format!("{}:{}: {e}", l.line(), l.column()),
                    None => format!(" {e}"),
                },
            })
    }

    /// Writes them as the store's `remote.yaml` (the store directory is created if needed).
    pub fn save(&self, store_root: &Path) -> io::Result<PathBuf> {
        std::fs::create_dir_all(store_root)?;
        let path = store_root.join(CONFIG_FILE);
        let body = serde_yaml::to_string(self).map_err(io::Error::other)?;
        pipe_core::store::write_atomic(&path, body.as_bytes(), true)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_wins_over_the_file_and_no_remote_over_both() {
        let dir = tempfile::tempdir().unwrap();
        let saved = Settings {
            url: "file:///shared/cache".into(),
            read_only: false,
        };
        saved.save(dir.path()).unwrap();
        let (s, origin) = Settings::resolve(dir.path(), None, false, false)
            .unwrap()
            .unwrap();
        assert_eq!(s, saved);
        assert_eq!(origin, Origin::File(dir.path().join(CONFIG_FILE)));
        let (s, origin) = Settings::resolve(dir.path(), Some("s3://b/p"), true, false)
            .unwrap()
            .unwrap();
        assert_eq!((s.url.as_str(), s.read_only), ("s3://b/p", true));
        assert_eq!(origin, Origin::CommandLine);
        assert!(Settings::resolve(dir.path(), Some("s3://b/p"), false, true)
            .unwrap()
            .is_none());
        // --remote-read-only applies to the file's remote too.
        let (s, _) = Settings::resolve(dir.path(), None, true, false)
            .unwrap()
            .unwrap();
        assert!(s.read_only);
    }

    #[test]
    fn a_mistake_in_remote_yaml_names_the_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "url: s3://b/p\nread_onyl: true\n",
        )
        .unwrap();
        let err = Settings::resolve(dir.path(), None, false, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("remote.yaml:2:1"), "{err}");
        assert!(err.contains("read_onyl"), "{err}");
    }
}

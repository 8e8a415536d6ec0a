//! Names that become paths below a directory pipe writes into: a file a Hub repository lists,
//! a download's `file_name:`, a command's `outs`. Each comes from a remote server, a manifest
//! or a pipeline file, none of which pipe controls, so every one passes [`relative_path`]
//! before pipe creates or writes anything under it. A name that passes stays below the
//! directory it is joined to, whatever that directory is.

use std::fmt;
use std::path::{Component, Path};

/// The longest name accepted, in bytes (Linux's PATH_MAX is 4096; names this long are
/// already a sign of a hostile listing).
pub const MAX_NAME_BYTES: usize = 1024;
/// The longest component accepted, in bytes (NAME_MAX on every common file system).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// A name refused by [`relative_path`], and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsafeName {
    /// The name as given.
    pub name: String,
    pub reason: &'static str,
}

impl fmt::Display for UnsafeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", shown(&self.name), self.reason)
    }
}

impl std::error::Error for UnsafeName {}

/// The name quoted for a message: control characters escaped, and cut short when huge.
fn shown(name: &str) -> String {
    const SHOWN_CHARS: usize = 120;
    let mut quoted: String = name
        .chars()
        .take(SHOWN_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if name.chars().count() > SHOWN_CHARS {
        quoted.push('…');
    }
    format!("`{quoted}`")
}

/// Checks that `name` is a plain relative path: `/`-separated components, none of them empty,
/// `.` or `..`, no leading `/`, no NUL or other control character, at most
/// [`MAX_NAME_BYTES`] long with components of at most [`MAX_COMPONENT_BYTES`]. Returns it as
/// a path to join to the directory it belongs in.
pub fn relative_path(name: &str) -> Result<&Path, UnsafeName> {
    let refuse = |reason| {
        Err(UnsafeName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return refuse("is empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return refuse("is longer than 1024 bytes");
    }
    if name.contains('\0') {
        return refuse("contains a NUL byte");
    }
    if name.chars().any(char::is_control) {
        return refuse("contains a control character");
    }
    if name.starts_with('/') {
        return refuse("is an absolute path; only a path relative to its directory is allowed");
    }
    for part in name.split('/') {
        match part {
            "" => return refuse("has an empty component (`//` or a trailing `/`)"),
            "." => return refuse("has a `.` component"),
            ".." => return refuse("has a `..` component, which would leave its directory"),
            _ if part.len() > MAX_COMPONENT_BYTES => {
                return refuse("has a component longer than 255 bytes")
            }
            _ => {}
        }
    }
    let path = Path::new(name);
    // What the checks above promise, in the terms the file system uses.
    debug_assert!(path.components().all(|c| matches!(c, Component::Normal(_))));
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_pass_and_escapes_are_refused() {
        for ok in [
            "config.json",
            "sub/dir/x.bin",
            "..hidden",
            "a..b",
            ".gitattributes",
        ] {
            assert_eq!(relative_path(ok).unwrap(), Path::new(ok));
        }
        for (bad, why) in [
            ("", "empty"),
            ("../../x", "`..`"),
            ("a/../../x", "`..`"),
            ("/etc/passwd", "absolute"),
            ("a//b", "empty component"),
            ("a/", "empty component"),
            ("./a", "`.`"),
            ("a\0b", "NUL"),
            ("a\nb", "control"),
        ] {
            let e = relative_path(bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
        }
        let long = "x/".repeat(600);
        assert!(relative_path(&long)
            .unwrap_err()
            .to_string()
            .contains("1024"));
        assert!(relative_path(&"y".repeat(256))
            .unwrap_err()
            .to_string()
            .contains("255"));
    }

    #[test]
    fn messages_show_the_name_escaped() {
        let e = relative_path("a\nb/../c").unwrap_err().to_string();
        assert!(e.starts_with("`a\\nb/../c`"), "{e}");
    }
}

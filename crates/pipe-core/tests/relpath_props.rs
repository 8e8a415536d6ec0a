//! Properties of `pipe_core::relpath::relative_path`, the one check every name that becomes a
//! path passes: whatever it accepts stays below the directory it is joined to, and whatever
//! could leave it (a `..`, a leading `/`), hide a separator (NUL) or confuse a listing (empty
//! components, control characters) is refused.

use std::path::{Component, Path, PathBuf};

use pipe_core::relpath::{relative_path, MAX_COMPONENT_BYTES, MAX_NAME_BYTES};
use proptest::prelude::*;

/// Joins `name` to `/base` and resolves `.` and `..` the way the kernel would for
/// directories: where the path really ends up.
fn lexical_target(name: &Path) -> PathBuf {
    let mut out = PathBuf::from("/base");
    for c in name.components() {
        match c {
            Component::RootDir => out = PathBuf::from("/"),
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Strings rich in the characters that matter: separators, dots, NUL, controls, non-ASCII.
fn hostile_name() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("/".to_string()),
            Just("..".to_string()),
            Just(".".to_string()),
            Just("\0".to_string()),
            Just("\n".to_string()),
            Just("\\".to_string()),
            Just("é".to_string()),
            "[a-z0-9_-]{1,6}",
        ],
        0..12,
    )
    .prop_map(|parts| parts.concat())
}

/// Names a Hub repository really has: `/`-separated plain components.
fn plain_name() -> impl Strategy<Value = String> {
    prop::collection::vec("[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}", 1..6).prop_map(|c| c.join("/"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn whatever_is_accepted_stays_below_its_directory(name in hostile_name()) {
        if let Ok(path) = relative_path(&name) {
            let target = lexical_target(path);
            prop_assert!(target.starts_with("/base") && target != Path::new("/base"),
                "{name:?} reaches {}", target.display());
            prop_assert!(path.components().all(|c| matches!(c, Component::Normal(_))), "{name:?}");
            prop_assert!(!name.contains('\0') && !name.chars().any(char::is_control));
        }
    }

    #[test]
    fn any_parent_component_or_leading_slash_is_refused(
        before in prop::collection::vec("[a-z]{1,5}", 0..4),
        after in prop::collection::vec("[a-z]{1,5}", 0..4),
    ) {
        let mut parts = before.clone();
        parts.push("..".into());
        parts.extend(after.iter().cloned());
        let dotdot = parts.join("/");
        let e = relative_path(&dotdot).unwrap_err();
        prop_assert!(e.to_string().contains(&format!("`{dotdot}`")), "{e}");
        let absolute = format!("/{}", before.join("/"));
        prop_assert!(relative_path(&absolute).is_err(), "{absolute:?}");
    }

    #[test]
    fn plain_relative_names_pass_unchanged(name in plain_name()) {
        prop_assume!(name.split('/').all(|c| c != "." && c != ".."));
        prop_assert_eq!(relative_path(&name).unwrap(), Path::new(&name));
    }

    #[test]
    fn nul_and_empty_components_are_refused(a in "[a-z]{1,8}", b in "[a-z]{1,8}") {
        for bad in [format!("{a}\0{b}"), format!("{a}//{b}"), format!("{a}/"), format!("{a}/./{b}"), String::new()] {
            prop_assert!(relative_path(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lengths_are_bounded(n in 1usize..3000) {
        let component = "c".repeat(n);
        prop_assert_eq!(relative_path(&component).is_ok(), n <= MAX_COMPONENT_BYTES);
        let long = vec!["abcdefg"; n / 4 + 1].join("/");
        prop_assert_eq!(relative_path(&long).is_ok(), long.len() <= MAX_NAME_BYTES);
    }
}

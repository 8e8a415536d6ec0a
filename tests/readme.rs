//! The README's stage-kind reference cannot drift from the code: every kind the binary offers
//! has a row, and the row names every field the kind accepts (as its parser lists them).

use std::path::Path;

#[test]
fn readme_reference_table_lists_every_kind_and_field() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let registry = pipe_stages::registry();
    for kind in registry.kinds() {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", kind.name())))
            .unwrap_or_else(|| panic!("README has no reference row for kind `{}`", kind.name()));
        let yaml = format!(
            "name: t\nstages:\n  s:\n    kind: {}\n    zz_not_a_field: 1\n",
            kind.name()
        );
        let err = match pipe_core::spec::parse(Path::new("t.yaml"), &yaml, &[], &registry) {
            Err(pipe_core::LoadError::Spec(e)) => e,
            other => panic!("expected an unknown-field error, got {other:?}"),
        };
        let help = err.help.clone().unwrap_or_default();
        let fields: Vec<&str> = help.split('`').skip(1).step_by(2).collect();
        assert!(!fields.is_empty(), "no field list in {help:?}");
        for f in fields {
            assert!(
                row.contains(&format!("`{f}`")),
                "README row for `{}` does not mention field `{f}`",
                kind.name()
            );
        }
    }
}

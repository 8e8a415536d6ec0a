//! `pipe kinds` lists every stage kind the binary offers, a line each: name, version and
//! summary, in aligned columns; below a kind that has run settings, a line that names them.

mod common;

use common::Project;

#[test]
fn kinds_lists_every_registered_kind_with_its_version_and_summary() {
    let out = Project::new().pipe(&["kinds"]).ok().stdout;
    let registry = pipe_stages::registry();
    for name in [
        "download", "format", "tokenize", "train", "evaluate", "export", "command",
    ] {
        assert!(
            registry.get(name).is_some(),
            "kind `{name}` is not registered"
        );
    }
    let mut summary_columns = Vec::new();
    for kind in registry.kinds() {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(kind.name()))
            .unwrap_or_else(|| panic!("no line for kind `{}` in:\n{out}", kind.name()));
        assert_eq!(
            line.split_whitespace().nth(1),
            Some(format!("v{}", kind.version()).as_str()),
            "{line}"
        );
        assert!(
            !kind.summary().is_empty(),
            "kind `{}` has no summary",
            kind.name()
        );
        assert!(line.ends_with(kind.summary()), "{line}");
        summary_columns.push(line.len() - kind.summary().len());
    }
    let kind_lines = out.lines().filter(|l| !l.starts_with(' ')).count();
    assert_eq!(kind_lines, registry.names().len(), "{out}");
    for kind in registry.kinds().filter(|k| !k.run_settings().is_empty()) {
        let mut lines = out.lines().skip_while(|l| !l.starts_with(kind.name()));
        lines.next();
        assert_eq!(
            lines.next().map(str::trim),
            Some(format!(
                "run settings, never in the cache key: {}",
                kind.run_settings().join(", ")
            ))
            .as_deref(),
            "{out}"
        );
    }
    summary_columns.dedup();
    assert_eq!(summary_columns.len(), 1, "summaries not aligned:\n{out}");
}

#[test]
fn help_points_to_pipe_kinds() {
    let p = Project::new();
    assert!(p.pipe(&["--help"]).ok().stdout.contains("kinds"));
    for cmd in ["run", "check"] {
        let help = p.pipe(&[cmd, "--help"]).ok().stdout;
        assert!(help.contains("`pipe kinds`"), "pipe {cmd} --help:\n{help}");
    }
}

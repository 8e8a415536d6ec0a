//! The cache key recipe — the one place that decides when a stage must run again.
//!
//! key = blake3("pipe-key-v1\n" ‖ canonical JSON of {
//!     kind,            the stage kind's name
//!     kind_version,    bumped when the kind's implementation changes its outputs
//!     params,          the effective parameters (defaults filled in, `--set` applied)
//!     inputs,          input name → blake3 digest of the bytes it reads
//! })
//!
//! Inputs enter by content, never by location or by the upstream stage's key: an upstream
//! stage that re-runs and makes the same bytes leaves its downstream keys unchanged (early
//! cutoff). The stage's id does not enter either: renaming a stage keeps its cache.
//! Canonical JSON: object keys sorted (serde_json's default map is ordered), no whitespace,
//! numbers in their shortest round-trip form, so a key is the same on every machine.

use std::collections::BTreeMap;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeyRecipe {
    pub kind: String,
    pub kind_version: u32,
    pub params: serde_json::Value,
    /// Input name → content digest.
    pub inputs: BTreeMap<String, String>,
}

impl KeyRecipe {
    pub fn canonical(&self) -> String {
        // `serde_json::Value` objects are BTreeMaps (no `preserve_order`), so this is sorted.
        let v = serde_json::to_value(self).expect("recipe serialises");
        serde_json::to_string(&v).expect("recipe serialises")
    }

    pub fn key(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"pipe-key-v1\n");
        h.update(self.canonical().as_bytes());
        h.finalize().to_hex().to_string()
    }
}

/// One difference between the recipe of the last completed run of a stage and today's.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Kind {
        from: String,
        to: String,
    },
    KindVersion {
        from: u32,
        to: u32,
    },
    Param {
        path: String,
        from: Option<serde_json::Value>,
        to: Option<serde_json::Value>,
    },
    Input {
        name: String,
        from: Option<String>,
        to: Option<String>,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<serde_json::Value>| match v {
            Some(v) => v.to_string(),
            None => "(unset)".to_string(),
        };
        let short = |d: &Option<String>| match d {
            Some(d) => d.chars().take(12).collect::<String>(),
            None => "(none)".to_string(),
        };
        match self {
            Change::Kind { from, to } => write!(f, "kind changed: {from} → {to}"),
            Change::KindVersion { from, to } => {
                write!(
                    f,
                    "the kind's implementation changed: version {from} → {to}"
                )
            }
            Change::Param {
                path,
                from: Some(a),
                to: Some(b),
            } => {
                let (a, b) = elide_common(&a.to_string(), &b.to_string());
                write!(f, "param `{path}` changed: {a} → {b}")
            }
            Change::Param { path, from, to } => {
                write!(f, "param `{path}` changed: {} → {}", show(from), show(to))
            }
            Change::Input {
                name,
                from: None,
                to,
            } => write!(f, "input `{name}` added ({})", short(to)),
            Change::Input {
                name,
                from,
                to: None,
            } => write!(f, "input `{name}` removed (was {})", short(from)),
            Change::Input { name, from, to } => {
                write!(f, "input `{name}` changed: {} → {}", short(from), short(to))
            }
        }
    }
}

/// Shortens two long values to the part where they differ, with a little context.
fn elide_common(a: &str, b: &str) -> (String, String) {
    const CONTEXT: usize = 12;
    if a.chars().count() <= 60 && b.chars().count() <= 60 {
        return (a.to_string(), b.to_string());
    }
    let (ac, bc): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let prefix = ac.iter().zip(&bc).take_while(|(x, y)| x == y).count();
    let max_suffix = ac.len().min(bc.len()) - prefix;
    let suffix = ac
        .iter()
        .rev()
        .zip(bc.iter().rev())
        .take(max_suffix)
        .take_while(|(x, y)| x == y)
        .count();
    let cut = |c: &[char]| {
        let start = prefix.saturating_sub(CONTEXT);
        let end = (c.len() - suffix + CONTEXT).min(c.len());
        let mut s = String::new();
        if start > 0 {
            s.push('…');
        }
        s.extend(&c[start..end]);
        if end < c.len() {
            s.push('…');
        }
        s
    };
    (cut(&ac), cut(&bc))
}

/// What differs between `old` and `new`, field by field.
pub fn diff(old: &KeyRecipe, new: &KeyRecipe) -> Vec<Change> {
    let mut out = Vec::new();
    if old.kind != new.kind {
        out.push(Change::Kind {
            from: old.kind.clone(),
            to: new.kind.clone(),
        });
    }
    if old.kind_version != new.kind_version {
        out.push(Change::KindVersion {
            from: old.kind_version,
            to: new.kind_version,
        });
    }
    diff_values("", Some(&old.params), Some(&new.params), &mut out);
    let names: std::collections::BTreeSet<&String> =
        old.inputs.keys().chain(new.inputs.keys()).collect();
    for name in names {
        let (a, b) = (old.inputs.get(name), new.inputs.get(name));
        if a != b {
            out.push(Change::Input {
                name: name.clone(),
                from: a.cloned(),
                to: b.cloned(),
            });
        }
    }
    out
}

fn diff_values(
    path: &str,
    a: Option<&serde_json::Value>,
    b: Option<&serde_json::Value>,
    out: &mut Vec<Change>,
) {
    use serde_json::Value;
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff_values(&p, x.get(k), y.get(k), out);
            }
        }
        (a, b) if a != b => out.push(Change::Param {
            path: if path.is_empty() {
                "(all)".into()
            } else {
                path.to_string()
            },
            from: a.cloned(),
            to: b.cloned(),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn recipe() -> KeyRecipe {
        KeyRecipe {
            kind: "command".into(),
            kind_version: 1,
            params: json!({"cmd": "echo", "env": {"A": "1"}, "lr": 0.1}),
            inputs: BTreeMap::from([("data".to_string(), "ab".repeat(32))]),
        }
    }

    #[test]
    fn the_key_is_pinned() {
        // A key must be the same in every process, on every platform, in every release that
        // does not bump `pipe-key-v1`: this constant is that promise.
        assert_eq!(
            recipe().canonical(),
            r#"{"inputs":{"data":"abababababababababababababababababababababababababababababababab"},"kind":"command","kind_version":1,"params":{"cmd":"echo","env":{"A":"1"},"lr":0.1}}"#
        );
        assert_eq!(
            recipe().key(),
            blake3::hash(format!("pipe-key-v1\n{}", recipe().canonical()).as_bytes())
                .to_hex()
                .to_string()
        );
    }

    #[test]
    fn every_component_changes_the_key() {
        let base = recipe().key();
        let mut r = recipe();
        r.params["lr"] = json!(0.2);
        assert_ne!(r.key(), base);
        let mut r = recipe();
        r.params["env"]["A"] = json!("2");
        assert_ne!(r.key(), base);
        let mut r = recipe();
        r.kind_version = 2;
        assert_ne!(r.key(), base);
        let mut r = recipe();
        r.inputs.insert("data".into(), "cd".repeat(32));
        assert_ne!(r.key(), base);
        let mut r = recipe();
        r.kind = "other".into();
        assert_ne!(r.key(), base);
    }

    #[test]
    fn long_values_are_shown_around_the_difference() {
        assert_eq!(
            elide_common("short", "other"),
            ("short".to_string(), "other".to_string())
        );
        let (a, b) = elide_common(
            &format!("{}3{}", "p".repeat(50), "s".repeat(50)),
            &format!("{}4{}", "p".repeat(50), "s".repeat(50)),
        );
        assert_eq!(a, format!("…{}3{}…", "p".repeat(12), "s".repeat(12)));
        assert_eq!(b, format!("…{}4{}…", "p".repeat(12), "s".repeat(12)));
    }

    #[test]
    fn diff_names_the_changed_param_and_input() {
        let mut r = recipe();
        r.params["env"]["A"] = json!("2");
        r.inputs.insert("data".into(), "cd".repeat(32));
        let d = diff(&recipe(), &r);
        let shown: Vec<String> = d.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            shown,
            vec![
                "param `env.A` changed: \"1\" → \"2\"".to_string(),
                "input `data` changed: abababababab → cdcdcdcdcdcd".to_string(),
            ]
        );
    }
}

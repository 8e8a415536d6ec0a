//! The cache key recipe — the one place that decides when a stage must run again.
//!
//! ```text
//! key = blake3("pipe-key-v2\n" ‖ canonical JSON of {
//!     kind,          the stage kind's name                       ("train")
//!     kind_version,  bumped when the kind's code changes what it makes
//!     fields,        the kind's key fields: its typed key struct ([`KeyFields::of`])
//!     inputs,        input name → blake3 digest of the bytes it reads
//! })
//! ```
//!
//! # What enters a key
//! - **The kind and its version.** A kind bumps its version whenever a change in its code can
//!   change its outputs, so that results made by older code are not reused.
//! - **The key fields.** Each kind declares them as one `Serialize` struct next to its YAML
//!   fields, built from them by one function (defaults filled in, `--set` applied, derived
//!   values resolved: `template: alpaca` enters as the template's text). They are the settings
//!   that decide the bytes of the result, and nothing else.
//! - **The inputs, by content.** Every file, directory or upstream output a stage reads enters
//!   as its blake3 digest under a name the kind gives it (`data`, `task/arc_easy`). An upstream
//!   stage that runs again and makes the same bytes leaves downstream keys as they were (early
//!   cutoff).
//!
//! # What never enters a key, and why
//! - **Where anything is**: input paths, the store's location, the pipeline file's directory,
//!   the working directory. Moving a data file (same bytes) or the project must keep its cache;
//!   the bytes are already in through the input digests. (The `command` kind names its deps in
//!   its command line, `${data/raw.csv}`: there, where a dep lies is part of the command.)
//! - **Names**: the stage's id, the ids of the stages it reads, the pipeline's name. Renaming a
//!   stage keeps its cache; a name that ends up in the outputs (a task's name names its
//!   `items/<task>.jsonl`) is a key field because of that, not because it is a name.
//! - **Run settings**, which change how a result is made but not what it is: the device, an
//!   evaluation's batch size, checkpoint frequency (`save_steps`), gradient checkpointing,
//!   retries, delivery targets (`to:`). Each kind lists its own
//!   ([`crate::StageKind::run_settings`]); `status --explain` never reports them as changes.
//!   (Settings that change float rounding of training — micro-batch size, replicas, the
//!   compute dtype — are key fields: they make other weights.)
//! - **Secrets**: tokens (`HF_TOKEN`) and credentials come from the environment and are never
//!   hashed, so a key can be shared without leaking them and does not change when one rotates.
//! - **Time, hosts, users, process ids**: a key is the same on every machine and in every
//!   process.
//!
//! # Canonical form
//! JSON with object keys sorted (serde_json's map is ordered), no whitespace, integers as
//! integers, floats in their shortest round-trip form as serde_json writes them (`0.00002`,
//! `2e-7`, `1e+20`, `0.1`). The tests pin that spelling and one key of every kind
//! (tests/cache_keys.rs): a dependency bump that changed how a float is printed fails them
//! instead of silently invalidating every user's cache.
//! Bumping `pipe-key-v2` (with [`crate::store::MANIFEST_FORMAT`]) is the one way to change the
//! recipe for every kind at once; entries of an older format are then misses, never misread.

use std::collections::BTreeMap;

use serde::Serialize;

/// The prefix hashed before every key: the version of this recipe.
pub const KEY_FORMAT: &str = "pipe-key-v2";

/// A stage's key fields: its kind's key struct, serialised once into the canonical form.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyFields(serde_json::Value);

impl KeyFields {
    /// The key fields of a stage, from its kind's key struct (a struct of named fields).
    ///
    /// # Panics
    /// When `fields` does not serialise to a JSON object, or holds a float that is not finite
    /// (JSON would write it as `null`, so two different values would share a key). Key structs
    /// are written by pipe's kinds, and their parsers refuse such values from user input: this
    /// is a bug in a kind, caught by the key tests of every kind.
    pub fn of<T: Serialize>(fields: &T) -> Self {
        let value = match serde_json::to_value(fields) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            Ok(other) => panic!("a kind's key fields must be a struct, not {other}"),
            Err(e) => panic!("a kind's key fields cannot be serialised: {e}"),
        };
        KeyFields(value)
    }

    /// Key fields read back from a stored manifest, to compare with today's.
    pub fn from_json(value: serde_json::Value) -> Self {
        KeyFields(value)
    }

    pub fn as_json(&self) -> &serde_json::Value {
        &self.0
    }
}

impl Serialize for KeyFields {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// Everything a key is made of.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeyRecipe {
    pub kind: String,
    pub kind_version: u32,
    pub fields: KeyFields,
    /// Input name → content digest.
    pub inputs: BTreeMap<String, String>,
}

impl KeyRecipe {
    /// The recipe as the canonical JSON text that is hashed.
    pub fn canonical(&self) -> String {
        // `serde_json::Value` objects are BTreeMaps (no `preserve_order`), so this is sorted.
        let v = serde_json::to_value(self).expect("a recipe is JSON");
        serde_json::to_string(&v).expect("a recipe is JSON")
    }

    pub fn key(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(KEY_FORMAT.as_bytes());
        h.update(b"\n");
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
    diff_values(
        "",
        Some(old.fields.as_json()),
        Some(new.fields.as_json()),
        &mut out,
    );
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

    #[derive(Serialize)]
    struct CommandKey {
        cmd: &'static str,
        env: BTreeMap<&'static str, &'static str>,
        lr: f64,
    }

    fn recipe() -> KeyRecipe {
        KeyRecipe {
            kind: "command".into(),
            kind_version: 1,
            fields: KeyFields::of(&CommandKey {
                cmd: "echo",
                env: BTreeMap::from([("A", "1")]),
                lr: 2e-5,
            }),
            inputs: BTreeMap::from([("data".to_string(), "ab".repeat(32))]),
        }
    }

    fn with_fields(edit: impl FnOnce(&mut serde_json::Value)) -> KeyRecipe {
        let mut r = recipe();
        let mut v = r.fields.as_json().clone();
        edit(&mut v);
        r.fields = KeyFields::from_json(v);
        r
    }

    #[test]
    fn the_key_is_pinned() {
        // A key must be the same in every process, on every platform, in every release that
        // does not bump `pipe-key-v2`: this constant is that promise.
        assert_eq!(
            recipe().canonical(),
            r#"{"fields":{"cmd":"echo","env":{"A":"1"},"lr":0.00002},"inputs":{"data":"abababababababababababababababababababababababababababababababab"},"kind":"command","kind_version":1}"#
        );
        assert_eq!(
            recipe().key(),
            "befb56cceb627c48554acba4798f0a974585f0647c8a1eca458b323a7f8bacf0"
        );
    }

    #[test]
    fn floats_print_in_their_shortest_round_trip_form() {
        // How a float is spelt is part of every key that holds one (learning rates, ratios):
        // a serialiser that printed 2e-5 as 0.00002 would invalidate every cache.
        let spelt = |x: f64| serde_json::to_string(&json!(x)).unwrap();
        assert_eq!(spelt(2e-5), "0.00002");
        assert_eq!(spelt(2e-7), "2e-7");
        assert_eq!(spelt(0.1), "0.1");
        assert_eq!(spelt(1e-8), "1e-8");
        assert_eq!(spelt(16.0), "16.0");
        assert_eq!(spelt(0.03), "0.03");
        assert_eq!(spelt(1.0e20), "1e+20");
        assert_eq!(spelt(0.999), "0.999");
    }

    #[test]
    #[should_panic(expected = "must be a struct")]
    fn key_fields_are_a_struct() {
        KeyFields::of(&3u32);
    }

    #[test]
    fn every_component_changes_the_key() {
        let base = recipe().key();
        assert_ne!(with_fields(|v| v["lr"] = json!(2.1e-5)).key(), base);
        assert_ne!(with_fields(|v| v["env"]["A"] = json!("2")).key(), base);
        let mut r = recipe();
        r.kind_version = 2;
        assert_ne!(r.key(), base);
        let mut r = recipe();
        r.inputs.insert("data".into(), "cd".repeat(32));
        assert_ne!(r.key(), base);
        let mut r = recipe();
        r.inputs = BTreeMap::from([("other".to_string(), "ab".repeat(32))]);
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
    fn diff_names_the_changed_field_and_input() {
        let mut r = with_fields(|v| v["env"]["A"] = json!("2"));
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

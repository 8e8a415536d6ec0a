//! Random edits of a valid text, for the fuzz tests of pipe's readers (pipeline files, records,
//! task rows). Each crate's fuzz test passes its own alphabet of troublesome pieces.

use proptest::prelude::*;
use proptest::test_runner::Config;

/// 1,024 cases a property (`PROPTEST_CASES` overrides), and no regression files.
pub fn config() -> Config {
    Config {
        cases: 1024,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A run of 1–5 pieces of `alphabet`.
pub fn junk(alphabet: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(alphabet), 1..6).prop_map(|v| v.concat())
}

#[derive(Debug, Clone)]
pub enum Edit {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
    Replace { at: usize, len: usize, text: String },
}

pub fn edit(alphabet: &'static [&'static str]) -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1..12usize).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), junk(alphabet)).prop_map(|(at, text)| Edit::Insert { at, text }),
        (any::<usize>(), 1..12usize, junk(alphabet))
            .prop_map(|(at, len, text)| { Edit::Replace { at, len, text } }),
    ]
}

/// Applies edits to the text's characters (so the result is still a `str`).
pub fn mutate(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        let n = chars.len() + 1;
        match e {
            Edit::Delete { at, len } => {
                let at = at % n;
                let end = (at + len).min(chars.len());
                chars.drain(at.min(end)..end);
            }
            Edit::Insert { at, text } => {
                let at = at % n;
                chars.splice(at..at, text.chars());
            }
            Edit::Replace { at, len, text } => {
                let at = at % n;
                let end = (at + len).min(chars.len());
                chars.splice(at.min(end)..end, text.chars());
            }
        }
    }
    chars.into_iter().collect()
}

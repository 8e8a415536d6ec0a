//! Located errors for pipeline files, rendered the way rustc renders them:
//! what went wrong, `--> file:line:column`, the source line, the field, and what to do.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a path into a YAML document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// A path into the pipeline document, e.g. `stages.prep.deps[1]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<PathSeg>);

impl FieldPath {
    pub fn root() -> Self {
        FieldPath(Vec::new())
    }
    pub fn key(&self, k: impl Into<String>) -> Self {
        let mut p = self.clone();
        p.0.push(PathSeg::Key(k.into()));
        p
    }
    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(PathSeg::Index(i));
        p
    }
    pub fn join(&self, other: &FieldPath) -> Self {
        let mut p = self.clone();
        p.0.extend(other.0.iter().cloned());
        p
    }
    pub fn parent(&self) -> Option<FieldPath> {
        if self.0.is_empty() {
            None
        } else {
            Some(FieldPath(self.0[..self.0.len() - 1].to_vec()))
        }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(document)");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                PathSeg::Key(k) if i == 0 => write!(f, "{k}")?,
                PathSeg::Key(k) => write!(f, ".{k}")?,
                PathSeg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Whether an error points at a mapping key (`cmdd:`) or at the value under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Key,
    Value,
}

/// An error that a kind or the spec parser reports against a field, before it is located in a file.
#[derive(Debug, Clone)]
pub struct FieldError {
    pub path: FieldPath,
    pub target: Target,
    pub message: String,
    pub help: Option<String>,
}

impl FieldError {
    pub fn new(path: FieldPath, target: Target, message: impl Into<String>) -> Self {
        FieldError {
            path,
            target,
            message: message.into(),
            help: None,
        }
    }
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Turns a typed-deserialisation error (with the path serde_path_to_error tracked) into a
    /// field error. `base` is where the deserialised value sits in the document.
    pub fn from_serde(
        base: &FieldPath,
        err: serde_path_to_error::Error<serde_yaml::Error>,
    ) -> Self {
        let mut path = base.clone();
        for seg in err.path().iter() {
            match seg {
                serde_path_to_error::Segment::Seq { index } => path.0.push(PathSeg::Index(*index)),
                serde_path_to_error::Segment::Map { key } => path.0.push(PathSeg::Key(key.clone())),
                _ => {}
            }
        }
        let message = err.inner().to_string();
        // serde's messages for these two name the field; point at it (or at its parent mapping).
        if let Some(field) = message
            .strip_prefix("unknown field `")
            .and_then(|m| m.split('`').next())
        {
            if path.0.last() != Some(&PathSeg::Key(field.to_string())) {
                path.0.push(PathSeg::Key(field.to_string()));
            }
            let help = message
                .split_once(", expected ")
                .map(|(_, e)| format!("expected {e}"));
            return FieldError {
                path,
                target: Target::Key,
                message: format!("unknown field `{field}`"),
                help,
            };
        }
        if message.starts_with("missing field") {
            return FieldError::new(path, Target::Key, message);
        }
        FieldError::new(path, Target::Value, plain_type_names(&message))
    }
}

/// Where an error's field came from: the pipeline file, or a `--set` on the command line.
#[derive(Debug, Clone)]
pub enum Origin {
    File,
    Override(String),
}

/// A pipeline-file error with its location, ready to print.
#[derive(Debug, Clone)]
pub struct SpecError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub source_line: Option<String>,
    pub field: FieldPath,
    pub message: String,
    pub help: Option<String>,
    pub origin: Origin,
}

impl SpecError {
    /// Locates `err` in `src` (the text of `file`).
    pub fn locate(file: &Path, src: &str, err: FieldError, origin: Origin) -> Self {
        let found = locate(src, &err.path, err.target).or_else(|| {
            // A field that is not in the file (a missing one, or one from --set): point at the
            // nearest enclosing mapping key that is.
            let mut p = err.path.parent();
            while let Some(path) = p {
                if let Some(loc) = locate(src, &path, Target::Key) {
                    return Some(loc);
                }
                p = path.parent();
            }
            None
        });
        let (line, column) = match found {
            Some((l, c)) => (Some(l), Some(c)),
            None => (None, None),
        };
        let source_line = line.and_then(|l| yaml_line(src, l));
        SpecError {
            file: file.to_path_buf(),
            line,
            column,
            source_line,
            field: err.path,
            message: err.message,
            help: err.help,
            origin,
        }
    }

    /// An error from the YAML parser itself, which already knows its location.
    pub fn from_yaml(file: &Path, src: &str, err: &serde_yaml::Error) -> Self {
        let (line, column) = match err.location() {
            Some(l) => (Some(l.line()), Some(l.column())),
            None => (None, None),
        };
        let mut message = err.to_string();
        let mut help = None;
        // serde_yaml points at the first of two equal keys; the mistake is the second.
        let (mut line, mut column) = (line, column);
        if let Some(dup) = message
            .split_once("duplicate entry with key \"")
            .and_then(|(_, r)| r.split('"').next())
        {
            let parent = message.split_once(": ").map(|(p, _)| p).unwrap_or("");
            let mut path = FieldPath::root();
            for seg in parent
                .split('.')
                .filter(|s| !s.is_empty() && !s.contains(' '))
            {
                path = path.key(seg);
            }
            if let Some((l, c)) = locate_nth(src, &path.key(dup), Target::Key, 1) {
                (line, column) = (Some(l), Some(c));
            }
            help = Some(format!(
                "`{dup}` is defined twice; ids and field names must be unique"
            ));
        }
        // A second document has no location from the parser: point at its marker.
        if line.is_none() && message.contains("more than one document") {
            let lines = yaml_lines(src);
            let mut seen_content = false;
            for (i, l) in lines.iter().enumerate() {
                let is_marker = l.starts_with("---") || l.starts_with("...") || l.starts_with('%');
                if is_marker && seen_content {
                    (line, column) = (Some(i + 1), Some(1));
                    break;
                }
                seen_content |= !l.trim().is_empty();
            }
            help = Some("a pipeline file holds one YAML document: remove the `---` and what follows, or put it in its own file".into());
        }
        if let Some(number) = too_large_integer(&message) {
            message =
                format!("the number {number} is too large: whole numbers must fit in 64 bits");
            help = Some("write a smaller number, or quote it (\"…\") if it is text".into());
        }
        if message.contains("mapping values are not allowed in this context") {
            help = Some("a value containing `: ` must be quoted, or written as a block: `cmd: |` and the text indented on the next lines".into());
        }
        let source_line = line.and_then(|l| yaml_line(src, l));
        // serde_yaml appends " at line L column C"; we print the location ourselves.
        if let Some(idx) = message.find(" at line ") {
            message.truncate(idx);
        }
        let field = FieldPath(
            message
                .split_once(": ")
                .filter(|(p, _)| !p.contains(' ') && !p.is_empty())
                .map(|(p, _)| {
                    p.split('.')
                        .map(|s| PathSeg::Key(s.to_string()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        );
        SpecError {
            file: file.to_path_buf(),
            line,
            column,
            source_line,
            field,
            message,
            help,
            origin: Origin::File,
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.message)?;
        match (self.line, self.column) {
            (Some(l), Some(c)) => writeln!(f, "  --> {}:{}:{}", self.file.display(), l, c)?,
            _ => writeln!(f, "  --> {}", self.file.display())?,
        }
        if let (Some(l), Some(c), Some(text)) = (self.line, self.column, &self.source_line) {
            let num = l.to_string();
            let pad = " ".repeat(num.len());
            writeln!(f, " {pad} |")?;
            writeln!(f, " {num} | {text}")?;
            writeln!(f, " {pad} | {}^", " ".repeat(c.saturating_sub(1)))?;
        }
        if !self.field.0.is_empty() {
            write!(f, "   = field: {}", self.field)?;
        } else {
            write!(f, "   = in the pipeline document")?;
        }
        if let Origin::Override(set) = &self.origin {
            write!(f, "\n   = note: the value comes from `--set {set}`")?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n   = help: {help}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

/// serde's messages name Rust types (`expected usize`); a pipeline's author reads numbers.
fn plain_type_names(message: &str) -> String {
    let mut out = message.to_string();
    for (rust, plain) in [
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected u32", "expected a whole number, 0 or more"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
    ] {
        if let Some(start) = out.find(rust) {
            let end = start + rust.len();
            // Only the whole word: `expected u64` but not `expected u640`.
            if !out[end..].starts_with(|c: char| c.is_alphanumeric()) {
                out.replace_range(start..end, plain);
            }
        }
    }
    out
}

/// The integer of serde's "integer `N` as u128" (or i128) message: a number YAML reads but no
/// pipeline value can hold.
pub(crate) fn too_large_integer(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once("integer `")?;
    let (number, rest) = rest.split_once('`')?;
    (rest.starts_with(" as u128") || rest.starts_with(" as i128")).then_some(number)
}

/// Where the bytes stop being UTF-8: (line, column, byte offset), line and column 1-based,
/// the column in characters.
pub fn utf8_error_position(bytes: &[u8], err: std::str::Utf8Error) -> (usize, usize, usize) {
    let byte = err.valid_up_to();
    let before = &bytes[..byte];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = std::str::from_utf8(&before[line_start..]).map_or(0, |l| l.chars().count()) + 1;
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    (line, column, byte)
}

/// Finds where `path` sits in the YAML text `src`, as (line, column), both 1-based.
///
/// The pipeline is parsed by serde_yaml, so its own parser is used to find positions: a seed
/// walks down the path and stops with an error at the target node, and serde_yaml stamps that
/// error with the node's position.
pub fn locate(src: &str, path: &FieldPath, target: Target) -> Option<(usize, usize)> {
    locate_nth(src, path, target, 0)
}

/// Like [`locate`], for the `nth` (0-based) occurrence of a repeated last key.
pub fn locate_nth(
    src: &str,
    path: &FieldPath,
    target: Target,
    nth: usize,
) -> Option<(usize, usize)> {
    const FOUND: &str = "\u{0}pipe-locate-found";
    let de = serde_yaml::Deserializer::from_str(src);
    let seek = Seek {
        path: &path.0,
        target,
        nth,
    };
    match seek.deserialize(de) {
        Err(e) if e.to_string().contains(FOUND) => e.location().map(|l| (l.line(), l.column())),
        _ => None,
    }
}

struct Seek<'p> {
    path: &'p [PathSeg],
    target: Target,
    /// Which occurrence of the last key to stop at (duplicates).
    nth: usize,
}

fn found<E: de::Error>() -> E {
    E::custom("\u{0}pipe-locate-found")
}

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.leaf()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.leaf()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((PathSeg::Index(want), rest)) = self.path.split_first() else {
            return self.leaf();
        };
        let mut i = 0;
        loop {
            if i == *want {
                seq.next_element_seed(Seek {
                    path: rest,
                    target: self.target,
                    nth: self.nth,
                })?;
                return Ok(());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((PathSeg::Key(want), rest)) = self.path.split_first() else {
            return self.leaf();
        };
        let stop_at_key = rest.is_empty() && self.target == Target::Key;
        let mut seen = 0;
        while let Some(is_match) = map.next_key_seed(KeySeed {
            want,
            stop: stop_at_key && seen == self.nth,
        })? {
            if is_match && (seen == self.nth || !rest.is_empty()) {
                map.next_value_seed(Seek {
                    path: rest,
                    target: self.target,
                    nth: self.nth,
                })?;
                return Ok(());
            }
            if is_match {
                seen += 1;
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

impl Seek<'_> {
    fn leaf<E: de::Error>(self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(found())
        } else {
            Ok(())
        }
    }
}

struct KeySeed<'a> {
    want: &'a str,
    stop: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        if v == self.want {
            if self.stop {
                return Err(found());
            }
            return Ok(true);
        }
        Ok(false)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        self.visit_str("null")
    }
}

/// Line `n` (1-based) as YAML counts lines.
fn yaml_line(src: &str, n: usize) -> Option<String> {
    yaml_lines(src).into_iter().nth(n.checked_sub(1)?)
}

/// The lines of `src` as YAML counts them: a line ends at `\n`, `\r\n`, a lone `\r`, NEL, LS
/// or PS.
fn yaml_lines(src: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    let mut chars = src.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => lines.push(std::mem::take(&mut current)),
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                lines.push(std::mem::take(&mut current));
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "name: t\nstages:\n  prep:\n    kind: command\n    deps:\n      - a.txt\n      - b.txt\n    cmd: echo hi\n";

    #[test]
    fn locates_keys_values_and_sequence_items() {
        let p = FieldPath::root().key("stages").key("prep");
        assert_eq!(locate(DOC, &p, Target::Key), Some((3, 3)));
        assert_eq!(locate(DOC, &p.key("cmd"), Target::Key), Some((8, 5)));
        assert_eq!(locate(DOC, &p.key("cmd"), Target::Value), Some((8, 10)));
        assert_eq!(
            locate(DOC, &p.key("deps").index(1), Target::Value),
            Some((7, 9))
        );
        assert_eq!(locate(DOC, &p.key("nope"), Target::Key), None);
    }

    #[test]
    fn type_errors_name_numbers_not_rust_types() {
        assert_eq!(
            plain_type_names("invalid value: integer `-1`, expected usize"),
            "invalid value: integer `-1`, expected a whole number, 0 or more"
        );
        assert_eq!(
            plain_type_names("invalid type: string \"x\", expected f64"),
            "invalid type: string \"x\", expected a number"
        );
    }

    #[test]
    fn missing_field_points_at_the_enclosing_key() {
        let err = FieldError::new(
            FieldPath::root().key("stages").key("prep").key("outs"),
            Target::Key,
            "missing field `outs`",
        );
        let e = SpecError::locate(Path::new("p.yaml"), DOC, err, Origin::File);
        assert_eq!((e.line, e.column), (Some(3), Some(3)));
        let shown = e.to_string();
        assert!(shown.contains("--> p.yaml:3:3"), "{shown}");
        assert!(shown.contains("field: stages.prep.outs"), "{shown}");
    }
}

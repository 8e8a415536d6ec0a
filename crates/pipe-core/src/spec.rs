//! Pipeline files: YAML → typed stages, with `${params.x}` substitution and `--set` overrides.
//! Every error is located (file:line:column and the field).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::diag::{FieldError, FieldPath, Origin, SpecError, Target};
use crate::kind::{Input, InputSource, ParseContext, Registry, Stage, StageInfo, StageKind};

/// A parsed, checked pipeline.
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    /// The directory relative paths in the pipeline are resolved against.
    pub base_dir: PathBuf,
    /// Stages in file order.
    pub stages: Vec<StageDef>,
    /// The `--set`s it was loaded with (a Slurm job loads it again with them).
    pub overrides: Vec<String>,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("name", &self.name)
            .field("file", &self.file)
            .field(
                "stages",
                &self.stages.iter().map(|s| &s.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// One stage of a pipeline, configured by its kind.
pub struct StageDef {
    pub id: String,
    pub kind: &'static str,
    pub kind_version: u32,
    pub inputs: Vec<Input>,
    /// Its kind's key fields (see [`crate::key`]).
    pub fields: crate::key::KeyFields,
    pub stage: Box<dyn Stage>,
    /// What it needs of the machine: its `resources:`, else what its kind infers (a run
    /// setting, never in the key).
    pub resources: crate::resources::Resources,
    /// Where it runs: `executor:` and `slurm:`, its own over the pipeline's (a run setting,
    /// never in the key).
    pub executor: crate::slurm::Executor,
}

impl StageDef {
    /// The ids of the stages this one reads from.
    pub fn upstream(&self) -> BTreeSet<&str> {
        self.inputs
            .iter()
            .filter_map(|i| match &i.source {
                InputSource::Stage { stage, .. } => Some(stage.as_str()),
                InputSource::Path(_) => None,
            })
            .collect()
    }
}

impl Pipeline {
    pub fn stage(&self, id: &str) -> Option<&StageDef> {
        self.stages.iter().find(|s| s.id == id)
    }
    /// What a stage's checks see of stage `id` (see [`Stage::check_upstream`]).
    pub fn stage_info(&self, id: &str) -> Option<StageInfo<'_>> {
        self.stage(id).map(|u| StageInfo {
            kind: u.kind,
            fields: u.fields.as_json(),
            inputs: &u.inputs,
        })
    }
    /// Each stage's [`Stage::memory_plan`], where it has one: `(stage id, plan)`.
    pub fn memory_plans(&self) -> Vec<(String, String)> {
        let stage_info = |id: &str| self.stage_info(id);
        self.stages
            .iter()
            .filter_map(|s| Some((s.id.clone(), s.stage.memory_plan(&stage_info)?)))
            .collect()
    }
    pub fn index(&self, id: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.id == id)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    params: Mapping,
    #[serde(default)]
    executor: Option<Value>,
    #[serde(default)]
    slurm: Option<Value>,
    stages: Mapping,
}

/// A `--set path=value` from the command line.
#[derive(Debug, Clone)]
struct Override {
    text: String,
    path: FieldPath,
    value: Value,
}

/// Errors from loading a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read pipeline file `{}`: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Spec(Box<SpecError>),
    #[error("bad `--set {text}`: {message}")]
    Override { text: String, message: String },
}

/// Reads, checks and types the pipeline in `file`, applying `--set` overrides.
pub fn load(file: &Path, overrides: &[String], registry: &Registry) -> Result<Pipeline, LoadError> {
    let bytes = std::fs::read(file).map_err(|source| LoadError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    let src = String::from_utf8(bytes).map_err(|e| {
        let (line, column, byte) = crate::diag::utf8_error_position(e.as_bytes(), e.utf8_error());
        LoadError::Spec(Box::new(SpecError {
            file: file.to_path_buf(),
            line: Some(line),
            column: Some(column),
            source_line: None,
            field: FieldPath::root(),
            message: format!("the pipeline file is not valid UTF-8 (byte {byte} of the file)"),
            help: Some("save the file as UTF-8".into()),
            origin: Origin::File,
        }))
    })?;
    parse(file, &src, overrides, registry)
}

/// Like [`load`], with the text given.
pub fn parse(
    file: &Path,
    src: &str,
    overrides: &[String],
    registry: &Registry,
) -> Result<Pipeline, LoadError> {
    let raw = read_document(file, src)?;
    let mut params = raw.params;
    let mut stage_maps = stage_mappings(file, src, raw.stages)?;
    let overrides = apply_overrides(overrides, &mut params, &mut stage_maps)?;
    let at = Locator {
        file,
        src,
        overrides: &overrides,
    };
    let base_dir = base_dir(file);
    let stage_ids: Vec<String> = stage_maps.iter().map(|(id, _)| id.clone()).collect();
    let executor = crate::slurm::Executor::parse(
        raw.executor.as_ref(),
        raw.slurm.as_ref(),
        &FieldPath::root(),
        &crate::slurm::Executor::Local,
    )
    .map_err(|e| at.error_in_field(e))?;
    let scope = Scope {
        at: &at,
        registry,
        params: &params,
        stage_ids: &stage_ids,
        base_dir: &base_dir,
        executor: &executor,
    };
    let stages = stage_maps
        .into_iter()
        .map(|(id, fields)| parse_stage(&scope, id, fields))
        .collect::<Result<Vec<_>, _>>()?;
    check_inputs(&at, &stages, &stage_ids, &base_dir)?;
    let pipeline = Pipeline {
        name: raw.name,
        file: file.to_path_buf(),
        base_dir,
        stages,
        overrides: overrides.iter().map(|o| o.text.clone()).collect(),
    };
    check_acyclic(&at, &pipeline)?;
    check_upstream(&at, &pipeline)?;
    Ok(pipeline)
}

/// Turns a [`FieldError`] into a [`LoadError`] located at its file, line and column.
struct Locator<'a> {
    file: &'a Path,
    src: &'a str,
    /// The `--set`s applied: an error in a field one of them set is blamed on it.
    overrides: &'a [Override],
}

impl Locator<'_> {
    fn error(&self, e: FieldError, origin: Origin) -> LoadError {
        LoadError::Spec(Box::new(SpecError::locate(self.file, self.src, e, origin)))
    }
    /// The `--set` that supplied the field at `path`, else the file.
    fn origin_of(&self, path: &FieldPath) -> Origin {
        self.overrides
            .iter()
            .find(|o| path.0.starts_with(&o.path.0))
            .map(|o| Origin::Override(o.text.clone()))
            .unwrap_or(Origin::File)
    }
    /// [`Self::error`], blamed on the file or on the `--set` that supplied the field.
    fn error_in_field(&self, e: FieldError) -> LoadError {
        let origin = self.origin_of(&e.path);
        self.error(e, origin)
    }
}

/// What parsing one stage sees of the whole pipeline.
struct Scope<'a> {
    at: &'a Locator<'a>,
    registry: &'a Registry,
    params: &'a Mapping,
    stage_ids: &'a [String],
    base_dir: &'a Path,
    /// The pipeline's `executor:`/`slurm:`, which its stages inherit.
    executor: &'a crate::slurm::Executor,
}

/// Parses the YAML document and checks the pipeline's `name` and that it has stages.
fn read_document(file: &Path, src: &str) -> Result<RawPipeline, LoadError> {
    let at = Locator {
        file,
        src,
        overrides: &[],
    };
    let raw: RawPipeline = serde_yaml::from_str(src)
        .map_err(|e| LoadError::Spec(Box::new(SpecError::from_yaml(file, src, &e))))?;
    let root = FieldPath::root();
    if raw.name.trim().is_empty() {
        return Err(at.error(
            FieldError::new(
                root.key("name"),
                Target::Value,
                "the pipeline `name` is empty",
            )
            .with_help("give the pipeline a name; it identifies its runs in the cache"),
            Origin::File,
        ));
    }
    if raw.stages.is_empty() {
        return Err(at.error(
            FieldError::new(
                root.key("stages"),
                Target::Key,
                "the pipeline has no stages",
            )
            .with_help("list at least one under `stages:`, as `ID: {kind: KIND, …}`"),
            Origin::File,
        ));
    }
    Ok(raw)
}

/// The `stages:` entries in file order, `(id, fields)`, each id checked and each entry a
/// mapping.
fn stage_mappings(
    file: &Path,
    src: &str,
    stages: Mapping,
) -> Result<Vec<(String, Value)>, LoadError> {
    let at = Locator {
        file,
        src,
        overrides: &[],
    };
    let root = FieldPath::root();
    let mut stage_maps: Vec<(String, Value)> = Vec::new();
    for (k, v) in stages {
        let Some(id) = k.as_str().map(str::to_string) else {
            return Err(at.error(
                FieldError::new(root.key("stages"), Target::Key, "stage ids must be strings"),
                Origin::File,
            ));
        };
        let path = root.key("stages").key(&id);
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(at.error(
                FieldError::new(path, Target::Key, format!("invalid stage id `{id}`"))
                    .with_help("stage ids use letters, digits, `_` and `-` (a `.` separates a stage from one of its outputs)"),
                Origin::File,
            ));
        }
        if !v.is_mapping() {
            return Err(at.error(
                FieldError::new(
                    path,
                    Target::Value,
                    format!("stage `{id}` must be a mapping with a `kind` field"),
                ),
                Origin::File,
            ));
        }
        stage_maps.push((id, v));
    }
    Ok(stage_maps)
}

/// Parses the `--set`s and applies them, in order, to the params and the stages' fields.
fn apply_overrides(
    texts: &[String],
    params: &mut Mapping,
    stage_maps: &mut [(String, Value)],
) -> Result<Vec<Override>, LoadError> {
    let overrides = texts
        .iter()
        .map(|o| parse_override(o))
        .collect::<Result<Vec<_>, _>>()?;
    for o in &overrides {
        apply_override(o, params, stage_maps)?;
    }
    Ok(overrides)
}

/// The directory holding `file` (`.` for a bare file name), absolute where it exists.
fn base_dir(file: &Path) -> PathBuf {
    let base_dir = file
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."))
        .to_path_buf();
    base_dir.canonicalize().unwrap_or(base_dir)
}

/// Types one stage through its kind, after substituting `${params.…}` in its fields.
fn parse_stage(scope: &Scope<'_>, id: String, fields: Value) -> Result<StageDef, LoadError> {
    let path = FieldPath::root().key("stages").key(&id);
    let Value::Mapping(mut fields) = fields else {
        unreachable!("checked by stage_mappings")
    };
    let kind = stage_kind(scope, &id, &path, &mut fields)?;
    let mut fields = Value::Mapping(fields);
    substitute_params(&mut fields, scope.params, &path).map_err(|e| scope.at.error_in_field(e))?;
    // Every kind takes `resources:`; the kinds never see it.
    let declared = match fields.as_mapping_mut().and_then(|m| m.remove("resources")) {
        Some(v) => crate::resources::Resources::parse(&v, &path.key("resources"))
            .map_err(|e| scope.at.error_in_field(e))?,
        None => Default::default(),
    };
    let (executor, slurm) = match fields.as_mapping_mut() {
        Some(m) => (m.remove("executor"), m.remove("slurm")),
        None => (None, None),
    };
    let executor =
        crate::slurm::Executor::parse(executor.as_ref(), slurm.as_ref(), &path, scope.executor)
            .map_err(|e| scope.at.error_in_field(e))?;
    let cx = ParseContext {
        stage_id: &id,
        path: path.clone(),
        stage_ids: scope.stage_ids,
        base_dir: scope.base_dir,
        workspace: scope.registry.workspace(),
    };
    let stage = kind
        .parse(&cx, fields)
        .map_err(|e| scope.at.error_in_field(e))?;
    Ok(StageDef {
        id,
        kind: kind.name(),
        kind_version: kind.version(),
        inputs: stage.inputs(),
        fields: stage.key_fields(),
        resources: crate::resources::Resources::or(declared, stage.resources()),
        executor,
        stage,
    })
}

/// Takes the `kind` field out of a stage's fields and finds that kind in the registry.
fn stage_kind<'r>(
    scope: &Scope<'r>,
    id: &str,
    path: &FieldPath,
    fields: &mut Mapping,
) -> Result<&'r dyn StageKind, LoadError> {
    let at = scope.at;
    let known_kinds = || format!("known kinds: {}", scope.registry.names().join(", "));
    let kind_name = match fields.remove("kind") {
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(at.error(
                FieldError::new(path.key("kind"), Target::Value, "`kind` must be a string"),
                Origin::File,
            ))
        }
        None => {
            return Err(at.error(
                FieldError::new(
                    path.key("kind"),
                    Target::Key,
                    format!("missing field `kind` in stage `{id}`"),
                )
                .with_help(known_kinds()),
                Origin::File,
            ))
        }
    };
    scope.registry.get(&kind_name).ok_or_else(|| {
        at.error(
            FieldError::new(
                path.key("kind"),
                Target::Value,
                format!("unknown stage kind `{kind_name}`"),
            )
            .with_help(known_kinds()),
            Origin::File,
        )
    })
}

/// External inputs must exist; references to outputs must be ones the stage promises.
fn check_inputs(
    at: &Locator<'_>,
    stages: &[StageDef],
    stage_ids: &[String],
    base_dir: &Path,
) -> Result<(), LoadError> {
    for s in stages {
        for input in &s.inputs {
            match &input.source {
                InputSource::Path(p) => check_path_exists(at, input, p, stage_ids, base_dir)?,
                InputSource::Stage {
                    stage,
                    output: Some(output),
                } => check_output_exists(at, input, stages, stage, output)?,
                InputSource::Stage { output: None, .. } => {}
            }
        }
    }
    Ok(())
}

/// An external input's path must exist (a mistyped `stage.output` reads as a path too).
fn check_path_exists(
    at: &Locator<'_>,
    input: &Input,
    p: &Path,
    stage_ids: &[String],
    base_dir: &Path,
) -> Result<(), LoadError> {
    if p.exists() {
        return Ok(());
    }
    let help = if input.name.contains('.') {
        format!(
            "paths are read from {}; a `stage.output` reference needs one of these stages: {}",
            base_dir.display(),
            stage_ids.join(", ")
        )
    } else {
        format!("paths are read from {}", base_dir.display())
    };
    Err(at.error(
        FieldError::new(
            input.field.clone(),
            Target::Value,
            format!("input `{}` does not exist ({})", input.name, p.display()),
        )
        .with_help(help),
        at.origin_of(&input.field),
    ))
}

/// A `stage.output` reference must name an output (or a path inside or above one) that the
/// stage declares, where it declares them.
fn check_output_exists(
    at: &Locator<'_>,
    input: &Input,
    stages: &[StageDef],
    stage: &str,
    output: &str,
) -> Result<(), LoadError> {
    let up = stages
        .iter()
        .find(|u| u.id == stage)
        .expect("ids checked by the kind");
    let Some(outs) = up.stage.outputs() else {
        return Ok(());
    };
    let ok = outs.iter().any(|o| {
        output == o || output.starts_with(&format!("{o}/")) || o.starts_with(&format!("{output}/"))
    });
    if ok {
        return Ok(());
    }
    Err(at.error(
        FieldError::new(
            input.field.clone(),
            Target::Value,
            format!("stage `{stage}` has no output `{output}`"),
        )
        .with_help(format!("`{stage}` produces: {}", outs.join(", "))),
        at.origin_of(&input.field),
    ))
}

/// Refuses a dependency cycle, located at the input of its first stage that reads the next.
fn check_acyclic(at: &Locator<'_>, pipeline: &Pipeline) -> Result<(), LoadError> {
    let Some(cycle) = crate::graph::find_cycle(pipeline) else {
        return Ok(());
    };
    let first = pipeline.stage(&cycle[0]).expect("cycle stage");
    let field = first
        .inputs
        .iter()
        .find(|i| matches!(&i.source, InputSource::Stage { stage, .. } if *stage == cycle[1 % cycle.len()]))
        .map(|i| i.field.clone())
        .unwrap_or_else(|| FieldPath::root().key("stages").key(&cycle[0]));
    let mut shown = cycle.clone();
    shown.push(cycle[0].clone());
    Err(at.error(
        FieldError::new(
            field,
            Target::Value,
            format!(
                "dependency cycle: {} (each stage reads from the next)",
                shown.join(" → ")
            ),
        )
        .with_help("a stage cannot depend, directly or through others, on itself"),
        Origin::File,
    ))
}

/// Each stage's own checks of the stages it reads from ([`Stage::check_upstream`]).
fn check_upstream(at: &Locator<'_>, pipeline: &Pipeline) -> Result<(), LoadError> {
    let stage_info = |id: &str| pipeline.stage_info(id);
    for s in &pipeline.stages {
        s.stage
            .check_upstream(&stage_info)
            .map_err(|e| at.error_in_field(e))?;
    }
    Ok(())
}

fn parse_override(text: &str) -> Result<Override, LoadError> {
    let bad = |message: &str| LoadError::Override {
        text: text.to_string(),
        message: message.to_string(),
    };
    let (lhs, rhs) = text
        .split_once('=')
        .ok_or_else(|| bad("expected `stage.field=value` or `params.name=value`"))?;
    let segs: Vec<&str> = lhs.split('.').collect();
    if segs.len() < 2 || segs.iter().any(|s| s.is_empty()) {
        return Err(bad("expected `stage.field=value` or `params.name=value`"));
    }
    // The value is read as YAML, so `3`, `1e-4`, `true` and `[a, b]` get their types.
    // Anything that is not plainly a list or mapping (`?`, `a: b`) stays the text it is.
    let parsed = serde_yaml::from_str::<Value>(rhs);
    if let Err(e) = &parsed {
        if let Some(number) = crate::diag::too_large_integer(&e.to_string()) {
            return Err(bad(&format!(
                "the number {number} is too large: whole numbers must fit in 64 bits"
            )));
        }
    }
    let value = match parsed {
        Ok(v @ (Value::Sequence(_) | Value::Mapping(_)))
            if rhs.trim_start().starts_with(['[', '{']) =>
        {
            v
        }
        Ok(v @ (Value::Bool(_) | Value::Number(_) | Value::Null | Value::String(_))) => v,
        _ => Value::String(rhs.to_string()),
    };
    // `params.name…` sets a param; anything else is `stage.field…` below `stages`. Only the
    // first `params` is the prefix: `params.params` is a param named `params`.
    let (mut path, rest) = if segs[0] == "params" {
        (FieldPath::root().key("params"), &segs[1..])
    } else {
        (FieldPath::root().key("stages"), &segs[..])
    };
    for s in rest {
        path = path.key(*s);
    }
    Ok(Override {
        text: text.to_string(),
        path,
        value,
    })
}

fn apply_override(
    o: &Override,
    params: &mut Mapping,
    stages: &mut [(String, Value)],
) -> Result<(), LoadError> {
    let bad = |message: String| LoadError::Override {
        text: o.text.clone(),
        message,
    };
    let keys: Vec<String> = o
        .path
        .0
        .iter()
        .map(|s| match s {
            crate::diag::PathSeg::Key(k) => k.clone(),
            crate::diag::PathSeg::Index(i) => i.to_string(),
        })
        .collect();
    if keys[0] == "params" {
        let name = &keys[1];
        let Some(slot) = params.get_mut(name.as_str()) else {
            let known: Vec<String> = params
                .keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect();
            return Err(bad(format!(
                "the pipeline has no param `{name}` (params: {})",
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            )));
        };
        set_nested(slot, &keys[2..], o.value.clone());
        return Ok(());
    }
    let stage_id = &keys[1];
    let Some((_, map)) = stages.iter_mut().find(|(id, _)| id == stage_id) else {
        let ids: Vec<&str> = stages.iter().map(|(id, _)| id.as_str()).collect();
        return Err(bad(format!(
            "the pipeline has no stage `{stage_id}` (stages: {})",
            ids.join(", ")
        )));
    };
    set_nested(map, &keys[2..], o.value.clone());
    Ok(())
}

fn set_nested(slot: &mut Value, keys: &[String], value: Value) {
    let Some((first, rest)) = keys.split_first() else {
        *slot = value;
        return;
    };
    if let Value::Sequence(seq) = slot {
        if let Ok(i) = first.parse::<usize>() {
            if i < seq.len() {
                return set_nested(&mut seq[i], rest, value);
            }
        }
    }
    if !slot.is_mapping() {
        *slot = Value::Mapping(Mapping::new());
    }
    let map = slot.as_mapping_mut().expect("mapping");
    let child = map
        .entry(Value::String(first.clone()))
        .or_insert(Value::Null);
    set_nested(child, rest, value);
}

/// Replaces `${params.name}` in every string below `value`. A string that is exactly one
/// reference takes the param's value with its type; elsewhere the param is spliced in as text.
/// `$${` stands for a literal `${`.
pub fn substitute_params(
    value: &mut Value,
    params: &Mapping,
    path: &FieldPath,
) -> Result<(), FieldError> {
    match value {
        Value::String(s) => {
            if !s.contains("${params.") && !s.contains("$${") {
                return Ok(());
            }
            let trimmed = s.trim();
            if let Some(name) = trimmed
                .strip_prefix("${params.")
                .and_then(|r| r.strip_suffix('}'))
                .filter(|n| !n.contains('}'))
            {
                *value = lookup_param(params, name, path)?.clone();
                return Ok(());
            }
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(pos) = rest.find('$') {
                out.push_str(&rest[..pos]);
                let tail = &rest[pos..];
                if let Some(t) = tail.strip_prefix("$${") {
                    out.push_str("${");
                    rest = t;
                } else if let Some(t) = tail.strip_prefix("${params.") {
                    let end = t.find('}').ok_or_else(|| {
                        FieldError::new(
                            path.clone(),
                            Target::Value,
                            "unterminated `${params.` reference",
                        )
                    })?;
                    let name = &t[..end];
                    let v = lookup_param(params, name, path)?;
                    match v {
                        Value::String(x) => out.push_str(x),
                        Value::Number(n) => out.push_str(&n.to_string()),
                        Value::Bool(b) => out.push_str(&b.to_string()),
                        Value::Null => out.push_str("null"),
                        _ => {
                            return Err(FieldError::new(
                                path.clone(),
                                Target::Value,
                                format!("param `{name}` is a list or mapping and cannot be spliced into text"),
                            )
                            .with_help(format!("write `${{params.{name}}}` as the whole value")))
                        }
                    }
                    rest = &t[end + 1..];
                } else {
                    out.push('$');
                    rest = &tail[1..];
                }
            }
            out.push_str(rest);
            *s = out;
            Ok(())
        }
        Value::Sequence(seq) => {
            for (i, v) in seq.iter_mut().enumerate() {
                substitute_params(v, params, &path.index(i))?;
            }
            Ok(())
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let key = k.as_str().map(str::to_string).unwrap_or_default();
                substitute_params(v, params, &path.key(key))?;
            }
            Ok(())
        }
        Value::Tagged(t) => substitute_params(&mut t.value, params, path),
        _ => Ok(()),
    }
}

fn lookup_param<'a>(
    params: &'a Mapping,
    name: &str,
    path: &FieldPath,
) -> Result<&'a Value, FieldError> {
    params.get(name).ok_or_else(|| {
        let known: Vec<String> = params
            .keys()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect();
        FieldError::new(
            path.clone(),
            Target::Value,
            format!("unknown param `{name}`"),
        )
        .with_help(if known.is_empty() {
            "the pipeline declares no `params:`".to_string()
        } else {
            format!("declared params: {}", known.join(", "))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Mapping {
        serde_yaml::from_str("lr: 0.001\nname: run1\nlist: [1, 2]\n").unwrap()
    }

    #[test]
    fn whole_value_reference_keeps_its_type() {
        let mut v: Value = serde_yaml::from_str(
            "a: ${params.lr}\nb: x-${params.name}-${params.lr}\nc: $${params.lr}",
        )
        .unwrap();
        substitute_params(&mut v, &params(), &FieldPath::root()).unwrap();
        assert_eq!(v["a"], Value::from(0.001));
        assert_eq!(v["b"], Value::from("x-run1-0.001"));
        assert_eq!(v["c"], Value::from("${params.lr}"));
    }

    #[test]
    fn unknown_param_names_the_field_and_the_declared_params() {
        let mut v: Value = serde_yaml::from_str("a:\n  b: ${params.nope}\n").unwrap();
        let e = substitute_params(&mut v, &params(), &FieldPath::root()).unwrap_err();
        assert_eq!(e.path.to_string(), "a.b");
        assert!(e.message.contains("nope"));
        assert!(e.help.unwrap().contains("lr"));
    }

    #[test]
    fn splicing_a_list_is_an_error() {
        let mut v: Value = serde_yaml::from_str("a: x${params.list}").unwrap();
        assert!(substitute_params(&mut v, &params(), &FieldPath::root()).is_err());
    }
}

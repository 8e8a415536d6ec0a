//! The JSON Schema of a pipeline file (`pipe schema`), made from the kinds' own field types
//! ([`crate::StageKind::fields_schema`]), for editors' completion and checks: a pipeline's
//! top level, and each stage's fields by its `kind`. Wherever a field takes a value, it also
//! takes a `${params.NAME}` reference, which is substituted before the kind reads it.

use serde_json::{json, Map, Value};

use crate::kind::Registry;

/// The schema (JSON Schema 2020-12) of pipelines for the kinds of `registry`.
pub fn pipeline_schema(registry: &Registry) -> Value {
    let mut defs = Map::new();
    defs.insert(
        "param_ref".into(),
        json!({
            "description": "A reference to a param of the pipeline, substituted before the stage is read",
            "type": "string",
            "pattern": "\\$\\{params\\.[^}]+\\}"
        }),
    );
    defs.insert(
        "resources".into(),
        json!({
            "description": "What the stage needs of the machine (a run setting, never in the key): the local executor never runs two stages on one GPU at once and never gives stages more declared CPUs or memory than the machine has",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "gpus": {
                    "description": "A number of free GPUs (a command stage gets them as CUDA_VISIBLE_DEVICES), or the indices of these GPUs; train and evaluate stages on cuda need not say",
                    "oneOf": [
                        { "type": "integer", "minimum": 0 },
                        { "type": "array", "items": { "type": "integer", "minimum": 0 } },
                        { "$ref": "#/$defs/param_ref" }
                    ]
                },
                "cpus": { "oneOf": [{ "type": "integer", "minimum": 1 }, { "$ref": "#/$defs/param_ref" }] },
                "memory": { "description": "Bytes with a unit: 512MB, 16GiB", "type": ["string", "integer"] }
            }
        }),
    );
    defs.insert(
        "executor".into(),
        json!({
            "description": "Where stages run (a run setting, never in the key): `local` (threads and processes of `pipe run`) or `slurm` (each stage a Slurm batch job running `pipe run-stage` on a compute node, against this store on a shared file system)",
            "enum": ["local", "slurm"]
        }),
    );
    defs.insert(
        "slurm".into(),
        json!({
            "description": "What a stage's Slurm job asks for (`executor: slurm`); a stage's own fields replace the pipeline's one by one",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "partition": { "type": "string" },
                "account": { "type": "string" },
                "time": { "description": "A time limit: MINUTES, HH:MM:SS or DAYS-HH:MM:SS", "type": ["string", "integer"] },
                "gpus_per_node": { "description": "GPUs per node (default: those of `resources`, or a train stage's devices)", "oneOf": [{ "type": "integer", "minimum": 1 }, { "$ref": "#/$defs/param_ref" }] },
                "nodes": { "description": "One node per stage", "const": 1 },
                "extra_args": { "description": "More sbatch arguments, after pipe's own", "type": "array", "items": { "type": "string" } }
            }
        }),
    );
    let mut cases = Vec::new();
    for kind in registry.kinds() {
        let name = kind.name();
        let mut fields = kind.fields_schema();
        // The kind's own definitions, renamed into its namespace so that two kinds may each
        // have (say) a `Dtype` of their own.
        if let Some(Value::Object(own)) = fields.as_object_mut().and_then(|o| o.remove("$defs")) {
            for (def, mut schema) in own {
                rename_refs(&mut schema, name);
                allow_param_refs(&mut schema);
                defs.insert(format!("{name}.{def}"), schema);
            }
        }
        rename_refs(&mut fields, name);
        allow_param_refs(&mut fields);
        if let Some(o) = fields.as_object_mut() {
            o.remove("$schema");
            o.insert("title".into(), json!(format!("a `{name}` stage")));
            o.insert("description".into(), json!(kind.summary()));
            let props = o
                .entry("properties")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("properties are an object");
            props.insert("kind".into(), json!({ "const": name }));
            props.insert("resources".into(), json!({ "$ref": "#/$defs/resources" }));
            props.insert("executor".into(), json!({ "$ref": "#/$defs/executor" }));
            props.insert("slurm".into(), json!({ "$ref": "#/$defs/slurm" }));
        }
        defs.insert(name.to_string(), fields);
        cases.push(json!({
            "if": { "properties": { "kind": { "const": name } } },
            "then": { "$ref": format!("#/$defs/{name}") }
        }));
    }
    let kinds: Vec<&str> = registry.names();
    defs.insert(
        "stage".into(),
        json!({
            "type": "object",
            "required": ["kind"],
            "properties": { "kind": { "enum": kinds, "description": "The stage kind (`pipe kinds` lists them)" } },
            "allOf": cases
        }),
    );
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "pipe pipeline",
        "description": "A pipe pipeline: stages of the kinds `pipe kinds` lists, run as a DAG with cached results",
        "type": "object",
        "required": ["name", "stages"],
        "additionalProperties": false,
        "properties": {
            "name": { "type": "string", "description": "The pipeline's name (its stages' refs in the store are kept under it)" },
            "description": { "type": "string" },
            "params": { "type": "object", "description": "Values usable anywhere below as ${params.NAME}; `--set params.NAME=VALUE` overrides them" },
            "executor": { "$ref": "#/$defs/executor" },
            "slurm": { "$ref": "#/$defs/slurm" },
            "stages": {
                "type": "object",
                "description": "Stage id → stage",
                "propertyNames": { "pattern": "^[A-Za-z0-9_-]+$" },
                "additionalProperties": { "$ref": "#/$defs/stage" }
            }
        },
        "$defs": defs
    })
}

/// Points the `$ref`s of a kind's schema at its namespaced definitions.
fn rename_refs(schema: &mut Value, kind: &str) {
    match schema {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get_mut("$ref") {
                if let Some(def) = r.strip_prefix("#/$defs/") {
                    *r = format!("#/$defs/{kind}.{def}");
                }
            }
            o.values_mut().for_each(|v| rename_refs(v, kind));
        }
        Value::Array(a) => a.iter_mut().for_each(|v| rename_refs(v, kind)),
        _ => {}
    }
}

/// Lets every property and array item also be a `${params.NAME}` reference.
fn allow_param_refs(schema: &mut Value) {
    let Value::Object(o) = schema else { return };
    if let Some(Value::Object(props)) = o.get_mut("properties") {
        for p in props.values_mut() {
            allow_param_refs(p);
            *p = or_param_ref(std::mem::take(p));
        }
    }
    if let Some(items) = o.get_mut("items") {
        if items.is_object() {
            allow_param_refs(items);
            *items = or_param_ref(std::mem::take(items));
        }
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(options)) = o.get_mut(key) {
            options.iter_mut().for_each(allow_param_refs);
        }
    }
    if let Some(extra) = o.get_mut("additionalProperties") {
        if extra.is_object() {
            allow_param_refs(extra);
            *extra = or_param_ref(std::mem::take(extra));
        }
    }
}

fn or_param_ref(schema: Value) -> Value {
    json!({ "anyOf": [schema, { "$ref": "#/$defs/param_ref" }] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_are_namespaced_and_values_may_be_param_refs() {
        let mut s = json!({
            "properties": {
                "lr": { "type": "number" },
                "dtype": { "$ref": "#/$defs/Dtype" },
                "list": { "type": "array", "items": { "type": "string" } }
            }
        });
        rename_refs(&mut s, "train");
        allow_param_refs(&mut s);
        assert_eq!(
            s["properties"]["dtype"]["anyOf"][0]["$ref"],
            "#/$defs/train.Dtype"
        );
        assert_eq!(s["properties"]["lr"]["anyOf"][0]["type"], "number");
        assert_eq!(
            s["properties"]["lr"]["anyOf"][1]["$ref"],
            "#/$defs/param_ref"
        );
        assert_eq!(
            s["properties"]["list"]["anyOf"][0]["items"]["anyOf"][1]["$ref"],
            "#/$defs/param_ref"
        );
    }
}

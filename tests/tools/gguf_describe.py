"""A GGUF file as llama.cpp's own `gguf` package reads it, in the shape of
tests/fixtures/gguf/*/expected.json: every metadata key but those that name the file, with its
type and value, and every tensor's name, type, shape (GGML order) and SHA-256.

Used by scripts/make_gguf_fixtures.py (on llama.cpp's converter's files), bench/gguf.sh and
tests/export_gguf.rs (on pipe's); run as a script, it prints one JSON line per file given,
with the file's `general.type` beside.
"""

import hashlib
import json
import sys

# Metadata that names the file rather than describes the model: the converter derives it from
# the directory name; pipe writes its own.
NAMING = {
    "general.name",
    "general.basename",
    "general.size_label",
    "general.finetune",
    "general.version",
    "general.type",
}


def value(field):
    import gguf

    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        return [field.contents(i) for i in range(len(field.data))]
    return field.contents()


def describe(path, reader=None):
    import gguf

    r = reader or gguf.GGUFReader(path)
    metadata = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k in NAMING:
            continue
        metadata[k] = {"type": f.types[0].name.lower(), "value": value(f)}
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            metadata[k]["item_type"] = f.types[-1].name.lower()
    tensors = [
        {
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": [int(x) for x in t.shape],
            "sha256": hashlib.sha256(t.data.tobytes()).hexdigest(),
        }
        for t in r.tensors
    ]
    return {"alignment": r.alignment, "metadata": metadata, "tensors": tensors}


if __name__ == "__main__":
    import gguf

    for path in sys.argv[1:]:
        r = gguf.GGUFReader(path)
        print(json.dumps(dict(describe(path, r), **{"general.type": r.fields["general.type"].contents()})))

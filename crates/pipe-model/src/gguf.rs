//! GGUF, llama.cpp's model file (version 3): [`GgufFile::write`], the metadata value types
//! and tensor encodings ([`GgmlType`]: F32, F16, BF16, Q8_0) a converted model uses, and
//! [`CausalLm::gguf_tensors`], which lays a Llama-architecture model out under llama.cpp's
//! tensor names as its `convert_hf_to_gguf.py` does. (The tests read the files back with
//! llama.cpp's own `gguf` package; the reader here is the unit tests'.)
//!
//! The layout: the magic `GGUF`, the version, the tensor and key/value counts, the key/values,
//! one record per tensor (name, dims innermost first, type, offset into the data), then the data,
//! every tensor starting at a multiple of `general.alignment` (32). All little-endian.

use std::io::Write;
use std::path::Path;

use burn::tensor::backend::Backend;

use crate::config::ModelConfig;
use crate::family::Family;
use crate::model::CausalLm;
use crate::save::Named;
use crate::ModelError;

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
/// `general.alignment`'s default, which llama.cpp's writer uses.
pub const ALIGNMENT: usize = 32;

/// How a tensor's values are stored (GGML's type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    /// Blocks of 32 values: an f16 scale `d = max|x| / 127`, then 32 `i8` of `round(x / d)`.
    Q8_0,
}

/// The values in one Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

impl GgmlType {
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    /// Bytes taken by `n` values (a whole number of blocks).
    fn bytes(self, n: usize) -> usize {
        match self {
            GgmlType::F32 => n * 4,
            GgmlType::F16 | GgmlType::BF16 => n * 2,
            GgmlType::Q8_0 => n / Q8_0_BLOCK * (2 + Q8_0_BLOCK),
        }
    }

    /// `data` (row-major, rows of `row_len` values) in this encoding. Q8_0 needs rows that are
    /// whole blocks.
    pub fn encode(self, data: &[f32], row_len: usize) -> Vec<u8> {
        match self {
            GgmlType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => data
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            GgmlType::BF16 => data
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            GgmlType::Q8_0 => {
                assert!(
                    row_len.is_multiple_of(Q8_0_BLOCK),
                    "Q8_0 rows are whole blocks"
                );
                let mut out = Vec::with_capacity(self.bytes(data.len()));
                for block in data.chunks(Q8_0_BLOCK) {
                    // In f32 throughout, as ggml's quantize_row_q8_0_ref: the scale, its
                    // inverse, and rounding half away from zero.
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                    out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
                    out.extend(block.iter().map(|v| ((v * inv).round() as i8) as u8));
                }
                out
            }
        }
    }
}

/// A metadata value (of the types a converted model's metadata uses).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Items of one type (`item_type`; the items' own variants for a non-empty array).
    Array(ValueType, Vec<Value>),
}

/// GGUF's ids of those value types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
        }
    }

    pub fn strings(items: impl IntoIterator<Item = String>) -> Value {
        Value::Array(
            ValueType::String,
            items.into_iter().map(Value::String).collect(),
        )
    }

    fn write_payload(&self, out: &mut Vec<u8>) {
        match self {
            Value::U32(v) => out.extend(v.to_le_bytes()),
            Value::I32(v) => out.extend(v.to_le_bytes()),
            Value::F32(v) => out.extend(v.to_le_bytes()),
            Value::Bool(v) => out.push(*v as u8),
            Value::String(s) => write_string(out, s),
            Value::Array(item, items) => {
                out.extend((*item as u32).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for v in items {
                    v.write_payload(out);
                }
            }
        }
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// One tensor: `shape` outermost first (as PyTorch writes it; the file stores it reversed).
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

/// A whole GGUF file in memory.
#[derive(Debug, Clone, Default)]
pub struct GgufFile {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<GgufTensor>,
}

impl GgufFile {
    /// Sets `key` (replacing an earlier value, as llama.cpp's writer does).
    pub fn set(&mut self, key: &str, value: Value) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(VERSION.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_string(&mut out, k);
            out.extend((v.value_type() as u32).to_le_bytes());
            v.write_payload(&mut out);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend((t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                out.extend((*d as u64).to_le_bytes());
            }
            out.extend(t.ty.id().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += t.data.len().next_multiple_of(ALIGNMENT);
        }
        out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        for t in &self.tensors {
            out.extend(&t.data);
            out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        }
        out
    }

    /// Writes the file to `path`.
    pub fn write(&self, path: &Path) -> Result<(), ModelError> {
        let write = || -> std::io::Result<()> {
            let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
            f.write_all(&self.to_bytes())?;
            f.into_inner()
                .map_err(std::io::IntoInnerError::into_error)?
                .sync_all()
        };
        write().map_err(|e| ModelError::Write {
            path: path.to_path_buf(),
            source: e,
        })
    }
}

/// The file-wide type asked for (`general.file_type` — llama.cpp's `LlamaFileType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
}

impl FileType {
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q8_0 => 7,
            FileType::BF16 => 32,
        }
    }

    /// The type a tensor of `shape` gets, as llama.cpp's converter picks it: vectors (norms)
    /// stay F32; a matrix whose rows are not whole Q8_0 blocks falls back to F16.
    fn tensor_type(self, shape: &[usize]) -> GgmlType {
        if shape.len() <= 1 {
            return GgmlType::F32;
        }
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q8_0 if shape.last().is_some_and(|r| r.is_multiple_of(Q8_0_BLOCK)) => {
                GgmlType::Q8_0
            }
            FileType::Q8_0 => GgmlType::F16,
        }
    }
}

/// Why a model cannot be written as GGUF.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

/// llama.cpp's architecture for a model, or why pipe cannot write it as one: the families
/// llama.cpp's converter writes as `llama` (Llama, Mistral), with an unscaled, linearly
/// scaled or Llama 3.1-scaled (`llama3`) rotary embedding.
pub fn llama_architecture(c: &ModelConfig) -> Result<&'static str, Unsupported> {
    if !matches!(c.family, Family::Llama | Family::Mistral) {
        return Err(Unsupported(format!(
            "GGUF export writes Llama-architecture models (Llama, Mistral), and this is a {:?} model",
            c.family
        )));
    }
    let bias = [
        (c.qkv_bias, "attention_bias"),
        (c.o_bias, "attention_bias"),
        (c.mlp_bias, "mlp_bias"),
    ];
    if let Some((_, field)) = bias.iter().find(|(on, _)| *on) {
        return Err(Unsupported(format!(
            "GGUF export does not write biases yet, and this model has `{field}: true`"
        )));
    }
    match &c.rope.scaling {
        None
        | Some(crate::rope::RopeScaling::Linear { .. })
        | Some(crate::rope::RopeScaling::Llama3 { .. }) => Ok("llama"),
        Some(other) => Err(Unsupported(format!(
            "GGUF export supports unscaled, linear and llama3 rotary embedding scaling, and this model's rope_scaling is {}",
            other.rope_type()
        ))),
    }
}

/// The `llama.*` hyperparameters llama.cpp's converter writes for `c`.
pub fn llama_metadata(c: &ModelConfig, file: &mut GgufFile) {
    let u = |n: usize| Value::U32(n as u32);
    file.set("llama.block_count", u(c.num_hidden_layers));
    file.set("llama.context_length", u(c.max_position_embeddings));
    file.set("llama.embedding_length", u(c.hidden_size));
    file.set("llama.feed_forward_length", u(c.intermediate_size));
    file.set("llama.attention.head_count", u(c.num_attention_heads));
    file.set("llama.attention.head_count_kv", u(c.num_key_value_heads));
    file.set("llama.rope.freq_base", Value::F32(c.rope.theta as f32));
    file.set(
        "llama.attention.layer_norm_rms_epsilon",
        Value::F32(c.rms_norm_eps as f32),
    );
    file.set("llama.attention.key_length", u(c.head_dim));
    file.set("llama.attention.value_length", u(c.head_dim));
    if let Some(crate::rope::RopeScaling::Linear { factor }) = &c.rope.scaling {
        file.set("llama.rope.scaling.type", Value::String("linear".into()));
        file.set("llama.rope.scaling.factor", Value::F32(*factor as f32));
    }
    file.set("llama.vocab_size", u(c.vocab_size));
    file.set("llama.rope.dimension_count", u(c.head_dim));
}

/// transformers' name of a tensor → llama.cpp's.
fn llama_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let short = match module {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.weight"))
}

/// The rows of a q or k projection `[heads · head_dim, in]` reordered from transformers'
/// rotate-half layout (each head's first half pairs with its second) to the adjacent pairs
/// GGML's rope rotates: row `h·d + 2i + j` ← row `h·d + j·d/2 + i`.
fn permute_for_rope(data: &[f32], heads: usize, row_len: usize) -> Vec<f32> {
    let rows = data.len() / row_len;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * head_dim + j * half + i;
                out.extend_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

/// Llama 3.1's per-frequency divisors of the rotary embedding, as llama.cpp's converter
/// computes them for its `rope_freqs` tensor: in f32, as PyTorch evaluates its expression
/// (Python numbers cast to f32 where they meet a tensor).
fn llama3_rope_factors(
    theta: f64,
    head_dim: usize,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: usize,
) -> Vec<f32> {
    let old = original_max_position_embeddings as f64;
    let low_wavelen = (old / low_freq_factor) as f32;
    let high_wavelen = (old / high_freq_factor) as f32;
    (0..head_dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0f32 / (theta as f32).powf(i as f32 / head_dim as f32);
            let wavelen = (2.0 * std::f64::consts::PI) as f32 / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor as f32
            } else {
                let smooth = (old as f32 / wavelen - low_freq_factor as f32)
                    / (high_freq_factor - low_freq_factor) as f32;
                1.0 / ((1.0 - smooth) / factor as f32 + smooth)
            }
        })
        .collect()
}

impl<B: Backend> CausalLm<B> {
    /// The weights as llama.cpp's converter writes them for `llama_architecture` models: its
    /// tensor names, q/k rows permuted for GGML's rope, each encoded as `file_type` asks, in
    /// the order of transformers' names (the order of a safetensors file).
    pub fn gguf_tensors(&self, file_type: FileType) -> Result<Vec<GgufTensor>, Unsupported> {
        let c = &self.config;
        let mut named: Vec<Named> = self.hf_tensors();
        named.sort_by(|a, b| a.name.cmp(&b.name));
        // Tensors the converter makes come before the checkpoint's.
        let mut extra = Vec::new();
        if let Some(crate::rope::RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) = &c.rope.scaling
        {
            let factors = llama3_rope_factors(
                c.rope.theta,
                c.head_dim,
                *factor,
                *low_freq_factor,
                *high_freq_factor,
                *original_max_position_embeddings,
            );
            extra.push(GgufTensor {
                name: "rope_freqs.weight".into(),
                shape: vec![factors.len()],
                ty: GgmlType::F32,
                data: GgmlType::F32.encode(&factors, factors.len()),
            });
        }
        let weights: Vec<GgufTensor> = named
            .into_iter()
            .map(|t| {
                let name = llama_name(&t.name).ok_or_else(|| {
                    Unsupported(format!(
                        "GGUF export has no llama.cpp name for the tensor {}",
                        t.name
                    ))
                })?;
                let row_len = *t.shape.last().unwrap_or(&1);
                let data = if t.name.ends_with("q_proj.weight") {
                    permute_for_rope(&t.data, c.num_attention_heads, row_len)
                } else if t.name.ends_with("k_proj.weight") {
                    permute_for_rope(&t.data, c.num_key_value_heads, row_len)
                } else {
                    t.data
                };
                let ty = file_type.tensor_type(&t.shape);
                Ok(GgufTensor {
                    name,
                    data: ty.encode(&data, row_len),
                    shape: t.shape,
                    ty,
                })
            })
            .collect::<Result<_, Unsupported>>()?;
        extra.extend(weights);
        Ok(extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back a file of the value and tensor types this module writes (the tests read
    /// exported files with llama.cpp's own `gguf` package; this checks the layout here).
    fn parse(bytes: &[u8]) -> Result<GgufFile, String> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4)? != MAGIC {
            return Err("it does not start with GGUF".into());
        }
        if r.u32()? != VERSION {
            return Err("not version 3".into());
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        let mut file = GgufFile::default();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            file.metadata.push((key, r.value(ty)?));
        }
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            let mut shape = (0..n_dims)
                .map(|_| r.u64().map(|d| d as usize))
                .collect::<Result<Vec<_>, _>>()?;
            shape.reverse();
            let id = r.u32()?;
            let ty = [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::BF16]
                .into_iter()
                .find(|t| t.id() == id)
                .ok_or(format!("GGML type {id}"))?;
            infos.push((name, shape, ty, r.u64()? as usize));
        }
        let start = r.at.next_multiple_of(ALIGNMENT);
        for (name, shape, ty, offset) in infos {
            let at = start + offset;
            let data = bytes
                .get(at..at + ty.bytes(shape.iter().product()))
                .ok_or(format!("tensor {name} runs past the end"))?;
            file.tensors.push(GgufTensor {
                name,
                shape,
                ty,
                data: data.to_vec(),
            });
        }
        Ok(file)
    }

    struct Reader<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    impl Reader<'_> {
        fn take(&mut self, n: usize) -> Result<&[u8], String> {
            let s = self
                .bytes
                .get(self.at..self.at + n)
                .ok_or(format!("truncated at byte {}", self.at))?;
            self.at += n;
            Ok(s)
        }
        fn u32(&mut self) -> Result<u32, String> {
            Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
        }
        fn u64(&mut self) -> Result<u64, String> {
            Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
        }
        fn string(&mut self) -> Result<String, String> {
            let n = self.u64()? as usize;
            String::from_utf8(self.take(n)?.to_vec()).map_err(|e| e.to_string())
        }
        fn value(&mut self, ty: u32) -> Result<Value, String> {
            Ok(match ty {
                4 => Value::U32(self.u32()?),
                5 => Value::I32(self.u32()? as i32),
                6 => Value::F32(f32::from_bits(self.u32()?)),
                7 => Value::Bool(self.take(1)?[0] != 0),
                8 => Value::String(self.string()?),
                9 => {
                    let item = self.u32()?;
                    let n = self.u64()?;
                    let items = (0..n)
                        .map(|_| self.value(item))
                        .collect::<Result<Vec<_>, _>>()?;
                    let item = match items.first() {
                        Some(v) => v.value_type(),
                        None => return Err("an empty array".into()),
                    };
                    Value::Array(item, items)
                }
                other => return Err(format!("value type {other}")),
            })
        }
    }

    #[test]
    fn q8_0_rounds_half_away_from_zero_with_an_f16_scale() {
        let mut block = vec![0f32; 32];
        block[0] = 127.0;
        block[1] = -2.5;
        block[2] = 2.5;
        block[3] = 0.49;
        let bytes = GgmlType::Q8_0.encode(&block, 32);
        assert_eq!(bytes.len(), 34);
        assert_eq!(half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(), 1.0);
        assert_eq!(&bytes[2..6], &[127, (-3i8) as u8, 3, 0]);
        // An all-zero block: scale 0 and zeros, no NaN.
        assert_eq!(GgmlType::Q8_0.encode(&[0.0; 32], 32), vec![0; 34]);
    }

    #[test]
    fn rope_permutation_interleaves_each_heads_halves() {
        // 2 heads of 4 rows, rows of 1 value: head 0 rows 0,1 | 2,3 → 0,2,1,3.
        let data: Vec<f32> = (0..8).map(|v| v as f32).collect();
        assert_eq!(
            permute_for_rope(&data, 2, 1),
            vec![0., 2., 1., 3., 4., 6., 5., 7.]
        );
    }

    #[test]
    fn a_file_reads_back_as_written() {
        let mut f = GgufFile::default();
        f.set("general.architecture", Value::String("llama".into()));
        f.set("a.list", Value::strings(["x".to_string(), "y z".into()]));
        f.set("a.flag", Value::Bool(true));
        f.tensors.push(GgufTensor {
            name: "t".into(),
            shape: vec![2, 3],
            ty: GgmlType::F32,
            data: GgmlType::F32.encode(&[1., 2., 3., 4., 5., 6.], 3),
        });
        f.tensors.push(GgufTensor {
            name: "u".into(),
            shape: vec![1, 32],
            ty: GgmlType::Q8_0,
            data: GgmlType::Q8_0.encode(&[0.5; 32], 32),
        });
        let bytes = f.to_bytes();
        assert_eq!(&bytes[..4], b"GGUF");
        let back = parse(&bytes).unwrap();
        assert_eq!(back.metadata, f.metadata);
        assert_eq!(back.tensors.len(), 2);
        assert_eq!(back.tensors[1].shape, vec![1, 32]);
        assert_eq!(back.tensors[1].data, f.tensors[1].data);
        assert!(parse(&bytes[..bytes.len() - 40]).is_err());
        assert!(parse(b"GGML").is_err());
    }
}

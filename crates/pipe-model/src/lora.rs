//! LoRA adapters as PEFT defines them: `W·x + B·A·x · alpha/r`, A initialised
//! kaiming-uniform (bound `1/√fan_in`), B zeros; PEFT's adapter files in and out; merging.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use pipe_rand::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::load::{Checkpoint, HostTensor};
use crate::model::{CausalLm, Lora};
use crate::save::{host, Named};
use crate::weights::named_param;
use crate::{AdapterError, ModelError};

/// Which linear layers get adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Targets {
    /// Every linear layer of the decoder blocks (q, k, v, o, gate, up, down), not `lm_head`:
    /// PEFT's `all-linear` for causal LMs.
    AllLinear,
    /// Module names: a short name (`q_proj`) matches every module ending in it; a full name
    /// (`model.layers.0.self_attn.q_proj`) matches that module.
    Names(Vec<String>),
}

impl Targets {
    pub fn matches(&self, module: &str) -> bool {
        match self {
            Targets::AllLinear => module != "lm_head",
            Targets::Names(names) => names
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    pub targets: Targets,
    /// Modules trained in full beside the adapters and saved with them (PEFT's
    /// `modules_to_save`): `embed_tokens`, `lm_head`, or linear layers by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules_to_save: Vec<String>,
}

impl LoraSpec {
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

impl<B: Backend> CausalLm<B> {
    /// Adds fresh adapters (trainable) to the matching layers. A is drawn from `seed`, so the
    /// same seed gives the same adapter on every backend.
    pub fn add_lora(mut self, spec: &LoraSpec, seed: u64) -> Result<Self, ModelError> {
        let mut rng = SplitMix64::new(seed);
        let mut n = 0;
        for (name, proj) in self.linear_modules_mut() {
            if !spec.targets.matches(&name) {
                continue;
            }
            let [d_in, d_out] = proj.weight.val().dims();
            let device = proj.weight.val().device();
            let bound = 1.0 / (d_in as f64).sqrt();
            // PEFT's A is [r, in]; draw in that order so a seed means the same matrix.
            let a_rows: Vec<f32> = (0..spec.r * d_in)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                .collect();
            let a = Tensor::<B, 2>::from_data(TensorData::new(a_rows, [spec.r, d_in]), &device)
                .transpose();
            let b = Tensor::<B, 2>::zeros([spec.r, d_out], &device);
            proj.lora = Some(Lora {
                a: named_param(&format!("{name}.lora_A.weight"), a, true),
                b: named_param(&format!("{name}.lora_B.weight"), b, true),
                scaling: spec.scaling(),
                dropout: spec.dropout,
            });
            n += 1;
        }
        if n == 0 {
            return Err(AdapterError::NoTargets {
                targets: format!("{:?}", spec.targets),
                modules: self.module_short_names(),
            }
            .into());
        }
        Ok(self)
    }

    /// Loads a PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
    pub fn load_peft_adapter(mut self, dir: &Path, trainable: bool) -> Result<Self, ModelError> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::Io {
            path: cfg_path.clone(),
            source: e,
        })?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| AdapterError::ConfigJson {
                path: cfg_path.clone(),
                source: e,
            })?;
        let r = cfg["r"].as_u64().ok_or_else(|| AdapterError::NoRank {
            path: cfg_path.clone(),
        })? as usize;
        let alpha = cfg["lora_alpha"].as_f64().unwrap_or(r as f64);
        let dropout = if trainable {
            cfg["lora_dropout"].as_f64().unwrap_or(0.0)
        } else {
            0.0
        };
        for (key, what) in [("use_dora", "DoRA"), ("use_rslora", "rsLoRA")] {
            if cfg[key].as_bool().unwrap_or(false) {
                return Err(AdapterError::Unsupported { what }.into());
            }
        }
        let ck = Checkpoint::open_file(&dir.join("adapter_model.safetensors"))?;
        let mut n = 0;
        for (name, proj) in self.linear_modules_mut() {
            let key = |ab: &str| format!("base_model.model.{name}.lora_{ab}.weight");
            if !ck.contains(&key("A")) {
                continue;
            }
            let a = ck.read(&key("A"))?;
            let b = ck.read(&key("B"))?;
            let [d_in, d_out] = proj.weight.val().dims();
            if a.shape != [r, d_in] || b.shape != [d_out, r] {
                return Err(AdapterError::Shape {
                    module: name,
                    a: a.shape,
                    b: b.shape,
                    expected_a: vec![r, d_in],
                    expected_b: vec![d_out, r],
                }
                .into());
            }
            let device = proj.weight.val().device();
            let at =
                Tensor::<B, 2>::from_data(TensorData::new(a.data, [r, d_in]), &device).transpose();
            let bt =
                Tensor::<B, 2>::from_data(TensorData::new(b.data, [d_out, r]), &device).transpose();
            proj.lora = Some(Lora {
                a: named_param(&format!("{name}.lora_A.weight"), at, trainable),
                b: named_param(&format!("{name}.lora_B.weight"), bt, trainable),
                scaling: alpha / r as f64,
                dropout,
            });
            n += 1;
        }
        if n == 0 {
            return Err(AdapterError::NoWeights {
                dir: dir.to_path_buf(),
                modules: self.module_short_names(),
            }
            .into());
        }
        let saved: Vec<String> = match &cfg["modules_to_save"] {
            serde_json::Value::Array(v) => v
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        };
        for module in self.resolve_saved_modules(&saved)? {
            let key = format!("base_model.model.{module}.weight");
            if !ck.contains(&key) {
                return Err(AdapterError::MissingSaved { module, key }.into());
            }
            let w = ck.read(&key)?;
            self.set_saved_module(&module, Some(w), trainable)?;
        }
        Ok(self)
    }

    /// The distinct short names of the linear layers (`q_proj`, …), for error messages.
    fn module_short_names(&mut self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (name, _) in self.linear_modules_mut() {
            let short = name.rsplit('.').next().unwrap_or(&name).to_string();
            if !names.contains(&short) {
                names.push(short);
            }
        }
        names
    }

    /// The Hugging Face module names of `modules_to_save` entries: `embed_tokens` →
    /// `model.embed_tokens`, `lm_head`, and linear layers by short or full name.
    pub fn resolve_saved_modules(&mut self, names: &[String]) -> Result<Vec<String>, ModelError> {
        let mut out: Vec<String> = Vec::new();
        for n in names {
            let found: Vec<String> = match n.as_str() {
                "embed_tokens" | "model.embed_tokens" => vec!["model.embed_tokens".into()],
                "lm_head" if self.lm_head.is_none() => return Err(AdapterError::TiedHead.into()),
                _ => self
                    .linear_modules_mut()
                    .into_iter()
                    .map(|(m, _)| m)
                    .filter(|m| m == n || m.ends_with(&format!(".{n}")))
                    .collect(),
            };
            if found.is_empty() {
                return Err(AdapterError::NoModule(n.clone()).into());
            }
            for f in found {
                if !out.contains(&f) {
                    out.push(f);
                }
            }
        }
        Ok(out)
    }

    /// Makes the named modules (from [`Self::resolve_saved_modules`]) trainable in full.
    pub fn train_saved_modules(mut self, modules: &[String]) -> Self {
        for m in modules {
            self.set_saved_module(m, None, true)
                .expect("resolved module names exist");
        }
        self
    }

    /// The named modules' weights under PEFT's names, in the Hugging Face layout
    /// (`base_model.model.model.embed_tokens.weight`, `base_model.model.lm_head.weight`).
    pub fn saved_module_tensors(&mut self, modules: &[String]) -> Vec<Named> {
        let mut out = Vec::new();
        for m in modules {
            let (shape, data) = if m == "model.embed_tokens" {
                host(self.embed_tokens.val())
            } else {
                let proj = self
                    .linear_modules_mut()
                    .into_iter()
                    .find(|(n, _)| n == m)
                    .map(|(_, p)| p)
                    .expect("resolved module names exist");
                host(proj.weight.val().transpose())
            };
            out.push(Named {
                name: format!("base_model.model.{m}.weight"),
                shape,
                data,
            });
        }
        out
    }

    /// Sets a module's weight (Hugging Face layout; `None` keeps the current one) and whether
    /// it trains.
    fn set_saved_module(
        &mut self,
        module: &str,
        weight: Option<HostTensor>,
        trainable: bool,
    ) -> Result<(), ModelError> {
        let name = format!("{module}.weight");
        if module == "model.embed_tokens" {
            let current = self.embed_tokens.val();
            let t = match weight {
                Some(w) => {
                    check_shape(module, &w, &current.dims())?;
                    Tensor::from_data(TensorData::new(w.data, current.dims()), &current.device())
                }
                None => current,
            };
            self.embed_tokens = named_param(&name, t, trainable);
            return Ok(());
        }
        let proj = self
            .linear_modules_mut()
            .into_iter()
            .find(|(n, _)| n == module)
            .map(|(_, p)| p)
            .ok_or_else(|| AdapterError::NoModule(module.to_string()))?;
        let current = proj.weight.val();
        let [d_in, d_out] = current.dims();
        let t = match weight {
            Some(w) => {
                check_shape(module, &w, &[d_out, d_in])?;
                Tensor::<B, 2>::from_data(TensorData::new(w.data, [d_out, d_in]), &current.device())
                    .transpose()
            }
            None => current,
        };
        proj.weight = named_param(&name, t, trainable);
        Ok(())
    }

    /// Folds every adapter into its weight: `W + A·B·alpha/r` (in the `[in, out]` layout).
    pub fn merge_lora(mut self) -> Self {
        for (name, proj) in self.linear_modules_mut() {
            if let Some(l) = proj.lora.take() {
                let delta = l.a.val().matmul(l.b.val()) * l.scaling;
                let trainable = proj.weight.val().is_require_grad();
                proj.weight = named_param(
                    &format!("{name}.weight"),
                    proj.weight.val() + delta,
                    trainable,
                );
            }
        }
        self
    }
}

fn check_shape(module: &str, w: &HostTensor, expected: &[usize]) -> Result<(), ModelError> {
    if w.shape != expected {
        return Err(AdapterError::SavedShape {
            module: module.to_string(),
            found: w.shape.clone(),
            expected: expected.to_vec(),
        }
        .into());
    }
    Ok(())
}

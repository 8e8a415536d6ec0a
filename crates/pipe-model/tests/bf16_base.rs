//! A LoRA base kept in bf16 (`keep_frozen_projections_in_bf16`) computes exactly what the f32
//! base computes when products run in bf16: the same logits and the same adapter gradients,
//! bit for bit, with the frozen projections stored in bf16 and everything trainable in f32.

use burn::backend::Autodiff;
use burn::tensor::{DType, Int, Tensor, TensorData};
use pipe_model::{
    init_model, CausalLm, CpuBackend, LoraSpec, MatmulPrecision, ModelConfig, Targets,
};

type B = Autodiff<CpuBackend>;

fn model(precision: MatmulPrecision, untied: bool) -> CausalLm<B> {
    let cfg = ModelConfig::from_json(&format!(
        r#"{{"vocab_size": 50, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "tie_word_embeddings": {}}}"#,
        !untied
    ))
    .unwrap();
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Targets::AllLinear,
        modules_to_save: Vec::new(),
    };
    init_model::<B>(&cfg, 3, 0.02, &Default::default(), false)
        .add_lora(&spec, 5)
        .unwrap()
        .with_matmul_precision(precision)
}

fn ids() -> Tensor<B, 2, Int> {
    let rows: Vec<i64> = (0..2 * 12).map(|i| (i * 7 + 3) % 50).collect();
    Tensor::from_data(TensorData::new(rows, [2, 12]), &Default::default())
}

/// The logits and every adapter gradient, as plain numbers.
fn logits_and_adapter_grads(mut m: CausalLm<B>) -> (Vec<f32>, Vec<Vec<f32>>) {
    let logits = m.forward(ids(), None);
    let values = logits.clone().into_data().to_vec::<f32>().unwrap();
    let grads = (logits.clone() * logits).mean().backward();
    let adapter_grads = m
        .linear_modules_mut()
        .into_iter()
        .filter_map(|(_, p)| {
            p.lora
                .as_ref()
                .map(|l| [l.a.grad(&grads), l.b.grad(&grads)])
        })
        .flatten()
        .map(|g| g.expect("an adapter has a gradient"))
        .map(|g| g.into_data().to_vec::<f32>().unwrap())
        .collect();
    (values, adapter_grads)
}

#[test]
fn a_bf16_base_computes_what_the_f32_base_computes_at_bf16() {
    for untied in [false, true] {
        let f32_base = model(MatmulPrecision::Bf16, untied);
        let mut bf16_base = model(MatmulPrecision::Bf16, untied).keep_frozen_projections_in_bf16();
        let mut projections = 0;
        for (name, p) in bf16_base.linear_modules_mut() {
            assert_eq!(p.weight.val().dtype(), DType::BF16, "{name}");
            if let Some(l) = &p.lora {
                assert_eq!(l.a.val().dtype(), DType::F32, "{name}: adapters stay f32");
                assert_eq!(l.b.val().dtype(), DType::F32, "{name}: adapters stay f32");
            }
            projections += 1;
        }
        assert_eq!(projections, 2 * 7 + usize::from(untied));
        assert_eq!(bf16_base.embed_tokens.val().dtype(), DType::F32);
        assert_eq!(
            logits_and_adapter_grads(f32_base),
            logits_and_adapter_grads(bf16_base),
            "untied lm_head: {untied}"
        );
    }
}

#[test]
fn at_f32_products_and_for_trainable_weights_nothing_changes() {
    let mut m = model(MatmulPrecision::F32, true).keep_frozen_projections_in_bf16();
    for (name, p) in m.linear_modules_mut() {
        assert_eq!(p.weight.val().dtype(), DType::F32, "{name}");
    }
    let cfg = model(MatmulPrecision::F32, true).config;
    let mut full = init_model::<B>(&cfg, 3, 0.02, &Default::default(), true)
        .with_matmul_precision(MatmulPrecision::Bf16)
        .keep_frozen_projections_in_bf16();
    for (name, p) in full.linear_modules_mut() {
        assert_eq!(
            p.weight.val().dtype(),
            DType::F32,
            "{name}: trained in full"
        );
    }
}

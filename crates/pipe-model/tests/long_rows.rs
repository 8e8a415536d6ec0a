//! A row too long for its attention scores to be held whole is attended a block of queries at
//! a time while training (`pipe_model::attention`): the logits are those of the forward pass
//! that scoring runs (burn's own attention, checked against transformers elsewhere), with
//! padding and with soft-capped scores, and the gradient reaches every projection.

use burn::backend::Autodiff;
use burn::tensor::{Int, Tensor, TensorData};
use pipe_model::attention::query_block_rows;
use pipe_model::{init_model, CausalLm, CpuBackend, ModelConfig};

/// One layer, 4 query heads on 2 key/value heads; `softcap`: Gemma 2's attention soft-capping.
fn config(softcap: bool) -> ModelConfig {
    let family = if softcap {
        r#""model_type": "gemma2", "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 8, "head_dim": 8,"#
    } else {
        ""
    };
    ModelConfig::from_json(&format!(
        r#"{{{family} "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 4096}}"#
    ))
    .unwrap()
}

/// 2100 tokens: 4 heads' scores take 70.6 MB, more than one block's budget.
const SEQ: usize = 2100;

fn ids<B: burn::tensor::backend::Backend>() -> Tensor<B, 2, Int> {
    let row: Vec<i64> = (0..SEQ as i64).map(|i| (i * 7 + 3) % 64).collect();
    Tensor::from_data(TensorData::new(row, [1, SEQ]), &Default::default())
}

fn logits_of(softcap: bool, padding: Option<&[Vec<u8>]>) {
    let cfg = config(softcap);
    assert!(query_block_rows(1, 4, SEQ, SEQ).is_some());
    let scoring: CausalLm<CpuBackend> = init_model(&cfg, 7, 0.2, &Default::default(), false);
    let want = scoring
        .forward(ids(), padding)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let training: CausalLm<Autodiff<CpuBackend>> =
        init_model(&cfg, 7, 0.2, &Default::default(), true);
    let logits = training.forward(ids(), padding);
    let got = logits.clone().into_data().to_vec::<f32>().unwrap();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "softcap {softcap}: logits differ by {worst}");

    let grads = (logits.clone() * logits).mean().backward();
    let q = &training.layers[0].self_attn.q_proj.as_ref().unwrap().weight;
    let d_q = q.grad(&grads).expect("q_proj takes a gradient").abs().sum();
    assert!(
        d_q.into_scalar() > 0.0,
        "softcap {softcap}: no gradient reaches q_proj"
    );
}

#[test]
fn a_long_row_trains_on_the_logits_scoring_computes() {
    logits_of(false, None);
}

#[test]
fn a_long_padded_row_trains_on_the_logits_scoring_computes() {
    let mut mask = vec![1u8; SEQ];
    mask[..40].fill(0);
    logits_of(false, Some(&[mask]));
}

#[test]
fn a_long_soft_capped_row_trains_on_the_logits_scoring_computes() {
    logits_of(true, None);
}

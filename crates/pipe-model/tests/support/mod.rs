//! What the parity tests share: the committed fixtures (from scripts/make_llama_fixtures.py and
//! scripts/make_family_fixtures.py) and the comparison of a model's logits and loss with them.

#![allow(dead_code)]

use burn::tensor::{Int, Tensor, TensorData};
use pipe_model::{load_model, shifted_cross_entropy, CausalLm};
use serde_json::Value;

pub use pipe_testkit::fixtures::{expected_at, fixture, floats, rows_i64};

pub type B = pipe_model::CpuBackend;

pub fn ids_tensor(rows: &[Vec<i64>]) -> Tensor<B, 2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [b, s]), &Default::default())
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn check_case(
    model: &CausalLm<B>,
    e: &Value,
    prefix: &str,
    mask: Option<Vec<Vec<u8>>>,
    what: &str,
) {
    let ids = rows_i64(&e[format!("{prefix}input_ids")]);
    let labels = rows_i64(&e[format!("{prefix}labels")]);
    let logits = model.forward(ids_tensor(&ids), mask.as_deref());
    let ours: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
    let theirs = floats(&e[format!("{prefix}logits")]);
    if prefix.is_empty() {
        let d = max_abs_diff(&ours, &theirs);
        assert!(d <= 1e-4, "{what}: max |Δlogit| = {d}");
    } else {
        // Padded rows: compare only the positions the mask keeps.
        let v = *logits.dims().last().unwrap();
        let s = ids[0].len();
        let m = mask.as_ref().unwrap();
        let mut d: f32 = 0.0;
        let mut k = 0;
        for (bi, row) in m.iter().enumerate() {
            for (t, &keep) in row.iter().enumerate() {
                if keep == 1 {
                    let o = &ours[(bi * s + t) * v..(bi * s + t + 1) * v];
                    let h = &theirs[k * v..(k + 1) * v];
                    d = d.max(max_abs_diff(o, h));
                    k += 1;
                }
            }
        }
        assert!(d <= 1e-4, "{what} (padded): max |Δlogit| = {d}");
    }
    let (sum, count) = shifted_cross_entropy(logits, &labels);
    let loss = sum.into_scalar() / count as f32;
    let want = e[format!("{prefix}loss")].as_f64().unwrap() as f32;
    assert!((loss - want).abs() <= 1e-5, "{what}: loss {loss} vs {want}");
}

/// The fixture model at `dir` against its `expected.json`: logits within 1e-4 and loss within
/// 1e-5, unpadded and right-padded.
pub fn check_model_at(dir: &std::path::Path) {
    let model: CausalLm<B> = load_model(dir, &Default::default()).unwrap();
    let e = expected_at(dir);
    check_padded_and_unpadded(&model, &e, &dir.display().to_string());
}

/// `model` against `e`'s unpadded and (if present) padded cases.
pub fn check_padded_and_unpadded(model: &CausalLm<B>, e: &Value, what: &str) {
    check_case(model, e, "", None, what);
    if e.get("padded_input_ids").is_some() {
        let mask: Vec<Vec<u8>> = rows_i64(&e["padded_attention_mask"])
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u8).collect())
            .collect();
        check_case(model, e, "padded_", Some(mask), what);
    }
}

//! Gradient checkpointing holds one layer's intermediate results at a time instead of all of
//! them. Counted with this test binary's own allocator: the peak of bytes held while one
//! micro-batch's gradients are computed, with and without recomputation, on a model whose
//! activations outweigh its weights (8 layers, 128 tokens a row).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::backend::Autodiff;
use pipe_model::{init_model, CausalLm, ModelConfig};
use pipe_train::segments::{micro_batch_gradients, Pass};
use pipe_train::MicroBatch;

struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

type B = Autodiff<pipe_model::CpuBackend>;

/// Bytes held at the peak of one micro-batch's forward and backward pass, above what was held
/// before it.
fn peak_of(model: &CausalLm<B>, mb: &MicroBatch, recompute_layers: bool) -> (usize, f64) {
    let before = HELD.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let pass = Pass {
        recompute_layers,
        dropout_seed: None,
    };
    let (grads, loss) = micro_batch_gradients(model, mb, mb.target_tokens(), pass);
    let peak = PEAK.load(Ordering::Relaxed) - before;
    drop(grads);
    (peak, loss)
}

#[test]
fn recomputing_layers_holds_a_fraction_of_the_activations_for_the_same_loss() {
    let cfg = ModelConfig::from_json(
        r#"{"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256}"#,
    )
    .unwrap();
    let model: CausalLm<B> = init_model(&cfg, 1, 0.02, &Default::default(), true);
    let rows: Vec<Vec<i64>> = (0..4)
        .map(|r| (0..128).map(|t| (r * 13 + t * 7) % 64).collect())
        .collect();
    let mb = MicroBatch {
        labels: rows.clone(),
        input_ids: rows,
        attention_mask: None,
        packing: None,
    };
    // Once untimed, so that both measured passes find the same caches and pools.
    peak_of(&model, &mb, false);
    let (kept, loss) = peak_of(&model, &mb, false);
    let (recomputed, same) = peak_of(&model, &mb, true);
    eprintln!("peak: {kept} bytes keeping every layer's results, {recomputed} recomputing them");
    assert_eq!(loss.to_bits(), same.to_bits());
    assert!(
        recomputed * 2 < kept,
        "recomputing held {recomputed} bytes at its peak, keeping {kept}"
    );
}

//! Writes a fixture model back in Hugging Face layout the way pipe exports models, so that
//! scripts/check_family_export.py can load the files with transformers and PEFT:
//!
//!     cargo run -p pipe-model --release --example export_fixture -- FIXTURE_DIR OUT_DIR
//!
//! OUT_DIR/full is the model as loaded; OUT_DIR/merged, when FIXTURE_DIR has a `lora/`
//! adapter, is the model with that adapter merged.

use std::path::PathBuf;

use pipe_model::{load_model, CausalLm, CpuBackend, SaveDtype};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [fixture, out] = args.as_slice() else {
        return Err("usage: export_fixture FIXTURE_DIR OUT_DIR".into());
    };
    let model: CausalLm<CpuBackend> = load_model(fixture, &Default::default())?;
    model.save_hf(&out.join("full"), SaveDtype::F32)?;
    let adapter = fixture.join("lora");
    if adapter.join("adapter_config.json").exists() {
        let merged = model.load_peft_adapter(&adapter, false)?.merge_lora();
        merged.save_hf(&out.join("merged"), SaveDtype::F32)?;
    }
    println!("wrote {}", out.display());
    Ok(())
}

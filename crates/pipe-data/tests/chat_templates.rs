//! Conversations rendered with six real chat templates (Qwen2.5's ChatML, SmolLM2's ChatML with
//! `{% generation %}` markers, Llama-3, Mistral's [INST], Gemma's <start_of_turn>, Phi-3) are
//! token-exact with transformers' `apply_chat_template(..., tokenize=True)`, and their loss
//! masks equal the reference masks (transformers' `return_assistant_tokens_mask` where the
//! template has generation markers, the prompt/completion split per turn where it has none):
//! id for id, position for position. Fixtures: scripts/make_chat_fixtures.py (transformers
//! 4.57.6, tokenizers 0.22.2).

use std::path::{Path, PathBuf};

use pipe_data::chat::{
    config_template, encode_conversation, special_tokens, ChatTemplate, Conversation, Message,
    TrainOn,
};
use pipe_data::tokenize::load_tokenizer;
use serde_json::Value;

const FAMILIES: [&str; 6] = [
    "qwen2.5",
    "smollm2-generation",
    "llama3",
    "mistral",
    "gemma",
    "phi3",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat")
}

fn conversations() -> Vec<Vec<Message>> {
    let text = std::fs::read_to_string(fixtures().join("conversations.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

fn mask(v: &Value) -> Vec<bool> {
    let m: Vec<u8> = serde_json::from_value(v.clone()).unwrap();
    m.into_iter().map(|x| x == 1).collect()
}

#[test]
fn six_real_templates_are_token_and_mask_exact_with_transformers() {
    let convs = conversations();
    let mut checked = 0;
    for family in FAMILIES {
        let dir = fixtures().join(family);
        let loaded = load_tokenizer(&dir).unwrap();
        let source = config_template(loaded.config.as_ref()).unwrap().unwrap();
        let template = ChatTemplate::new(&source, special_tokens(loaded.config.as_ref())).unwrap();
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        assert_eq!(
            template.has_generation_markers,
            expected["has_generation_markers"].as_bool().unwrap(),
            "{family}"
        );
        for case in expected["cases"].as_array().unwrap() {
            let i = case["conversation"].as_u64().unwrap() as usize;
            let conv = Conversation {
                index: i,
                source: None,
                messages: convs[i].clone(),
            };
            let at = format!("{family}, conversation {i}");
            if let Some(err) = case.get("error") {
                let e =
                    encode_conversation(&loaded.tokenizer, &template, &conv, TrainOn::Assistant)
                        .unwrap_err()
                        .to_string();
                assert_eq!(
                    e,
                    format!(
                        "record {i}: the chat template fails: {}",
                        err.as_str().unwrap()
                    ),
                    "{at}"
                );
                continue;
            }
            let rendered = template.render(&conv.messages, false, i).unwrap();
            assert_eq!(rendered.text, case["text"].as_str().unwrap(), "{at}: text");
            for (train_on, key) in [
                (TrainOn::Assistant, "assistant_masks"),
                (TrainOn::LastAssistant, "last_masks"),
            ] {
                let (got_ids, got_mask) =
                    encode_conversation(&loaded.tokenizer, &template, &conv, train_on).unwrap();
                assert_eq!(got_ids, ids(&case["input_ids"]), "{at}: input_ids");
                assert_eq!(got_mask, mask(&case[key]), "{at}: {key}");
            }
            let (all_ids, all) =
                encode_conversation(&loaded.tokenizer, &template, &conv, TrainOn::All).unwrap();
            assert!(all.iter().all(|&m| m) && all.len() == all_ids.len(), "{at}");
            if let Some(want) = case.get("generation_prompt_ids") {
                let n = conv.messages.len() - 1;
                let prompt = template.render(&conv.messages[..n], true, i).unwrap();
                let got = loaded
                    .tokenizer
                    .encode_fast(prompt.text.as_str(), false)
                    .unwrap();
                assert_eq!(
                    got.get_ids(),
                    ids(want).as_slice(),
                    "{at}: generation prompt"
                );
            }
            checked += 1;
        }
    }
    // Every conversation of every family but Gemma's two with a system turn (refused by it).
    assert_eq!(checked, 6 * 6 - 3, "cases checked");
}

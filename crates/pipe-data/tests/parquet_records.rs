//! Parquet as the Hub's datasets hold it: a file written by pyarrow (snappy; nested `messages`
//! list of structs, floats, booleans, a list column and nulls) reads to the same records as its
//! JSON Lines twin; a Hub dataset directory (`data/train-0000N-of-00002.parquet` in zstd,
//! `data/test-…`) gives its splits' shards, in order, and a format run over them names a bad
//! record by its shard and row. Fixtures: scripts/make_chat_fixtures.py (pyarrow).

use std::path::{Path, PathBuf};

use pipe_data::chat::{ChatLayout, ChatReader};
use pipe_data::format::{
    find_data_files, read_examples, DataFile, Examples, FormatOptions, Formatter, OnError, Source,
    ValSize,
};
use pipe_data::mixture::Take;
use pipe_data::records::read_records;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat")
}

#[test]
fn a_pyarrow_parquet_file_reads_as_its_json_lines_twin() {
    let data = fixtures().join("data");
    let from_parquet = read_records(&data.join("records.parquet")).unwrap();
    let from_jsonl = read_records(&data.join("records.jsonl")).unwrap();
    assert_eq!(from_parquet.len(), 6);
    assert_eq!(from_parquet.len(), from_jsonl.len());
    for (p, j) in from_parquet.iter().zip(&from_jsonl) {
        assert_eq!(p.index, j.index);
        assert_eq!(p.fields, j.fields, "record {}", p.index);
        assert_eq!((p.row, p.line), (Some(p.index), None));
    }
    // A file that is not Parquet is named.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("x.parquet");
    std::fs::write(&bad, b"PAR1 not really").unwrap();
    let e = read_records(&bad).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: cannot read it as Parquet", bad.display())),
        "{e}"
    );
}

fn names(files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_hub_dataset_directory_gives_its_splits() {
    let hub = fixtures().join("hub");
    let train = find_data_files(&hub, None, None).unwrap();
    assert_eq!(
        names(&train),
        [
            "train-00000-of-00002.parquet",
            "train-00001-of-00002.parquet"
        ]
    );
    assert_eq!(
        names(&find_data_files(&hub, None, Some("test")).unwrap()),
        ["test-00000-of-00001.parquet"]
    );
    let e = find_data_files(&hub, None, Some("validation"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "no `validation` split in {} (its splits: train, test)",
            hub.display()
        )
    );
    // Both train shards, read as one list: 3 + 2 conversations.
    let out = tempfile::tempdir().unwrap();
    let source = Source {
        name: "hub".into(),
        files: data_files(&train),
        take: Take::All,
    };
    let reader = Formatter::Chat(
        ChatReader::new(
            ChatLayout::Messages,
            &Default::default(),
            &Default::default(),
        )
        .unwrap(),
    );
    let opts = FormatOptions {
        on_error: OnError::Fail,
        val_size: ValSize::Count(1),
        seed: 1,
        size: None,
    };
    let stats =
        pipe_data::format::run(std::slice::from_ref(&source), &reader, &opts, out.path()).unwrap();
    assert_eq!((stats.records, stats.train, stats.val), (5, 4, 1));
    assert_eq!(stats.files.len(), 2);
    let Examples::Chat(train_convs) = read_examples(&out.path().join("train.jsonl")).unwrap()
    else {
        panic!("conversations expected")
    };
    assert_eq!(train_convs.len(), 4);
    // A bad record is named by its file and its row there.
    let sharegpt = Formatter::Chat(
        ChatReader::new(
            ChatLayout::Messages,
            &[("content".to_string(), "value".to_string())].into(),
            &Default::default(),
        )
        .unwrap(),
    );
    let e = pipe_data::format::run(&[source], &sharegpt, &opts, out.path()).unwrap_err();
    let shown = anyhow_chain(&e);
    assert_eq!(
        shown,
        format!(
            "{}: record 0 (row 0): `messages[0].value` is missing",
            train[0].display()
        )
    );
    // … and in a later file, by its index and line in that file.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let good = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
    std::fs::write(&a, format!("{good}\n{good}\n")).unwrap();
    std::fs::write(
        &b,
        format!("{good}\n{{\"messages\": [{{\"role\": \"bot\", \"content\": \"a\"}}]}}\n"),
    )
    .unwrap();
    let two = Source {
        name: "two".into(),
        files: data_files(&[a, b.clone()]),
        take: Take::All,
    };
    let e = pipe_data::format::run(&[two], &reader, &opts, out.path()).unwrap_err();
    let shown = anyhow_chain(&e);
    assert!(
        shown.starts_with(&format!(
            "{}: record 1 (line 2): `messages[0].role` is `bot`",
            b.display()
        )),
        "{shown}"
    );
}

/// Files read as they are, named by their file names.
fn data_files(paths: &[PathBuf]) -> Vec<DataFile> {
    paths
        .iter()
        .map(|p| DataFile {
            path: p.clone(),
            shown_as: p.clone(),
            name: p.file_name().unwrap().to_string_lossy().into_owned(),
        })
        .collect()
}

/// `error: cause` as anyhow's `{:#}` prints a chain.
fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

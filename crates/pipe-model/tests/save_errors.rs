//! Writing weights onto a full disk is an I/O error that names the file, not a "bad
//! checkpoint".

use pipe_model::save::{write_safetensors, Named, SaveDtype};
use pipe_model::ModelError;

#[test]
fn a_full_disk_is_a_write_error_not_a_bad_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    // The temporary file the weights go to first is /dev/full, where every write fails with
    // ENOSPC, as on a full disk.
    std::os::unix::fs::symlink("/dev/full", dir.path().join("model.safetensors.tmp")).unwrap();
    let tensors = [Named {
        name: "w".into(),
        shape: vec![4, 1024],
        data: vec![0.5; 4096],
    }];
    let err = write_safetensors(&path, &tensors, SaveDtype::F32, &[]).unwrap_err();
    match &err {
        ModelError::Write { path: file, source } => {
            assert_eq!(source.kind(), std::io::ErrorKind::StorageFull);
            assert!(
                file.ends_with("model.safetensors.tmp"),
                "{}",
                file.display()
            );
        }
        other => panic!("expected a write error, got {other:?}"),
    }
    let shown = err.to_string();
    assert!(shown.starts_with("cannot write "), "{shown}");
    assert!(!shown.contains("bad checkpoint"), "{shown}");
    assert!(!path.exists());
}

//! Fetching files: over HTTP(S) with resume (HTTP Range) and retries, from the Hugging Face
//! Hub (`hf://ORG/REPO[@REVISION]`), and from local paths; with checksum verification. And
//! the one way back: pushing a directory to a Hub repository ([`push_folder`]).

mod http;
mod hub;
mod hub_push;
mod source;

pub use http::{host_of, url_file_name, Client, Download, FetchError, Transfer};
pub use hub::{default_model_files, HubFile, HubRepo, RepoKind, SelectError};
pub use hub_push::{push_folder, HubTarget, Pushed};
pub use source::{fetch, FetchOptions, FetchReport, Fetched, Source, SourceError};

use std::io::Read;
use std::path::Path;

use sha2::Digest as _;

/// Why a checksum cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    #[error("`{0}` is not a checksum: write `sha256:HEX` or `blake3:HEX`")]
    NoAlgorithm(String),
    #[error("`{text}`: a {algo} digest is 64 hex digits")]
    BadDigest { text: String, algo: String },
    #[error("unknown checksum algorithm `{0}` (use sha256 or blake3)")]
    UnknownAlgorithm(String),
}

/// An expected digest, written `sha256:HEX` or `blake3:HEX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    Sha256(String),
    Blake3(String),
}

impl Checksum {
    pub fn parse(text: &str) -> Result<Self, ChecksumError> {
        let (algo, hex) = text
            .split_once(':')
            .ok_or_else(|| ChecksumError::NoAlgorithm(text.to_string()))?;
        let hex = hex.trim().to_ascii_lowercase();
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ChecksumError::BadDigest {
                text: text.to_string(),
                algo: algo.to_string(),
            });
        }
        match algo {
            "sha256" => Ok(Checksum::Sha256(hex)),
            "blake3" => Ok(Checksum::Blake3(hex)),
            other => Err(ChecksumError::UnknownAlgorithm(other.to_string())),
        }
    }

    /// Checks the file at `path`, naming both digests on a mismatch.
    pub fn verify(&self, path: &Path, what: &str) -> Result<(), FetchError> {
        let actual = match self {
            Checksum::Sha256(_) => file_sha256(path)?,
            Checksum::Blake3(_) => pipe_core::digest::hash_file(path)?,
        };
        let (algo, expected) = match self {
            Checksum::Sha256(e) => ("sha256", e),
            Checksum::Blake3(e) => ("blake3", e),
        };
        if &actual == expected {
            Ok(())
        } else {
            Err(FetchError::Checksum {
                what: what.to_string(),
                algo,
                expected: expected.clone(),
                actual,
            })
        }
    }
}

impl std::fmt::Display for Checksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Checksum::Sha256(h) => write!(f, "sha256:{h}"),
            Checksum::Blake3(h) => write!(f, "blake3:{h}"),
        }
    }
}

pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_parse_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        std::fs::write(&f, b"abc").unwrap();
        let good = Checksum::parse(
            "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
        )
        .unwrap();
        good.verify(&f, "x").unwrap();
        let bad = Checksum::parse(&format!("blake3:{}", "0".repeat(64))).unwrap();
        let e = bad.verify(&f, "x").unwrap_err().to_string();
        assert!(
            e.contains(&"0".repeat(64)) && e.contains(&blake3::hash(b"abc").to_hex().to_string()),
            "{e}"
        );
        assert!(Checksum::parse("md5:abc").is_err());
        assert!(Checksum::parse("sha256:xyz").is_err());
    }
}

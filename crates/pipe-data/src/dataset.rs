//! The tokenized dataset on disk: one safetensors file per split, read back memory-mapped with
//! no parsing beyond the header.
//!
//! | tensor | dtype | shape | meaning |
//! |---|---|---|---|
//! | `input_ids` | U32 | [tokens] | all examples' ids, back to back |
//! | `labels` | I32 | [tokens] | -100 where the loss ignores the position |
//! | `offsets` | I64 | [examples + 1] | example `i` is `offsets[i]..offsets[i+1]` |
//! | `index` | I64 | [examples] | the example's record index in the source file |
//! | `row_offsets` | I64 | [rows + 1] | packed only: row `r` spans `row_offsets[r]..row_offsets[r+1]` |
//! | `position_ids` | U32 | [tokens] | packed only: positions restart at 0 for each example |
//!
//! Packed rows hold whole examples (first-fit decreasing into `max_len` bins); `offsets` still
//! marks every example's boundary, so training can keep them from attending to each other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::tokenize::Example;

pub const FORMAT: &str = "pipe-dataset-v1";

/// Why a split cannot be written or opened. A variant with a source names only what failed;
/// the source says why (`{:#}` on an `anyhow::Error` prints both).
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A tensor the safetensors crate refuses (shown, not linked: see `Unreadable`).
    #[error("{0}")]
    Tensor(SafeTensorError),
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: WriteError,
    },
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {}", path.display())]
    Map {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not safetensors. The error is shown in the message and not linked as a
    /// source: safetensors' messages already include their own sources, which `{:#}` would
    /// print a second time.
    #[error("{} is not a pipe dataset: {error}", path.display())]
    Unreadable {
        path: PathBuf,
        error: SafeTensorError,
    },
    /// A safetensors file that is not a split: `why` says what is wrong with it.
    #[error("{} is not a pipe dataset: {why}", path.display())]
    NotADataset { path: PathBuf, why: String },
}

/// What failed while writing a split (its path is in [`DatasetError::Write`]).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Shown in the message, not linked as a source: see [`DatasetError::Unreadable`].
    #[error("{0}")]
    Serialize(SafeTensorError),
    #[error(transparent)]
    Header(serde_json::Error),
    #[error("safetensors header grew when sorted")]
    HeaderGrew,
    #[error(transparent)]
    Io(std::io::Error),
}

/// Packs lengths into bins of `capacity` with first-fit decreasing; returns the bins' members
/// (indices into `lengths`), each bin in decreasing length order.
pub fn pack(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    // A max-segment-tree over the remaining room of (potential) bins finds the leftmost bin
    // with enough room in O(log n).
    let n = lengths.len().max(1).next_power_of_two();
    let mut tree = vec![capacity; 2 * n];
    let mut bins: Vec<Vec<usize>> = Vec::new();
    for i in order {
        let len = lengths[i].min(capacity);
        let mut node = 1;
        while node < n {
            node = if tree[2 * node] >= len {
                2 * node
            } else {
                2 * node + 1
            };
        }
        let bin = node - n;
        if bin == bins.len() {
            bins.push(Vec::new());
        }
        bins[bin].push(i);
        tree[node] -= len;
        let mut up = node / 2;
        while up >= 1 {
            tree[up] = tree[2 * up].max(tree[2 * up + 1]);
            up /= 2;
        }
    }
    bins
}

fn view(
    dtype: Dtype,
    data: &[u8],
    n: usize,
) -> Result<safetensors::tensor::TensorView<'_>, DatasetError> {
    safetensors::tensor::TensorView::new(dtype, vec![n], data).map_err(DatasetError::Tensor)
}

fn bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: u32/i32/i64 have no padding and any bit pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Writes a split; with `pack_to`, examples are packed into rows of at most that many tokens.
pub fn write(
    path: &Path,
    examples: &[Example],
    pack_to: Option<usize>,
    meta: HashMap<String, String>,
) -> Result<(), DatasetError> {
    let order: Vec<usize>;
    let mut row_offsets: Vec<i64> = Vec::new();
    if let Some(cap) = pack_to {
        let lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
        let bins = pack(&lengths, cap);
        let mut o = Vec::with_capacity(examples.len());
        row_offsets.push(0);
        let mut at = 0i64;
        for bin in bins {
            for i in bin {
                at += lengths[i] as i64;
                o.push(i);
            }
            row_offsets.push(at);
        }
        order = o;
    } else {
        order = (0..examples.len()).collect();
    }
    let total: usize = examples.iter().map(|e| e.input_ids.len()).sum();
    let mut input_ids = Vec::with_capacity(total);
    let mut labels = Vec::with_capacity(total);
    let mut position_ids: Vec<u32> = Vec::new();
    let mut offsets = Vec::with_capacity(examples.len() + 1);
    let mut index = Vec::with_capacity(examples.len());
    offsets.push(0i64);
    for &i in &order {
        let e = &examples[i];
        input_ids.extend_from_slice(&e.input_ids);
        labels.extend_from_slice(&e.labels);
        if pack_to.is_some() {
            position_ids.extend(0..e.input_ids.len() as u32);
        }
        offsets.push(input_ids.len() as i64);
        index.push(e.index as i64);
    }
    let mut tensors = vec![
        (
            "input_ids".to_string(),
            view(Dtype::U32, bytes(&input_ids), input_ids.len())?,
        ),
        (
            "labels".to_string(),
            view(Dtype::I32, bytes(&labels), labels.len())?,
        ),
        (
            "offsets".to_string(),
            view(Dtype::I64, bytes(&offsets), offsets.len())?,
        ),
        (
            "index".to_string(),
            view(Dtype::I64, bytes(&index), index.len())?,
        ),
    ];
    if pack_to.is_some() {
        tensors.push((
            "row_offsets".to_string(),
            view(Dtype::I64, bytes(&row_offsets), row_offsets.len())?,
        ));
        tensors.push((
            "position_ids".to_string(),
            view(Dtype::U32, bytes(&position_ids), position_ids.len())?,
        ));
    }
    let mut meta = meta;
    meta.insert("format".into(), FORMAT.into());
    meta.insert("packed".into(), pack_to.is_some().to_string());
    serialize_sorted(tensors, meta, path).map_err(|source| DatasetError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a safetensors file whose bytes depend only on its contents. The crate writes its
/// metadata map in hash order, which differs from run to run and would change the file's
/// digest (and every downstream cache key); the header is rewritten with its keys sorted.
fn serialize_sorted(
    tensors: Vec<(String, TensorView<'_>)>,
    meta: HashMap<String, String>,
    path: &Path,
) -> Result<(), WriteError> {
    let bytes =
        safetensors::tensor::serialize(tensors, Some(meta)).map_err(WriteError::Serialize)?;
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(WriteError::Header)?;
    // serde_json's map is ordered, so re-serialising sorts every object's keys.
    let mut sorted = serde_json::to_vec(&header).map_err(WriteError::Header)?;
    // Pad to the same length (safetensors aligns the data start), with spaces as it does.
    if sorted.len() > n {
        return Err(WriteError::HeaderGrew);
    }
    sorted.resize(n, b' ');
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..8]);
    out.extend_from_slice(&sorted);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).map_err(WriteError::Io)
}

/// A split, memory-mapped.
pub struct Dataset {
    mmap: Mmap,
    ranges: HashMap<String, (usize, usize)>,
    pub metadata: HashMap<String, String>,
    offsets: Vec<i64>,
    row_offsets: Option<Vec<i64>>,
}

impl Dataset {
    pub fn open(path: &Path) -> Result<Self, DatasetError> {
        let file = std::fs::File::open(path).map_err(|source| DatasetError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: store files are read-only once committed; the map lives as long as `Dataset`.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| DatasetError::Map {
            path: path.to_path_buf(),
            source,
        })?;
        let unreadable = |error| DatasetError::Unreadable {
            path: path.to_path_buf(),
            error,
        };
        let bad = |why: String| DatasetError::NotADataset {
            path: path.to_path_buf(),
            why,
        };
        let (_, header) = SafeTensors::read_metadata(&mmap).map_err(unreadable)?;
        let metadata = header.metadata().clone().unwrap_or_default();
        if metadata.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!("its format is not {FORMAT}")));
        }
        let st = SafeTensors::deserialize(&mmap).map_err(unreadable)?;
        let base = mmap.as_ptr() as usize;
        let mut ranges = HashMap::new();
        for (name, view) in st.tensors() {
            let expected = match name.as_str() {
                "input_ids" | "position_ids" => Dtype::U32,
                "labels" => Dtype::I32,
                _ => Dtype::I64,
            };
            if view.dtype() != expected {
                return Err(bad(format!(
                    "`{name}` is {:?}, expected {expected:?}",
                    view.dtype()
                )));
            }
            let start = view.data().as_ptr() as usize - base;
            ranges.insert(name, (start, start + view.data().len()));
        }
        for need in ["input_ids", "labels", "offsets", "index"] {
            if !ranges.contains_key(need) {
                return Err(bad(format!("no `{need}` tensor")));
            }
        }
        let mut ds = Dataset {
            mmap,
            ranges,
            metadata,
            offsets: Vec::new(),
            row_offsets: None,
        };
        ds.offsets = ds.read::<i64>("offsets");
        ds.row_offsets = ds
            .ranges
            .contains_key("row_offsets")
            .then(|| ds.read::<i64>("row_offsets"));
        let tokens = ds.tokens();
        let ok = ds.offsets.first() == Some(&0)
            && ds.offsets.windows(2).all(|w| w[0] <= w[1])
            && ds.offsets.last().is_some_and(|&l| l as usize == tokens)
            && ds.read::<i32>("labels").len() == tokens;
        if !ok {
            return Err(bad("its offsets do not match its tokens".into()));
        }
        Ok(ds)
    }

    fn read<T: Copy + Default>(&self, name: &str) -> Vec<T> {
        let (a, b) = self.ranges[name];
        let raw = &self.mmap[a..b];
        let n = raw.len() / std::mem::size_of::<T>();
        let mut out = vec![T::default(); n];
        // SAFETY: `out` has room for exactly `raw.len()` bytes; T is a plain integer type.
        unsafe {
            std::ptr::copy_nonoverlapping(raw.as_ptr(), out.as_mut_ptr() as *mut u8, raw.len())
        };
        out
    }

    fn slice<T>(&self, name: &str) -> &[T] {
        let (a, b) = self.ranges[name];
        let raw = &self.mmap[a..b];
        // SAFETY: integers of any bit pattern are valid; alignment is checked by align_to.
        let (pre, mid, post) = unsafe { raw.align_to::<T>() };
        assert!(
            pre.is_empty() && post.is_empty(),
            "safetensors data is aligned to its dtype"
        );
        mid
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn tokens(&self) -> usize {
        self.slice::<u32>("input_ids").len()
    }
    pub fn packed(&self) -> bool {
        self.row_offsets.is_some()
    }
    /// Tokens in the longest unit training draws batches from: a packed row, or an example.
    pub fn longest_unit(&self) -> usize {
        let bounds = self.rows().unwrap_or(&self.offsets);
        let longest = bounds.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        usize::try_from(longest).unwrap_or(usize::MAX)
    }

    /// Example `i`: its ids and labels (zero-copy).
    pub fn example(&self, i: usize) -> (&[u32], &[i32]) {
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        (
            &self.slice::<u32>("input_ids")[a..b],
            &self.slice::<i32>("labels")[a..b],
        )
    }

    /// Every example's ids, back to back (packed rows index into this).
    pub fn all_input_ids(&self) -> &[u32] {
        self.slice::<u32>("input_ids")
    }

    /// Every example's labels, back to back.
    pub fn all_labels(&self) -> &[i32] {
        self.slice::<i32>("labels")
    }

    /// The record index example `i` came from.
    pub fn source_index(&self, i: usize) -> usize {
        self.slice::<i64>("index")[i] as usize
    }

    /// Packed rows: token ranges of whole examples.
    pub fn rows(&self) -> Option<&[i64]> {
        self.row_offsets.as_deref()
    }

    pub fn position_ids(&self) -> Option<&[u32]> {
        self.ranges
            .contains_key("position_ids")
            .then(|| self.slice::<u32>("position_ids"))
    }

    pub fn offsets(&self) -> &[i64] {
        &self.offsets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(index: usize, len: usize) -> Example {
        Example {
            index,
            input_ids: (0..len as u32).map(|i| i + 10 * index as u32).collect(),
            labels: (0..len as i32)
                .map(|i| if i < 2 { -100 } else { i })
                .collect(),
            truncated: false,
        }
    }

    #[test]
    fn first_fit_decreasing_fills_bins() {
        let bins = pack(&[5, 3, 8, 2, 6, 4], 10);
        // 8+2, 6+4, 5+3.
        assert_eq!(bins, vec![vec![2, 3], vec![4, 5], vec![0, 1]]);
        for b in &bins {
            assert!(b.iter().map(|&i| [5, 3, 8, 2, 6, 4][i]).sum::<usize>() <= 10);
        }
    }

    #[test]
    fn write_and_read_back_plain_and_packed() {
        let dir = tempfile::tempdir().unwrap();
        let examples: Vec<Example> = (0..5).map(|i| ex(i, 3 + i)).collect();
        let p = dir.path().join("train.safetensors");
        write(&p, &examples, None, HashMap::new()).unwrap();
        let d = Dataset::open(&p).unwrap();
        assert_eq!((d.len(), d.tokens(), d.packed()), (5, 25, false));
        let (ids, labels) = d.example(2);
        assert_eq!(ids, &examples[2].input_ids[..]);
        assert_eq!(labels, &examples[2].labels[..]);
        assert_eq!(d.source_index(4), 4);

        let p = dir.path().join("packed.safetensors");
        write(&p, &examples, Some(8), HashMap::new()).unwrap();
        let d = Dataset::open(&p).unwrap();
        let rows = d.rows().unwrap();
        assert!(rows.windows(2).all(|w| w[1] - w[0] <= 8), "{rows:?}");
        assert_eq!(*rows.last().unwrap() as usize, d.tokens());
        let pos = d.position_ids().unwrap();
        for i in 0..d.len() {
            let (ids, _) = d.example(i);
            let start = d.offsets()[i] as usize;
            assert_eq!(
                &pos[start..start + ids.len()],
                &(0..ids.len() as u32).collect::<Vec<_>>()[..]
            );
            assert_eq!(ids, &examples[d.source_index(i)].input_ids[..]);
        }
    }

    #[test]
    fn files_are_byte_identical_run_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let examples: Vec<Example> = (0..3).map(|i| ex(i, 4)).collect();
        let meta: HashMap<String, String> =
            (0..8).map(|i| (format!("k{i}"), i.to_string())).collect();
        let mut seen = std::collections::BTreeSet::new();
        for n in 0..8 {
            // A fresh HashMap each time: its iteration order varies.
            let m: HashMap<String, String> =
                meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let p = dir.path().join(format!("{n}.safetensors"));
            write(&p, &examples, None, m).unwrap();
            seen.insert(std::fs::read(&p).unwrap());
            assert_eq!(
                Dataset::open(&p)
                    .unwrap()
                    .metadata
                    .get("k3")
                    .map(String::as_str),
                Some("3")
            );
        }
        assert_eq!(seen.len(), 1);
    }

    #[test]
    fn other_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        std::fs::write(&p, b"garbage").unwrap();
        let e = Dataset::open(&p).err().unwrap().to_string();
        assert!(e.contains("not a pipe dataset"), "{e}");
    }
}

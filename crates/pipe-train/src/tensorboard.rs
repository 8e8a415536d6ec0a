//! TensorBoard event files, written as training goes: loss, learning rate, gradient norm and
//! tokens/s per step, readable by `tensorboard --logdir`.
//!
//! The format is TensorFlow's: a file of TFRecords (length, masked CRC-32C of the length,
//! payload, masked CRC-32C of the payload), each payload an `Event` protocol buffer — the
//! first one naming the file version, then one `Summary` of scalar values per step. A resumed
//! run starts a new file with a `SessionLog START` at the first step it logs, which tells
//! TensorBoard to drop what an interrupted attempt logged from that step on (after its last
//! checkpoint).
//!
//! The files are not a stage's outputs: they hold wall times and speed, and a stage's outputs
//! may depend only on what it computed. They go beside its logs (`logs/<key>/tensorboard/`).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// One event file, appended to as training goes.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created if needed), named as TensorBoard looks for them and
    /// in the order of their creation (TensorBoard reads a directory's files by name); an
    /// existing file is never written over.
    pub fn create(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = wall_time();
        let (path, file) = loop {
            let since = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let path = dir.join(format!(
                "events.out.tfevents.{}.{:09}.pipe.{}",
                since.as_secs(),
                since.subsec_nanos(),
                std::process::id()
            ));
            match File::options().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let mut writer = EventWriter {
            file: BufWriter::new(file),
            path,
        };
        writer.record(&event(now, 0, Payload::FileVersion("brain.Event:2")))?;
        writer.file.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks a (re)start whose first step is `step`: TensorBoard drops what earlier files
    /// logged at or after it.
    pub fn start_at(&mut self, step: u64) -> io::Result<()> {
        self.record(&event(wall_time(), step, Payload::SessionStart))?;
        self.file.flush()
    }

    /// The scalar values of one step, written through to the file so that a live TensorBoard
    /// sees them.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> io::Result<()> {
        self.record(&event(wall_time(), step, Payload::Scalars(values)))?;
        self.file.flush()
    }

    fn record(&mut self, payload: &[u8]) -> io::Result<()> {
        let len = (payload.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes())?;
        self.file.write_all(payload)?;
        self.file.write_all(&masked_crc(payload).to_le_bytes())
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// TFRecord's checksum: CRC-32C, rotated and offset so that a CRC of CRCs stays distinct.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

enum Payload<'a> {
    FileVersion(&'a str),
    SessionStart,
    Scalars(&'a [(&'a str, f64)]),
}

/// An `Event` message: `wall_time` (1, double), `step` (2, int64), and one of `file_version`
/// (3, string), `summary` (5, Summary), `session_log` (7, SessionLog).
fn event(wall_time: f64, step: u64, payload: Payload<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(1 << 3 | 1);
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(2 << 3);
    varint(step, &mut out);
    match payload {
        Payload::FileVersion(v) => bytes_field(3, v.as_bytes(), &mut out),
        // SessionLog { status (1) = START (1) }
        Payload::SessionStart => bytes_field(7, &[1 << 3, 1], &mut out),
        Payload::Scalars(values) => {
            // Summary { repeated Value value (1) }; Value { tag (1), simple_value (2, float) }
            let mut summary = Vec::new();
            for (tag, value) in values {
                let mut v = Vec::new();
                bytes_field(1, tag.as_bytes(), &mut v);
                v.push(2 << 3 | 5);
                v.extend_from_slice(&(*value as f32).to_le_bytes());
                bytes_field(1, &v, &mut summary);
            }
            bytes_field(5, &summary, &mut out);
        }
    }
    out
}

fn bytes_field(field: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(field << 3 | 2);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnolis_and_masked_as_tensorflow_does() {
        // The check value of CRC-32C.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // TensorFlow's masked CRC of an empty string (crc 0): 0 rotated is 0, plus the delta.
        assert_eq!(masked_crc(b""), 0xa282_ead8);
    }

    #[test]
    fn varints_and_fields_are_protobufs() {
        let mut v = Vec::new();
        varint(300, &mut v);
        assert_eq!(v, [0xac, 0x02]);
        let e = event(1.5, 7, Payload::Scalars(&[("loss", 0.25)]));
        let mut expected = vec![0x09];
        expected.extend_from_slice(&1.5f64.to_le_bytes());
        expected.extend_from_slice(&[0x10, 7, 0x2a, 13, 0x0a, 11, 0x0a, 4]);
        expected.extend_from_slice(b"loss");
        expected.push(0x15);
        expected.extend_from_slice(&0.25f32.to_le_bytes());
        assert_eq!(e, expected);
    }

    #[test]
    fn records_are_framed_with_their_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(1, &[("loss", 2.0), ("lr", 1e-3)]).unwrap();
        w.start_at(1).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut at = 0;
        let mut records = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(len_bytes));
            let payload = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(payload));
            at += 16 + len;
            records += 1;
        }
        assert_eq!(records, 3);
        assert!(w
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("events.out.tfevents."));
    }
}

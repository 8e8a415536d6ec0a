//! What a stage needs of the machine (`resources:`), what the machine offers, and the local
//! executor's ledger of what running stages hold.
//!
//! The rules of the local executor: two stages that need the same GPU never run at once (a
//! GPU count is served by free GPUs, whose indices a `command` stage gets as
//! `CUDA_VISIBLE_DEVICES`); the declared CPUs and memory of running stages never add up to more
//! than the machine offers, except that a stage that declares more than the whole machine
//! still runs, alone among the stages that declare any. Stages that declare nothing take
//! nothing. Resources are run settings: never part of a key.

use std::collections::BTreeSet;
use std::fmt;

use serde_yaml::Value;

use crate::diag::{FieldError, FieldPath, Target};

/// GPUs a stage needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gpus {
    /// Any this many free GPUs.
    Count(usize),
    /// These GPUs (CUDA ordinals, as in `cuda:N`).
    Devices(BTreeSet<usize>),
}

/// A stage's `resources:` (or what its kind infers, e.g. a train stage's `device: cuda:1`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub gpus: Option<Gpus>,
    pub cpus: Option<usize>,
    /// Bytes.
    pub memory: Option<u64>,
}

impl Resources {
    /// True when it asks for nothing.
    pub fn is_empty(&self) -> bool {
        self.gpus.is_none() && self.cpus.is_none() && self.memory.is_none()
    }

    /// `declared` where it says something, else what the kind `inferred`.
    pub fn or(declared: Resources, inferred: Resources) -> Resources {
        Resources {
            gpus: declared.gpus.or(inferred.gpus),
            cpus: declared.cpus.or(inferred.cpus),
            memory: declared.memory.or(inferred.memory),
        }
    }

    /// Reads `resources: {gpus: N | [i, …], cpus: N, memory: 16GiB}` at `path`.
    pub fn parse(value: &Value, path: &FieldPath) -> Result<Resources, FieldError> {
        let Value::Mapping(map) = value else {
            return Err(FieldError::new(
                path.clone(),
                Target::Value,
                "`resources` must be a mapping: {gpus: N or [i, …], cpus: N, memory: SIZE}",
            ));
        };
        let mut r = Resources::default();
        for (k, v) in map {
            let name = k.as_str().unwrap_or_default();
            let at = path.key(name);
            match name {
                "gpus" => {
                    r.gpus = Some(match v {
                        Value::Sequence(items) => Gpus::Devices(
                            items
                                .iter()
                                .map(|i| count(i, &at, "a GPU index"))
                                .collect::<Result<_, _>>()?,
                        ),
                        _ => Gpus::Count(count(v, &at, "a number of GPUs or a list of indices")?),
                    })
                }
                "cpus" => {
                    let n = count(v, &at, "a number of CPUs")?;
                    if n == 0 {
                        return Err(FieldError::new(
                            at,
                            Target::Value,
                            "`cpus` must be at least 1",
                        ));
                    }
                    r.cpus = Some(n);
                }
                "memory" => {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        _ => String::new(),
                    };
                    r.memory = Some(parse_size(&text).ok_or_else(|| {
                        FieldError::new(at, Target::Value, format!("`{text}` is not a size"))
                            .with_help("write it as bytes with a unit: 512MB, 16GiB, 1.5TB")
                    })?);
                }
                _ => {
                    return Err(FieldError::new(
                        at,
                        Target::Key,
                        format!("unknown field `{name}` in `resources`"),
                    )
                    .with_help("expected `gpus`, `cpus` or `memory`"))
                }
            }
        }
        Ok(r)
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        match &self.gpus {
            Some(Gpus::Count(n)) => {
                parts.push(format!("{n} GPU{}", if *n == 1 { "" } else { "s" }))
            }
            Some(Gpus::Devices(d)) => parts.push(format!("GPU {}", list(d))),
            None => {}
        }
        if let Some(c) = self.cpus {
            parts.push(format!("{c} CPU{}", if c == 1 { "" } else { "s" }));
        }
        if let Some(m) = self.memory {
            parts.push(format!("{:.1} GiB", m as f64 / (1u64 << 30) as f64));
        }
        f.write_str(&parts.join(", "))
    }
}

fn list(d: &BTreeSet<usize>) -> String {
    d.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn count(v: &Value, at: &FieldPath, what: &str) -> Result<usize, FieldError> {
    v.as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| FieldError::new(at.clone(), Target::Value, format!("expected {what}")))
}

/// `16GiB`, `512MB`, `1.5TB`, `1024` (bytes): the number of bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "tb" | "t" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    (number.is_finite() && number >= 0.0).then_some((number * scale as f64) as u64)
}

/// What this machine offers the stages that declare resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub cpus: usize,
    pub memory: u64,
    /// GPU ordinals (`cuda:N`).
    pub gpus: Vec<usize>,
}

impl Machine {
    /// The cores pipe may use, the RAM, and the GPUs the NVIDIA driver lists (as many as
    /// `CUDA_VISIBLE_DEVICES` names, when it is set).
    pub fn detect() -> Machine {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kb| kb * 1024)
            .unwrap_or(u64::MAX);
        let gpus = match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(v) => v.split(',').filter(|s| !s.trim().is_empty()).count(),
            Err(_) => std::fs::read_dir("/proc/driver/nvidia/gpus")
                .map(|d| d.count())
                .unwrap_or(0),
        };
        Machine {
            cpus,
            memory,
            gpus: (0..gpus).collect(),
        }
    }

    /// The physical ids to give a child process as `CUDA_VISIBLE_DEVICES` for these ordinals
    /// (ordinals are positions in the parent's own `CUDA_VISIBLE_DEVICES`, when it is set).
    pub fn visible_devices(granted: &[usize]) -> String {
        let parent: Option<Vec<String>> = std::env::var("CUDA_VISIBLE_DEVICES")
            .ok()
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
        granted
            .iter()
            .map(|&i| match &parent {
                Some(ids) => ids.get(i).cloned().unwrap_or_else(|| i.to_string()),
                None => i.to_string(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What one running stage holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// GPU ordinals.
    pub gpus: Vec<usize>,
    pub cpus: usize,
    pub memory: u64,
}

/// What the running stages hold of a machine.
#[derive(Debug)]
pub struct Ledger {
    machine: Machine,
    gpus: BTreeSet<usize>,
    cpus: usize,
    memory: u64,
    /// Running stages that declared CPUs or memory.
    holders: usize,
}

impl Ledger {
    pub fn new(machine: Machine) -> Self {
        Ledger {
            machine,
            gpus: BTreeSet::new(),
            cpus: 0,
            memory: 0,
            holders: 0,
        }
    }

    /// Takes what `need` asks for if it is free now (`Ok(None)`: wait for a stage to end), or
    /// says why it never can be on this machine.
    pub fn take(&mut self, need: &Resources) -> Result<Option<Grant>, String> {
        let gpus: Vec<usize> = match &need.gpus {
            None => Vec::new(),
            Some(Gpus::Devices(d)) => {
                if d.iter().any(|g| self.gpus.contains(g)) {
                    return Ok(None);
                }
                d.iter().copied().collect()
            }
            Some(Gpus::Count(n)) => {
                if *n > self.machine.gpus.len() {
                    return Err(format!(
                        "it needs {n} GPU{}, and this machine offers {} (set them with --gpus, or run it where they are)",
                        if *n == 1 { "" } else { "s" },
                        self.machine.gpus.len()
                    ));
                }
                let free: Vec<usize> = self
                    .machine
                    .gpus
                    .iter()
                    .copied()
                    .filter(|g| !self.gpus.contains(g))
                    .take(*n)
                    .collect();
                if free.len() < *n {
                    return Ok(None);
                }
                free
            }
        };
        let cpus = need.cpus.unwrap_or(0);
        let memory = need.memory.unwrap_or(0);
        let declares = cpus > 0 || memory > 0;
        let fits = self.cpus + cpus <= self.machine.cpus
            && self.memory.saturating_add(memory) <= self.machine.memory;
        if declares && !fits && self.holders > 0 {
            return Ok(None);
        }
        self.gpus.extend(&gpus);
        self.cpus += cpus;
        self.memory = self.memory.saturating_add(memory);
        self.holders += usize::from(declares);
        Ok(Some(Grant { gpus, cpus, memory }))
    }

    /// Gives back what a stage that ended held.
    pub fn give_back(&mut self, grant: &Grant) {
        for g in &grant.gpus {
            self.gpus.remove(g);
        }
        self.cpus -= grant.cpus;
        self.memory -= grant.memory;
        self.holders -= usize::from(grant.cpus > 0 || grant.memory > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(cpus: usize, gpus: usize) -> Machine {
        Machine {
            cpus,
            memory: 16 << 30,
            gpus: (0..gpus).collect(),
        }
    }

    fn parse(yaml: &str) -> Result<Resources, FieldError> {
        let v: Value = serde_yaml::from_str(yaml).unwrap();
        Resources::parse(&v, &FieldPath::root().key("resources"))
    }

    #[test]
    fn resources_are_read_and_mistakes_named() {
        let r = parse("{gpus: [0, 2], cpus: 4, memory: 16GiB}").unwrap();
        assert_eq!(r.gpus, Some(Gpus::Devices([0, 2].into())));
        assert_eq!((r.cpus, r.memory), (Some(4), Some(16 << 30)));
        assert_eq!(parse("{gpus: 2}").unwrap().gpus, Some(Gpus::Count(2)));
        assert_eq!(parse("{memory: 512MB}").unwrap().memory, Some(512_000_000));
        assert!(parse("{gpu: 1}")
            .unwrap_err()
            .message
            .contains("unknown field `gpu`"));
        assert!(parse("{cpus: 0}")
            .unwrap_err()
            .message
            .contains("at least 1"));
        assert!(parse("{memory: lots}")
            .unwrap_err()
            .message
            .contains("not a size"));
        assert!(parse("{gpus: [a]}")
            .unwrap_err()
            .message
            .contains("GPU index"));
    }

    #[test]
    fn one_gpu_is_never_held_twice() {
        let mut l = Ledger::new(machine(8, 2));
        let zero = Resources {
            gpus: Some(Gpus::Devices([0].into())),
            ..Default::default()
        };
        let g = l.take(&zero).unwrap().unwrap();
        assert_eq!(l.take(&zero).unwrap(), None);
        let any = Resources {
            gpus: Some(Gpus::Count(1)),
            ..Default::default()
        };
        assert_eq!(l.take(&any).unwrap().unwrap().gpus, vec![1]);
        assert_eq!(l.take(&any).unwrap(), None);
        l.give_back(&g);
        assert_eq!(l.take(&zero).unwrap().unwrap().gpus, vec![0]);
        let three = Resources {
            gpus: Some(Gpus::Count(3)),
            ..Default::default()
        };
        assert!(l.take(&three).unwrap_err().contains("offers 2"));
    }

    #[test]
    fn declared_cpus_never_add_up_to_more_than_the_machine() {
        let mut l = Ledger::new(machine(4, 0));
        let cpus = |n| Resources {
            cpus: Some(n),
            ..Default::default()
        };
        let a = l.take(&cpus(3)).unwrap().unwrap();
        assert_eq!(l.take(&cpus(2)).unwrap(), None);
        let c = l.take(&cpus(1)).unwrap().unwrap();
        // Stages that declare nothing are not held back.
        assert!(l.take(&Resources::default()).unwrap().is_some());
        l.give_back(&a);
        l.give_back(&c);
        // More than the machine: it runs, alone.
        let big = l.take(&cpus(16)).unwrap().unwrap();
        assert_eq!(l.take(&cpus(1)).unwrap(), None);
        l.give_back(&big);
        assert!(l.take(&cpus(1)).unwrap().is_some());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_size("2 GB"), Some(2_000_000_000));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("1XB"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn visible_devices_are_the_ordinals_without_a_parent_list() {
        if std::env::var("CUDA_VISIBLE_DEVICES").is_err() {
            assert_eq!(Machine::visible_devices(&[0, 2]), "0,2");
        }
    }
}

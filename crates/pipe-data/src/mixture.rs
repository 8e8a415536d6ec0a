//! Mixtures: several sources drawn into one dataset by weight or by count, seeded.
//!
//! - **Counts** (`count: 500`): that many examples of the source; fewer than it has are a
//!   seeded sample without repetition, more repeat it whole (each pass in a new seeded order)
//!   and sample the rest.
//! - **Weights** (`weight: 0.7`, on every source): the mixture's shares. It is as large as it
//!   can be without repeating any source — the source that is scarcest for its weight is used
//!   whole — unless `size` says how many examples it holds (then sources may repeat).
//! - **Neither**: every example of the source, once.
//!
//! Each source's draw uses its own stream of the seed (seed, source position), so adding a
//! source leaves the others' draws as they were.

use pipe_rand::SplitMix64;
use serde::{Deserialize, Serialize};

/// How much of a source goes into the mixture.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Take {
    All,
    Count(u64),
    Weight(f64),
}

/// Why a mixture cannot be drawn.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MixError {
    #[error("source {source_index} has a weight but source {other} has none: give every source a `weight`, or use `count`s")]
    SomeWeights { source_index: usize, other: usize },
    #[error("source {0}: `weight` must be a positive number")]
    BadWeight(usize),
    #[error("source {0}: it has no examples to draw {1} from")]
    Empty(usize, u64),
}

/// What a source gave to the mixture; recorded in the format stage's stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceStats {
    pub name: String,
    /// Examples the source holds (after skipped records).
    pub examples: usize,
    /// Examples drawn into the mixture (repeats counted).
    pub taken: usize,
    /// How many of `taken` are repeats.
    pub repeated: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The files it was read from.
    pub files: Vec<String>,
}

/// The seed of source `i`'s draws.
pub fn source_seed(seed: u64, i: usize) -> u64 {
    let mut r = SplitMix64::new(seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.next_u64()
}

/// For sources of `lens` examples, the positions drawn from each (with repeats, in draw order).
/// `size`: the mixture's size, for weights.
pub fn draw(
    lens: &[usize],
    takes: &[Take],
    size: Option<u64>,
    seed: u64,
) -> Result<Vec<Vec<usize>>, MixError> {
    let weighted: Vec<usize> = (0..takes.len())
        .filter(|&i| matches!(takes[i], Take::Weight(_)))
        .collect();
    if let (Some(&w), Some(other)) = (
        weighted.first(),
        (0..takes.len()).find(|i| !matches!(takes[*i], Take::Weight(_))),
    ) {
        return Err(MixError::SomeWeights {
            source_index: w,
            other,
        });
    }
    let counts: Vec<u64> = if weighted.is_empty() {
        takes
            .iter()
            .zip(lens)
            .map(|(t, &n)| match *t {
                Take::Count(c) => c,
                _ => n as u64,
            })
            .collect()
    } else {
        let weights: Vec<f64> = takes
            .iter()
            .map(|t| match *t {
                Take::Weight(w) => w,
                _ => 0.0,
            })
            .collect();
        if let Some(i) = weights.iter().position(|w| !(w.is_finite() && *w > 0.0)) {
            return Err(MixError::BadWeight(i));
        }
        let total: f64 = weights.iter().sum();
        let shares: Vec<f64> = weights.iter().map(|w| w / total).collect();
        let n = match size {
            Some(s) => s as f64,
            None => lens
                .iter()
                .zip(&shares)
                .map(|(&len, s)| len as f64 / s)
                .fold(f64::INFINITY, f64::min),
        };
        shares
            .iter()
            .zip(lens)
            .map(|(s, &len)| {
                let c = (s * n).round() as u64;
                if size.is_none() {
                    c.min(len as u64)
                } else {
                    c
                }
            })
            .collect()
    };
    counts
        .iter()
        .zip(lens)
        .enumerate()
        .map(|(i, (&count, &len))| {
            if len == 0 {
                return if count == 0 {
                    Ok(Vec::new())
                } else {
                    Err(MixError::Empty(i, count))
                };
            }
            let mut rng_seed = source_seed(seed, i);
            let mut out = Vec::with_capacity(count as usize);
            while (out.len() as u64) < count {
                let mut order: Vec<usize> = (0..len).collect();
                crate::format::shuffle(&mut order, rng_seed);
                rng_seed = SplitMix64::new(rng_seed).next_u64();
                let need = (count - out.len() as u64).min(len as u64) as usize;
                out.extend_from_slice(&order[..need]);
            }
            Ok(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sample_or_repeat_and_are_seeded() {
        let d = draw(&[10, 3], &[Take::Count(4), Take::Count(7)], None, 1).unwrap();
        assert_eq!((d[0].len(), d[1].len()), (4, 7));
        // Without repetition while it can: 4 distinct of 10.
        let mut a = d[0].clone();
        a.sort();
        a.dedup();
        assert_eq!(a.len(), 4);
        // 7 of 3: two whole passes and one more.
        for k in 0..3 {
            assert!(d[1].iter().filter(|&&x| x == k).count() >= 2);
        }
        assert_eq!(
            d,
            draw(&[10, 3], &[Take::Count(4), Take::Count(7)], None, 1).unwrap()
        );
        assert_ne!(
            d,
            draw(&[10, 3], &[Take::Count(4), Take::Count(7)], None, 2).unwrap()
        );
        // Another source added after leaves the first one's draw as it was.
        let more = draw(
            &[10, 3, 5],
            &[Take::Count(4), Take::Count(7), Take::All],
            None,
            1,
        )
        .unwrap();
        assert_eq!(more[0], d[0]);
        assert_eq!(more[2].len(), 5);
    }

    #[test]
    fn weights_use_the_scarcest_source_whole() {
        // 0.7 / 0.3 of sources of 100 and 10: the second limits, 10 / 0.3 = 33.3 examples.
        let d = draw(&[100, 10], &[Take::Weight(0.7), Take::Weight(0.3)], None, 0).unwrap();
        assert_eq!((d[0].len(), d[1].len()), (23, 10));
        let sized = draw(
            &[100, 10],
            &[Take::Weight(7.0), Take::Weight(3.0)],
            Some(100),
            0,
        )
        .unwrap();
        assert_eq!((sized[0].len(), sized[1].len()), (70, 30));
        assert_eq!(
            draw(&[1, 1], &[Take::Weight(1.0), Take::All], None, 0).unwrap_err().to_string(),
            "source 0 has a weight but source 1 has none: give every source a `weight`, or use `count`s"
        );
        assert!(draw(&[1, 1], &[Take::Weight(0.0), Take::Weight(1.0)], None, 0).is_err());
        assert!(draw(&[0], &[Take::Count(2)], None, 0).is_err());
    }
}

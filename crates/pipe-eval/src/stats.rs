//! Means with standard errors, as lm-evaluation-harness reports them.

use serde::Serialize;

/// A metric over items: its mean and the standard error of that mean.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub value: f64,
    /// Sample standard deviation (n − 1) / √n; `None` for fewer than two items.
    pub stderr: Option<f64>,
}

pub fn mean_and_stderr(xs: &[f64]) -> Estimate {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return Estimate {
            value: f64::NAN,
            stderr: None,
        };
    }
    let mean = xs.iter().sum::<f64>() / n;
    let stderr = (xs.len() > 1).then(|| {
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (var / n).sqrt()
    });
    Estimate {
        value: mean,
        stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_of_a_proportion() {
        // 3 of 4 right: mean 0.75, sample sd √(0.25) = 0.5, stderr 0.25.
        let e = mean_and_stderr(&[1.0, 1.0, 0.0, 1.0]);
        assert_eq!(e.value, 0.75);
        assert!((e.stderr.unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(mean_and_stderr(&[1.0]).stderr, None);
    }
}

//! Shared by carve's benchmarks.

/// Median of `runs` samples (seconds, or whatever unit `sample` returns).
pub fn median(runs: usize, mut sample: impl FnMut() -> f64) -> f64 {
    let mut samples: Vec<f64> = (0..runs).map(|_| sample()).collect();
    samples.sort_by(f64::total_cmp);
    samples[runs / 2]
}

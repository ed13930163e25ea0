//! Shared by carve's benchmarks; each uses part of it.
#![allow(dead_code)]

/// Median of `runs` samples (seconds, or whatever unit `sample` returns).
pub fn median(runs: usize, mut sample: impl FnMut() -> f64) -> f64 {
    middle((0..runs).map(|_| sample()).collect())
}

/// Samples from measurements taken in alternation, round by round, so that a shared machine's
/// drift hits every one alike.
pub struct Rounds(Vec<Vec<f64>>);

/// Runs `rounds` rounds; each takes one sample of every measurement, starting at a different
/// one each round.
pub fn interleaved(rounds: usize, measures: &mut [&mut dyn FnMut() -> f64]) -> Rounds {
    let n = measures.len();
    let mut samples = vec![Vec::with_capacity(rounds); n];
    for round in 0..rounds {
        for k in 0..n {
            let i = (round + k) % n;
            let sample = measures[i]();
            samples[i].push(sample);
        }
    }
    Rounds(samples)
}

impl Rounds {
    pub fn median(&self, i: usize) -> f64 {
        middle(self.0[i].clone())
    }

    /// The median over rounds of measurement `a` / measurement `b` taken in the same round.
    pub fn ratio(&self, a: usize, b: usize) -> f64 {
        middle(self.0[a].iter().zip(&self.0[b]).map(|(x, y)| x / y).collect())
    }

    /// A markdown table: one row per measurement (in order), its median times `scale` in
    /// `unit`, and its ratio to the first.
    pub fn print_table(&self, unit: &str, scale: f64, rows: &[&str]) {
        println!("| | {unit} | × floor |\n|---|---|---|");
        for (i, row) in rows.iter().enumerate() {
            println!("| {row} | {:.2} | {:.2} |", self.median(i) * scale, self.ratio(i, 0));
        }
    }
}

fn middle(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The binary carve ships, built (or found fresh) with `cargo dist`: static musl, fat LTO.
/// Benchmarks measure it, since it is what users run; cargo's default build (dynamic glibc) is
/// what the tests use.
pub fn shipped_carve() -> std::path::PathBuf {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building the shipped binary (cargo dist)…");
    let status =
        std::process::Command::new(cargo).arg("dist").current_dir(&workspace).status().expect("cargo runs");
    assert!(status.success(), "`cargo dist` failed (is the x86_64-unknown-linux-musl target installed?)");
    // Beside this bench's own target directory: target/release/deps/<bench> → target/.
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).expect("the bench runs from target/release/deps");
    target.join("x86_64-unknown-linux-musl/dist/carve")
}

//! What every section shares: the report its tables go to, and how repeated runs are summed up.

/// The markdown of a run: every table is printed and kept for `bench-<time>.md`.
#[derive(Default)]
pub struct Report {
    pub(super) markdown: String,
}

impl Report {
    /// Prints a line and keeps it.
    pub fn line(&mut self, text: impl AsRef<str>) {
        let text = text.as_ref();
        println!("{text}");
        self.markdown.push_str(text);
        self.markdown.push('\n');
    }
}

/// Min, median and max of a non-empty list.
pub fn min_median_max(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 { sorted[n / 2] } else { f64::midpoint(sorted[n / 2 - 1], sorted[n / 2]) };
    (sorted[0], median, sorted[n - 1])
}

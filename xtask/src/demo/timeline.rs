//! The demo's PNG timeline: bytes received over time per transfer, one panel per run, with the
//! failures (and the switch's swap) as vertical lines.

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

/// A vertical line on a panel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    LbKilled,
    Swapped,
    BackendKilled,
}

impl Mark {
    fn label(self) -> &'static str {
        match self {
            Self::LbKilled => "active LB killed",
            Self::Swapped => "switch swapped",
            Self::BackendKilled => "serving backend killed",
        }
    }

    fn color(self) -> RGBColor {
        match self {
            Self::LbKilled => RGBColor(213, 94, 0),
            Self::Swapped => RGBColor(120, 120, 120),
            Self::BackendKilled => RGBColor(204, 121, 167),
        }
    }
}

/// One run: a line per transfer (seconds, MiB) and its marks (seconds).
pub struct Panel {
    pub title: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    pub marks: Vec<(f64, Mark)>,
}

const LINE_COLORS: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(240, 228, 66),
];

/// Draws the panels stacked, on a common time axis.
pub fn plot(png: &Path, panels: &[Panel]) -> anyhow::Result<()> {
    crate::plot::register_font()?;
    let points = || panels.iter().flat_map(|p| p.series.iter().flat_map(|(_, s)| s.iter()));
    let x_max = points().map(|p| p.0).chain(panels.iter().flat_map(|p| p.marks.iter().map(|m| m.0))).fold(0.1, f64::max) * 1.03;
    let y_max = points().map(|p| p.1).fold(1.0, f64::max) * 1.08;
    let height = u32::try_from(panels.len() * 380).unwrap_or(u32::MAX).max(380);
    let root = BitMapBackend::new(png, (1200, height)).into_drawing_area();
    root.fill(&WHITE)?;
    for (panel, area) in panels.iter().zip(root.split_evenly((panels.len().max(1), 1))) {
        let mut chart = ChartBuilder::on(&area)
            .caption(&panel.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart.configure_mesh().x_desc("seconds since the downloads started").y_desc("MiB").label_style(("sans-serif", 13)).draw()?;
        for (i, (label, series)) in panel.series.iter().enumerate() {
            let color = LINE_COLORS[i % LINE_COLORS.len()];
            chart
                .draw_series(std::iter::once(PathElement::new(series.clone(), color.stroke_width(2))))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        let mut labelled = Vec::new();
        for &(at, mark) in &panel.marks {
            let style = mark.color().stroke_width(2);
            // The swap dashed (the `line_series` feature of plotters is not enabled).
            let dashes = if mark == Mark::Swapped { 24 } else { 1 };
            let step = y_max / f64::from(dashes);
            let series = chart.draw_series((0..dashes).map(|d| {
                let from = f64::from(d) * step;
                let to = if dashes == 1 { y_max } else { from + step * 0.6 };
                PathElement::new(vec![(at, from), (at, to)], style)
            }))?;
            if !labelled.contains(&mark) {
                labelled.push(mark);
                series.label(mark.label()).legend(move |(x, y)| PathElement::new(vec![(x + 8, y - 6), (x + 8, y + 6)], style));
            }
        }
        crate::plot::draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    }
    root.present().with_context(|| format!("write {}", png.display()))?;
    Ok(())
}


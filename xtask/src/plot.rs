//! What every chart of the demo and the benchmarks shares: the font and the legend box.

use std::{path::Path, sync::OnceLock};

use anyhow::Context as _;
use plotters::{
    coord::{CoordTranslate, types::RangedCoordf64},
    prelude::*,
};

/// plotters draws text with a font registered at run time (no fontconfig); DejaVu Sans ships
/// with Debian's fonts-dejavu-core. Registered once per process (the bytes live as long).
pub fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED.get_or_init(|| load_font().map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
}

fn load_font() -> anyhow::Result<()> {
    const CANDIDATES: [&str; 3] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    ];
    let path = CANDIDATES.iter().find(|p| Path::new(p).is_file()).context("no TrueType font found (install fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| anyhow::anyhow!("{path}: not a usable font"))?;
    Ok(())
}

/// The label of a category axis at `x`: the category whose index `x` is, blank between them.
pub fn category(labels: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "checked above")]
    labels.get(i as usize).cloned().unwrap_or_default()
}

/// The series legend, in a white box at `position`.
pub fn draw_legend<'a, DB, CT>(chart: &mut ChartContext<'a, DB, CT>, position: SeriesLabelPosition) -> anyhow::Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("drawing a legend: {e:?}"))
}

/// One series of a grouped bar chart whose categories sit at 0, 1, 2, ...: bar `slot` of
/// `slots` in each category that has a value (`values`: category index, height), 80% of the
/// category's width for the group, with the series' legend entry.
pub fn bar_series<'a, DB>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    (slot, slots): (usize, usize),
    values: impl IntoIterator<Item = (usize, f64)>,
    label: &str,
    color: RGBColor,
) -> anyhow::Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
{
    #[expect(clippy::cast_precision_loss, reason = "a handful of series and categories")]
    let (width, at) = (0.8 / slots.max(1) as f64, |i: usize| i as f64);
    let offset = -0.4 + width * at(slot);
    let bars = values.into_iter().map(|(i, value)| Rectangle::new([(at(i) + offset, 0.0), (at(i) + offset + width * 0.92, value)], color.filled()));
    chart
        .draw_series(bars)
        .map_err(|e| anyhow::anyhow!("drawing bars: {e:?}"))?
        .label(label)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    Ok(())
}

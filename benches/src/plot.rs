//! PNG line charts of the scaling figures (plotters, bitmap backend, DejaVu Sans from Debian's
//! fonts-dejavu-core, which `cargo xtask setup` installs).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers the font once; plots cannot draw text without it.
pub fn init_font() -> Result<()> {
    let path = FONT_PATHS
        .iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| anyhow!("no DejaVuSans.ttf (Debian package fonts-dejavu-core) for the plots' text"))?;
    let bytes: &'static [u8] = Box::leak(
        std::fs::read(path)
            .with_context(|| format!("reading {path}"))?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a usable font"))?;
    Ok(())
}

pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// A line chart with a logarithmic x axis (the dimensions grow 10× a step) and a linear y axis
/// from 0. An optional horizontal reference line (e.g. the XDP_TX floor) is drawn dashed.
pub fn chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[Line],
    reference: Option<(&str, f64)>,
) -> Result<()> {
    let xs: Vec<f64> = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)).collect();
    let ys: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .chain(reference.map(|r| r.1))
        .collect();
    if xs.is_empty() {
        return Ok(());
    }
    let x_min = xs.iter().cloned().fold(f64::INFINITY, f64::min).max(1e-9);
    let x_max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let (x_lo, x_hi) = if x_max > x_min {
        (x_min / 1.5, x_max * 1.5)
    } else {
        (x_min / 2.0, x_min * 2.0)
    };
    // Headroom for the legend in the upper left.
    let y_max = ys.iter().cloned().filter(|y| y.is_finite()).fold(0.0, f64::max) * 1.45 + 1e-9;

    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|x| {
            if *x >= 1000.0 {
                format!("{}k", (*x / 1000.0).round())
            } else {
                format!("{}", x.round())
            }
        })
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, line) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = line.points.iter().copied().filter(|p| p.1.is_finite()).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(line.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    if let Some((label, y)) = reference {
        let grey = RGBColor(90, 90, 90);
        let steps = 40;
        let ratio = (x_hi / x_lo).powf(1.0 / steps as f64);
        let dashes = (0..steps).step_by(2).map(move |i| {
            let a = x_lo * ratio.powi(i);
            PathElement::new(vec![(a, y), (a * ratio, y)], grey.stroke_width(1))
        });
        chart
            .draw_series(dashes)?
            .label(label.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], grey.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

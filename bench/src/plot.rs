//! Line charts for the benchmark report (SVG into docs/bench/) and for dashboard previews (a
//! PNG grid of several charts), drawn with plotters.
//!
//! plotters is pure Rust: no gnuplot, no Python, no browser. Text is laid out with ab_glyph from
//! DejaVu Sans, read from the Debian package `fonts-dejavu-core` (scripts/install-tools installs
//! it), so no fontconfig or freetype library is needed either. SVGs name the family
//! `sans-serif` and leave drawing the glyphs to the viewer; PNGs rasterise them.
//!
//! ```ignore
//! let series = [Series { name: "ops/s".into(), points: vec![(1.0, 900.0), (4.0, 3100.0)] }];
//! let chart = Chart { title: "GetProfile", x_label: "callers", y_label: "ops/s",
//!                     series: &series, log_x: true, markers: &[] };
//! plot::draw_svg(Path::new("docs/bench/profile.svg"), &chart, (800, 450))?;
//! ```

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

/// One line of a chart: `points` are (x, y), drawn in the order given.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A vertical line across the plot at `x` with a short `label` at its top: a knee, a scenario
/// boundary, a deploy.
pub struct Marker {
    pub x: f64,
    pub label: String,
}

/// A line chart. The y axis starts at zero (every figure drawn here is a rate, a latency or a
/// size, and a zero baseline keeps their proportions honest); `log_x` draws x on a log scale
/// (concurrency 1..256), where points with x ≤ 0 are left out.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
    pub log_x: bool,
    pub markers: &'a [Marker],
}

/// Writes `chart` as an SVG of `size` (width, height) pixels to `path`.
pub fn draw_svg(path: &Path, chart: &Chart, size: (u32, u32)) -> Result<(), String> {
    load_font()?;
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    draw_on(&root, chart)?;
    root.present()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Writes `charts` as one PNG of `size` pixels to `path`: `title` on top, then the charts in a
/// grid of `columns` columns, row by row.
// loadgen itself draws only SVGs; the dashboard previews use this.
#[allow(dead_code)]
pub fn draw_grid_png(
    path: &Path,
    title: &str,
    charts: &[Chart],
    columns: usize,
    size: (u32, u32),
) -> Result<(), String> {
    load_font()?;
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let body = root
        .titled(title, (FAMILY, 24).into_font())
        .map_err(|e| e.to_string())?;
    let columns = columns.max(1);
    let rows = charts.len().div_ceil(columns).max(1);
    for (area, chart) in body.split_evenly((rows, columns)).iter().zip(charts) {
        draw_on(area, chart)?;
    }
    root.present()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The family plotters looks fonts up by; the SVG names it too, so viewers use their own.
const FAMILY: &str = "sans-serif";
const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers DejaVu Sans once per process (ab_glyph keeps `&'static` font bytes, hence the
/// leak of one ~700 kB file).
fn load_font() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT_FILE).map_err(|e| {
                format!("cannot read {FONT_FILE} ({e}); scripts/install-tools installs fonts-dejavu-core")
            })?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            register_font(FAMILY, FontStyle::Normal, bytes)
                .map_err(|_| format!("{FONT_FILE} is not a font plotters can read"))
        })
        .clone()
}

/// Tableau 10: distinct on screen and in grey print, in the order lines are usually compared.
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The points of `series` a chart can place: finite, and x > 0 on a log scale.
fn drawable(chart: &Chart, series: &Series) -> Vec<(f64, f64)> {
    series
        .points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!chart.log_x || *x > 0.0))
        .collect()
}

/// The x range of every drawable point and marker, and the y range from 0 to the highest
/// point plus headroom; a chart without points gets (1, 1) so axes still draw.
fn ranges(chart: &Chart) -> ((f64, f64), (f64, f64)) {
    let points: Vec<(f64, f64)> = chart
        .series
        .iter()
        .flat_map(|series| drawable(chart, series))
        .collect();
    let markers = chart
        .markers
        .iter()
        .map(|m| m.x)
        .filter(|x| x.is_finite() && (!chart.log_x || *x > 0.0));
    let xs = points.iter().map(|p| p.0).chain(markers);
    let (mut x_min, mut x_max) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    if x_min > x_max {
        (x_min, x_max) = (1.0, 1.0);
    }
    if x_min == x_max {
        // One point still needs an axis of some width around it.
        (x_min, x_max) = if chart.log_x {
            (x_min / 2.0, x_max * 2.0)
        } else {
            (x_min - 1.0, x_max + 1.0)
        };
    }
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max);
    // Headroom above the highest point for the markers' labels.
    let y_max = if y_max > 0.0 { y_max * 1.2 } else { 1.0 };
    let y_min = points.iter().map(|p| p.1).fold(0.0, f64::min);
    ((x_min, x_max), (y_min, y_max))
}

fn draw_on<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, chart: &Chart) -> Result<(), String> {
    let ((x_min, x_max), y) = ranges(chart);
    let area = area
        .titled(chart.title, (FAMILY, 20))
        .map_err(|e| e.to_string())?;
    // The legend gets rows of its own under the title: inside the plot it would hide lines
    // and the markers' labels.
    let (positions, height) = legend_layout(&area, chart)?;
    let (legend, plot) = area.split_vertically(height);
    draw_legend(&legend, chart, &positions)?;
    let mut builder = ChartBuilder::on(&plot);
    builder
        .margin(10)
        .margin_top(4)
        .x_label_area_size(40)
        .y_label_area_size(60);
    if chart.log_x {
        let context = builder
            .build_cartesian_2d((x_min..x_max).log_scale(), y.0..y.1)
            .map_err(|e| e.to_string())?;
        fill(context, chart, y.1)
    } else {
        let context = builder
            .build_cartesian_2d(x_min..x_max, y.0..y.1)
            .map_err(|e| e.to_string())?;
        fill(context, chart, y.1)
    }
}

const LEGEND_HEIGHT: u32 = 22;
/// Where the legend row starts: past the y labels, in line with the plot.
const LEGEND_LEFT: i32 = 70;

fn legend_text() -> TextStyle<'static> {
    (FAMILY, 13)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center))
}

/// Where each series' legend entry starts, left to right and on as many rows as the width
/// needs (a dashboard panel can have a dozen lines), and the height of those rows.
fn legend_layout<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    chart: &Chart,
) -> Result<(Vec<(i32, i32)>, u32), String> {
    let text = legend_text();
    let width = area.dim_in_pixel().0 as i32;
    let row = LEGEND_HEIGHT as i32;
    let (mut x, mut y) = (LEGEND_LEFT, row / 2);
    let mut positions = Vec::new();
    for series in chart.series {
        let (name_width, _) = area
            .estimate_text_size(&series.name, &text)
            .map_err(|e| e.to_string())?;
        let entry = 24 + name_width as i32;
        if x > LEGEND_LEFT && x + entry > width {
            (x, y) = (LEGEND_LEFT, y + row);
        }
        positions.push((x, y));
        x += entry + 20;
    }
    let rows = (y / row + 1) as u32;
    Ok((positions, LEGEND_HEIGHT * rows))
}

/// A short line in each series' colour, then its name, at the positions of [`legend_layout`].
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    chart: &Chart,
    positions: &[(i32, i32)],
) -> Result<(), String> {
    let text = legend_text();
    for (index, (series, &(x, y))) in chart.series.iter().zip(positions).enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        area.draw(&PathElement::new(
            [(x, y), (x + 18, y)],
            colour.stroke_width(2),
        ))
        .map_err(|e| e.to_string())?;
        area.draw_text(&series.name, &text, (x + 24, y))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// An axis label without the noise of fixed decimals: 256, 12.5, 0.25.
fn tick(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Axes, markers, lines and the legend, on either kind of x axis.
fn fill<'a, DB, X>(
    mut context: ChartContext<'a, DB, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>,
    chart: &Chart,
    y_top: f64,
) -> Result<(), String>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    context
        .configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    let grey = RGBColor(110, 110, 110);
    for (index, marker) in chart.markers.iter().enumerate() {
        if !marker.x.is_finite() || (chart.log_x && marker.x <= 0.0) {
            continue;
        }
        context
            .draw_series(DashedLineSeries::new(
                [(marker.x, 0.0), (marker.x, y_top)],
                6,
                4,
                grey.stroke_width(1),
            ))
            .map_err(|e| e.to_string())?;
        context
            .draw_series(std::iter::once(Text::new(
                format!(" {}", marker.label),
                // Three label heights in turn, so marks close together stay legible.
                (marker.x, y_top * (0.98 - 0.05 * (index % 3) as f64)),
                (FAMILY, 12).into_font().color(&grey),
            )))
            .map_err(|e| e.to_string())?;
    }
    for (index, series) in chart.series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let points = drawable(chart, series);
        if points.is_empty() {
            continue;
        }
        context
            .draw_series(
                LineSeries::new(points, colour.stroke_width(2))
                    .point_size(if series.points.len() <= 32 { 3 } else { 0 }),
            )
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep() -> Vec<Series> {
        vec![
            Series {
                name: "p50 ms".into(),
                points: vec![
                    (1.0, 0.4),
                    (4.0, 0.6),
                    (16.0, 1.5),
                    (64.0, 5.0),
                    (256.0, 21.0),
                ],
            },
            Series {
                name: "p99 ms".into(),
                points: vec![
                    (1.0, 1.1),
                    (4.0, 1.9),
                    (16.0, 4.0),
                    (64.0, 14.0),
                    (256.0, 60.0),
                ],
            },
        ]
    }

    fn chart<'a>(series: &'a [Series], markers: &'a [Marker], log_x: bool) -> Chart<'a> {
        Chart {
            title: "GetProfile latency",
            x_label: "callers",
            y_label: "ms",
            series,
            log_x,
            markers,
        }
    }

    #[test]
    fn an_svg_holds_the_title_every_series_and_the_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latency.svg");
        let series = sweep();
        let markers = [Marker {
            x: 64.0,
            label: "knee".into(),
        }];
        draw_svg(&path, &chart(&series, &markers, true), (640, 360)).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(r#"width="640""#) && svg.contains(r#"height="360""#));
        for text in ["GetProfile latency", "p50 ms", "p99 ms", "knee", "callers"] {
            assert!(svg.contains(text), "{text} missing");
        }
        // The lines themselves: one polyline per series.
        assert!(svg.matches("<polyline").count() >= series.len());
    }

    #[test]
    fn charts_without_points_or_with_unplaceable_points_still_draw() {
        let dir = tempfile::tempdir().unwrap();
        let empty = [Series {
            name: "nothing yet".into(),
            points: Vec::new(),
        }];
        let zeros = [Series {
            name: "x = 0 on a log scale".into(),
            points: vec![(0.0, 5.0), (-1.0, 2.0), (f64::NAN, 1.0)],
        }];
        let one = [Series {
            name: "one point".into(),
            points: vec![(16.0, 0.0)],
        }];
        for (index, (series, log_x)) in [
            (&[][..], false),
            (&empty[..], true),
            (&zeros[..], true),
            (&one[..], true),
            (&one[..], false),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("{index}.svg"));
            draw_svg(&path, &chart(series, &[], log_x), (400, 300)).unwrap();
            assert!(std::fs::read_to_string(&path).unwrap().starts_with("<svg"));
        }
    }

    #[test]
    fn a_png_grid_has_the_png_signature_and_the_requested_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let series = sweep();
        let charts = [
            chart(&series, &[], true),
            chart(&series, &[], false),
            chart(&[], &[], false),
        ];
        draw_grid_png(&path, "dashboard", &charts, 2, (900, 600)).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR is the first chunk: width and height, big-endian, at bytes 16..24.
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 900);
        assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 600);
    }

    #[test]
    fn a_long_legend_wraps_onto_rows_within_the_width() {
        load_font().unwrap();
        let series: Vec<Series> = (0..12)
            .map(|n| Series {
                name: format!("referral-service DeadlineExceeded {n}"),
                points: vec![(1.0, 1.0)],
            })
            .collect();
        let mut svg = String::new();
        let area = SVGBackend::with_string(&mut svg, (500, 300)).into_drawing_area();
        let (positions, height) = legend_layout(&area, &chart(&series, &[], false)).unwrap();
        assert_eq!(positions.len(), series.len());
        let rows = positions
            .iter()
            .map(|p| p.1)
            .collect::<std::collections::BTreeSet<_>>();
        assert!(rows.len() > 1, "{positions:?}");
        assert_eq!(height, LEGEND_HEIGHT * rows.len() as u32);
        assert!(positions.iter().all(|&(x, _)| x < 500), "{positions:?}");
    }

    #[test]
    fn ticks_drop_needless_decimals() {
        assert_eq!(tick(256.0), "256");
        assert_eq!(tick(12.5), "12.5");
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(0.0), "0");
    }

    #[test]
    fn an_unwritable_path_is_an_error_not_a_panic() {
        let series = sweep();
        let missing = Path::new("/nonexistent-dir/chart.svg");
        assert!(draw_svg(missing, &chart(&series, &[], true), (400, 300)).is_err());
    }
}

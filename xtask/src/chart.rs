//! `cargo xtask chart [RESULTS.jsonl ...]`: a bar chart of each benchmark results file, written
//! next to it as `<stem>.svg` (by default every `bench/results/*.jsonl`).
//!
//! The input is the JSON-lines output of `host/benches/throughput.rs` and `peers.py`, concatenated:
//! `{"copy_GBps": N}` lines (the first one is the title's), then one line per (method, n, v, dtype)
//! with `ms_median` and `pct_of_copy`; lines with an `"error"` are skipped. The chart has one group
//! of bars per config, one bar per method (xent first, in its own colour), bar height the % of
//! copy bandwidth, a line at the 85% target, and each bar's median ms above it.

use std::fs;
use std::path::{Path, PathBuf};

use plotters::coord::combinators::BindKeyPoints;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

use crate::{Result, relative, step};

/// Our method's name in the results; its bars come first in every group.
const OURS: &str = "xent";

/// The bandwidth the project aims at, in % of a device-to-device copy.
const TARGET_PCT: f64 = 85.0;

/// Chart size in pixels: room for seven groups of six bars with readable labels.
const SIZE: (u32, u32) = (1600, 720);

/// One group of bars on the x axis, in the axis' integer units.
const GROUP: i32 = 1000;

/// Width of the legend column right of the plot, in pixels.
const LEGEND_WIDTH: u32 = 230;

/// The height of one character of a bar's (vertical) ms label, in % of the y axis: 13 px text
/// (about 7 px a character) on a plot about 560 px high.
const LABEL_PCT_PER_CHAR: f64 = 1.3;

/// xent's colour (orange), its runs with a loss option (`xent[NAME]`: lighter and darker oranges),
/// then the peers' (blues, greens, greys: one family, set apart from ours).
const OUR_COLOUR: RGBColor = RGBColor(230, 97, 1);
const OUR_OPTION_COLOURS: [RGBColor; 4] = [
    RGBColor(253, 174, 107),
    RGBColor(166, 54, 3),
    RGBColor(253, 208, 162),
    RGBColor(241, 105, 19),
];
const PEER_COLOURS: [RGBColor; 6] = [
    RGBColor(49, 130, 189),
    RGBColor(107, 174, 214),
    RGBColor(49, 163, 84),
    RGBColor(116, 196, 118),
    RGBColor(117, 117, 117),
    RGBColor(189, 189, 189),
];

/// One results file, grouped for the chart.
#[derive(Debug, PartialEq)]
struct Results {
    /// The first `copy_GBps` line's value.
    copy_gbps: Option<f64>,
    /// Config labels (`"8192x128256 bf16"`), in order of first appearance.
    configs: Vec<String>,
    /// Methods, `xent` first, the others in order of first appearance.
    methods: Vec<String>,
    /// `bars[config][method]`: (% of copy, median ms), `None` where that pair has no result.
    bars: Vec<Vec<Option<(f64, f64)>>>,
}

/// `cargo xtask chart [FILES]`: renders every file given, or every `bench/results/*.jsonl`.
pub fn chart(root: &Path, args: &[String]) -> Result<()> {
    let files: Vec<PathBuf> = if args.is_empty() {
        let dir = root.join("bench/results");
        let mut found: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(|err| format!("cannot list {}: {err}", dir.display()))?
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
            .collect();
        found.sort();
        found
    } else {
        args.iter().map(PathBuf::from).collect()
    };
    if files.is_empty() {
        return Err("no results files (bench/results/*.jsonl) to chart".to_string());
    }
    for file in &files {
        let text = fs::read_to_string(file)
            .map_err(|err| format!("cannot read {}: {err}", file.display()))?;
        let results = parse(&text).map_err(|err| format!("{}: {err}", file.display()))?;
        let svg = file.with_extension("svg");
        render(&results, &gpu_name(file), &svg)
            .map_err(|err| format!("cannot draw {}: {err}", svg.display()))?;
        step(&format!("wrote {}", relative(root, &svg)));
    }
    Ok(())
}

/// Parses and groups the JSON lines; blank lines and lines with an `"error"` are skipped.
fn parse(text: &str) -> Result<Results> {
    let mut results = Results {
        copy_gbps: None,
        configs: Vec::new(),
        methods: Vec::new(),
        bars: Vec::new(),
    };
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| format!("line {}: {what}", index + 1);
        let record: Value = serde_json::from_str(line).map_err(|err| bad(&err.to_string()))?;
        if let Some(copy) = record.get("copy_GBps") {
            results.copy_gbps = results.copy_gbps.or(copy.as_f64());
            continue;
        }
        // A failed run, or a host-time line (torch_bench.py's `host_method`): no bar.
        if record.get("error").is_some() || record.get("host_method").is_some() {
            continue;
        }
        let text_field = |key: &str| record[key].as_str().ok_or_else(|| bad(key));
        let number = |key: &str| record[key].as_f64().ok_or_else(|| bad(key));
        let count = |key: &str| record[key].as_u64().ok_or_else(|| bad(key));
        let config = format!("{}x{} {}", count("n")?, count("v")?, text_field("dtype")?);
        let method = text_field("method")?.to_string();
        rows.push((config, method, number("pct_of_copy")?, number("ms_median")?));
    }
    for (config, method, _, _) in &rows {
        if !results.configs.contains(config) {
            results.configs.push(config.clone());
        }
        if !results.methods.contains(method) {
            results.methods.push(method.clone());
        }
    }
    if rows.is_empty() {
        return Err("no results to chart".to_string());
    }
    // A stable sort: xent first, then its option runs, then the peers, each in file order.
    results
        .methods
        .sort_by_key(|method| (method != OURS, !is_our_option(method)));
    results.bars = vec![vec![None; results.methods.len()]; results.configs.len()];
    for (config, method, pct, ms) in rows {
        let at = |names: &[String], name: &str| {
            names.iter().position(|n| n == name).expect("listed above")
        };
        results.bars[at(&results.configs, &config)][at(&results.methods, &method)] =
            Some((pct, ms));
    }
    Ok(results)
}

/// The GPU's name from a file stem such as `h200-2026-11-28`: its first word, upper-cased.
fn gpu_name(file: &Path) -> String {
    let stem = file.file_stem().unwrap_or_default().to_string_lossy();
    stem.split(['-', '_'])
        .next()
        .unwrap_or("GPU")
        .to_uppercase()
}

/// Black or white, whichever reads better on `background` (by its luma).
fn ink_on(background: RGBColor) -> RGBColor {
    let RGBColor(r, g, b) = background;
    let luma = 0.299 * r as f64 + 0.587 * g as f64 + 0.114 * b as f64;
    if luma > 150.0 { BLACK } else { WHITE }
}

/// Whether `method` is another run of xent: with a loss option (`xent[NAME]`) or through another
/// front end (`xent_torch`, `xent_torch[two_phase]`).
fn is_our_option(method: &str) -> bool {
    method != OURS && method.starts_with("xent")
}

/// The colour of the `index`-th method: xent's, one of its option runs' (counted among them), or
/// a peer's (counted among the peers), so no two methods share one while each family has colours
/// left.
fn colour(results: &Results, index: usize) -> RGBColor {
    let method = &results.methods[index];
    let before = &results.methods[..index];
    if method == OURS {
        OUR_COLOUR
    } else if is_our_option(method) {
        let rank = before.iter().filter(|m| is_our_option(m)).count();
        OUR_OPTION_COLOURS[rank % OUR_OPTION_COLOURS.len()]
    } else {
        let rank = before
            .iter()
            .filter(|m| *m != OURS && !is_our_option(m))
            .count();
        PEER_COLOURS[rank % PEER_COLOURS.len()]
    }
}

/// Draws `results` as an SVG bar chart at `path`.
fn render(
    results: &Results,
    gpu: &str,
    path: &Path,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let title = match results.copy_gbps {
        Some(copy) => format!("{gpu}, copy {copy:.0} GB/s: fused cross-entropy, loss + gradient"),
        None => format!("{gpu}: fused cross-entropy, loss + gradient"),
    };
    let (plot_area, legend_area) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);

    // x in thousandths of a group (integers, whose labels plotters can format): group i spans
    // [1000 i, 1000 (i + 1)), its label at the centre; y: % of copy bandwidth.
    let width = GROUP * results.configs.len() as i32;
    let centres: Vec<i32> = (0..width)
        .step_by(GROUP as usize)
        .map(|x| x + GROUP / 2)
        .collect();
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d((0..width).with_key_points(centres), 0.0..100.0)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|x| {
            let index = (x / GROUP) as usize;
            results.configs.get(index).cloned().unwrap_or_default()
        })
        .x_label_style(("sans-serif", 17))
        .y_labels(11)
        .y_label_formatter(&|pct| format!("{pct:.0}"))
        .y_label_style(("sans-serif", 15))
        .y_desc("% of copy bandwidth (median)")
        .axis_desc_style(("sans-serif", 17))
        .max_light_lines(0)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()?;

    // Bars fill 84% of a group, in method order; a missing result leaves its slot empty.
    let slot = GROUP * 84 / 100 / results.methods.len() as i32;
    let label_style = TextStyle::from(("sans-serif", 13).into_font())
        .transform(FontTransform::Rotate270)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (config, row) in results.bars.iter().enumerate() {
        for (method, bar) in row.iter().enumerate() {
            let Some((pct, ms)) = *bar else { continue };
            let left = GROUP * config as i32 + GROUP * 8 / 100 + slot * method as i32;
            let (x0, x1) = (left + slot * 8 / 100, left + slot * 92 / 100);
            chart.draw_series([Rectangle::new(
                [(x0, 0.0), (x1, pct.min(100.0))],
                colour(results, method).filled(),
            )])?;
            // The ms reads upwards from just above the bar, or from inside its top (in black or
            // white, whichever the bar's colour shows) where it would cross the target line or
            // leave the plot; left out where neither fits.
            let text = format!("{ms:.3} ms");
            let height = text.len() as f64 * LABEL_PCT_PER_CHAR;
            let (above, top) = (pct + 1.0, pct + 1.0 + height);
            let crosses_target = pct < TARGET_PCT && top > TARGET_PCT;
            let at = if !crosses_target && top <= 100.0 {
                Some((above, BLACK))
            } else if pct > height + 2.0 {
                Some((
                    pct.min(100.0) - 1.0 - height,
                    ink_on(colour(results, method)),
                ))
            } else if top <= 100.0 {
                Some((above, BLACK))
            } else {
                None
            };
            if let Some((y, colour)) = at {
                chart.draw_series([Text::new(
                    text,
                    ((x0 + x1) / 2, y),
                    label_style.color(&colour),
                )])?;
            }
        }
    }

    let target_style = ShapeStyle::from(&RGBColor(200, 0, 0)).stroke_width(2);
    chart.draw_series([PathElement::new(
        [(0, TARGET_PCT), (width, TARGET_PCT)],
        target_style,
    )])?;
    chart.draw_series([Text::new(
        format!("target {TARGET_PCT:.0}%"),
        (width - GROUP / 100, TARGET_PCT + 1.0),
        TextStyle::from(("sans-serif", 15).into_font())
            .color(&RGBColor(200, 0, 0))
            .pos(Pos::new(HPos::Right, VPos::Bottom)),
    )])?;

    // The legend: a swatch and a name per method, in bar order, top of the right column.
    let legend = legend_area.margin(70, 0, 10, 10);
    legend.draw(&Text::new(
        "method (bar order)",
        (0, 0),
        ("sans-serif", 17).into_font(),
    ))?;
    for (index, method) in results.methods.iter().enumerate() {
        let y = 34 + 28 * index as i32;
        legend.draw(&Rectangle::new(
            [(0, y), (22, y + 18)],
            colour(results, index).filled(),
        ))?;
        legend.draw(&Text::new(
            method.as_str(),
            (32, y + 1),
            ("sans-serif", 17).into_font(),
        ))?;
    }
    let y = 34 + 28 * results.methods.len() as i32 + 8;
    legend.draw(&PathElement::new([(0, y + 9), (22, y + 9)], target_style))?;
    legend.draw(&Text::new(
        "target",
        (32, y + 1),
        ("sans-serif", 17).into_font(),
    ))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_grouped_by_config_with_xent_first_and_errors_skipped() {
        let text = r#"{"copy_GBps": 4255}
{"method": "liger", "n": 8192, "v": 32000, "dtype": "bf16", "ms_median": 1.0, "pct_of_copy": 24.1}
{"method": "xent", "n": 8192, "v": 32000, "dtype": "bf16", "ms_median": 0.3, "pct_of_copy": 83.3}
{"copy_GBps": 4264}
{"method": "torch", "n": 512, "v": 128256, "dtype": "f32", "error": "out of memory"}
{"method": "liger", "n": 512, "v": 128256, "dtype": "f32", "ms_median": 0.8, "pct_of_copy": 7.4}

"#;
        let results = parse(text).unwrap();
        assert_eq!(results.copy_gbps, Some(4255.0));
        assert_eq!(results.configs, ["8192x32000 bf16", "512x128256 f32"]);
        assert_eq!(results.methods, ["xent", "liger"]);
        assert_eq!(
            results.bars,
            [
                [Some((83.3, 0.3)), Some((24.1, 1.0))],
                [None, Some((7.4, 0.8))],
            ]
        );
    }

    #[test]
    fn every_method_has_its_own_colour_ours_in_oranges() {
        let mut text = String::new();
        let methods = [
            "liger",
            "xent[z]",
            "seed",
            "xent",
            "torch",
            "xent[smoothing]",
            "torch_compile",
            "xent[weight]",
            "torch_f32_upcast",
        ];
        for method in methods {
            text += &format!(
                "{{\"method\": \"{method}\", \"n\": 1, \"v\": 2, \"dtype\": \"bf16\", \
                 \"ms_median\": 1.0, \"pct_of_copy\": 50.0}}\n"
            );
        }
        let results = parse(&text).unwrap();
        assert_eq!(
            results.methods,
            [
                "xent",
                "xent[z]",
                "xent[smoothing]",
                "xent[weight]",
                "liger",
                "seed",
                "torch",
                "torch_compile",
                "torch_f32_upcast"
            ]
        );
        let colours: Vec<RGBColor> = (0..methods.len()).map(|i| colour(&results, i)).collect();
        for (i, a) in colours.iter().enumerate() {
            for (j, b) in colours.iter().enumerate().skip(i + 1) {
                assert!(
                    a != b,
                    "{} and {} share a colour",
                    results.methods[i],
                    results.methods[j]
                );
            }
        }
        assert_eq!(ink_on(OUR_COLOUR), WHITE);
        assert_eq!(ink_on(RGBColor(253, 208, 162)), BLACK);
        for (i, method) in results.methods.iter().enumerate().take(4) {
            let RGBColor(r, g, b) = colours[i];
            assert!(r > g && g >= b, "{method}: not an orange ({r}, {g}, {b})");
        }
    }

    #[test]
    fn a_line_without_its_numbers_is_an_error_naming_the_line() {
        let text = "{\"copy_GBps\": 1}\n{\"method\": \"xent\", \"n\": 1, \"dtype\": \"f32\"}";
        assert_eq!(parse(text).unwrap_err(), "line 2: v");
    }

    #[test]
    fn a_file_without_results_is_an_error() {
        let text = "{\"copy_GBps\": 1}\n{\"method\": \"xent\", \"error\": \"no GPU\"}";
        assert_eq!(parse(text).unwrap_err(), "no results to chart");
    }

    #[test]
    fn the_gpu_is_named_after_the_file_stem() {
        assert_eq!(
            gpu_name(Path::new("bench/results/h200-2026-11-28.jsonl")),
            "H200"
        );
    }
}

//! `report.html` of an evaluate stage: what `report.md` says, drawn — the training curves of
//! the evaluated model's train stage (loss and held-out loss by step), one bar chart per metric
//! (base beside tuned when comparing), and the generated samples — as one self-contained file:
//! inline SVG, no scripts, no fonts or other assets from anywhere.
//!
//! The charts are plain SVG written here rather than with a plotting crate: the ones that draw
//! text need a font engine and font files, for what is two kinds of chart.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

/// One line of a chart: `(x, y)` points in order.
pub(crate) struct Curve {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    /// Marks at each point (sparse series such as held-out loss).
    pub marked: bool,
}

/// The colours of the series: a model's label picks the same colour in every chart.
const BASE_COLOR: &str = "#1f77b4";
const TUNED_COLOR: &str = "#ff7f0e";
const OTHER_COLOR: &str = "#2ca02c";

fn color_of(label: &str) -> &'static str {
    match label {
        "base" => BASE_COLOR,
        "tuned" | "model" => TUNED_COLOR,
        _ => OTHER_COLOR,
    }
}

/// The loss and held-out loss curves in a train stage's `metrics.jsonl` under `dir` (nothing
/// when the model did not come from a train stage).
pub(crate) fn training_curves(dir: &Path) -> Vec<Curve> {
    let Ok(text) = std::fs::read_to_string(dir.join("metrics.jsonl")) else {
        return Vec::new();
    };
    let (mut loss, mut heldout) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64().filter(|l| l.is_finite()) {
            loss.push((step, l));
        }
        if let Some(l) = v["eval_loss"].as_f64().filter(|l| l.is_finite()) {
            heldout.push((step, l));
        }
    }
    let mut curves = Vec::new();
    if !loss.is_empty() {
        curves.push(Curve {
            name: "training loss".into(),
            color: BASE_COLOR,
            points: loss,
            marked: false,
        });
    }
    if !heldout.is_empty() {
        curves.push(Curve {
            name: "held-out loss".into(),
            color: TUNED_COLOR,
            points: heldout,
            marked: true,
        });
    }
    curves
}

/// The whole page. `rows`: metric → (model label, value), as report.md lists them;
/// `samples`: the generated samples as samples.jsonl holds them.
pub(crate) fn render(
    title: &str,
    rows: &[(String, Vec<(String, f64)>)],
    curves: &[Curve],
    samples: &[Value],
) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n\
         <style>body{{font-family:sans-serif;margin:2em;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;\
         vertical-align:top;text-align:left}}td.num{{text-align:right;font-variant-numeric:tabular-nums}}\
         .charts{{display:flex;flex-wrap:wrap;gap:1em}}pre{{white-space:pre-wrap;margin:0;max-width:40em}}</style>\n\
         </head>\n<body>\n<h1>{}</h1>\n",
        escape(title),
        escape(title)
    );
    if !curves.is_empty() {
        html.push_str("<h2>Training</h2>\n");
        html.push_str(&line_chart("loss by step", "step", curves));
    }
    if !rows.is_empty() {
        html.push_str("<h2>Metrics</h2>\n<div class=\"charts\">\n");
        for (metric, values) in rows {
            html.push_str(&bar_chart(metric, values));
        }
        html.push_str("</div>\n");
        html.push_str(&metrics_table(rows));
    }
    if !samples.is_empty() {
        html.push_str(&samples_table(samples));
    }
    html.push_str("</body>\n</html>\n");
    html
}

fn metrics_table(rows: &[(String, Vec<(String, f64)>)]) -> String {
    let mut labels: Vec<&str> = Vec::new();
    for (_, values) in rows {
        for (l, _) in values {
            if !labels.contains(&l.as_str()) {
                labels.push(l);
            }
        }
    }
    let mut s = String::from("<table>\n<tr><th>metric</th>");
    for l in &labels {
        let _ = write!(s, "<th>{}</th>", escape(l));
    }
    s.push_str("</tr>\n");
    for (metric, values) in rows {
        let _ = write!(s, "<tr><td>{}</td>", escape(metric));
        for l in &labels {
            match values.iter().find(|(label, _)| label == l) {
                Some((_, v)) => {
                    let _ = write!(s, "<td class=\"num\">{v:.4}</td>");
                }
                None => s.push_str("<td></td>"),
            }
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n");
    s
}

fn samples_table(samples: &[Value]) -> String {
    let mut s = String::from(
        "<h2>Samples</h2>\n<table>\n<tr><th>model</th><th>prompt</th><th>output</th><th>reference</th></tr>\n",
    );
    let text = |v: &Value| v.as_str().map(escape).unwrap_or_default();
    for sample in samples {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td><pre>{}</pre></td><td><pre>{}</pre></td><td><pre>{}</pre></td></tr>",
            text(&sample["model"]),
            text(&sample["prompt"]),
            text(&sample["output"]),
            text(&sample["reference"]),
        );
    }
    s.push_str("</table>\n");
    s
}

/// `&`, `<`, `>`, `"` and `'` as entities: every text that came from data.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Where a chart draws: the SVG's size and the plot area inside its margins.
struct Frame {
    width: f64,
    height: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
}

impl Frame {
    fn plot_width(&self) -> f64 {
        self.width - self.left - self.right
    }
    fn plot_height(&self) -> f64 {
        self.height - self.top - self.bottom
    }
}

/// `[lo, hi]` widened so that a flat series still has a height, and padded by 5%.
fn range(values: impl Iterator<Item = f64>, include_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if include_zero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    if hi - lo < 1e-12 {
        let pad = lo.abs().max(1.0) * 0.05;
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * 0.05;
    (
        if include_zero && lo == 0.0 {
            0.0
        } else {
            lo - pad
        },
        hi + pad,
    )
}

/// A number as a tick label: few digits, whatever its size.
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The axes, grid lines and tick labels of a chart over `x` and `y` ranges (`x` `None`: no
/// x ticks, for bar charts).
fn axes(f: &Frame, x: Option<(f64, f64)>, y: (f64, f64), x_label: &str) -> String {
    let mut s = String::new();
    let (x0, y0, x1, y1) = (f.left, f.top, f.width - f.right, f.height - f.bottom);
    for i in 0..=4 {
        let v = y.0 + (y.1 - y.0) * i as f64 / 4.0;
        let py = y1 - f.plot_height() * i as f64 / 4.0;
        let _ = write!(
            s,
            "<line x1=\"{x0:.1}\" y1=\"{py:.1}\" x2=\"{x1:.1}\" y2=\"{py:.1}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            x0 - 6.0,
            py + 4.0,
            tick_label(v)
        );
    }
    if let Some((lo, hi)) = x {
        for i in 0..=4 {
            let v = lo + (hi - lo) * i as f64 / 4.0;
            let px = x0 + f.plot_width() * i as f64 / 4.0;
            // Steps are whole numbers: wide ranges get whole ticks.
            let label = if hi - lo >= 4.0 {
                format!("{}", v.round())
            } else {
                tick_label(v)
            };
            let _ = write!(
                s,
                "<text x=\"{px:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{label}</text>",
                y1 + 16.0,
            );
        }
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">{}</text>",
            (x0 + x1) / 2.0,
            f.height - 4.0,
            escape(x_label)
        );
    }
    let _ = write!(
        s,
        "<polyline points=\"{x0:.1},{y0:.1} {x0:.1},{y1:.1} {x1:.1},{y1:.1}\" fill=\"none\" stroke=\"#444\"/>"
    );
    s
}

fn line_chart(title: &str, x_label: &str, curves: &[Curve]) -> String {
    let f = Frame {
        width: 640.0,
        height: 320.0,
        left: 60.0,
        right: 20.0,
        top: 40.0,
        bottom: 40.0,
    };
    // Steps run edge to edge, unpadded.
    let (lo, hi) = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let x = if lo.is_finite() && hi - lo > 1e-12 {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 1.0, lo + 1.0)
    } else {
        (0.0, 1.0)
    };
    let y = range(
        curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)),
        false,
    );
    let to_px = |(vx, vy): (f64, f64)| {
        (
            f.left + (vx - x.0) / (x.1 - x.0) * f.plot_width(),
            f.height - f.bottom - (vy - y.0) / (y.1 - y.0) * f.plot_height(),
        )
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" role=\"img\" aria-label=\"{}\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{}\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        f.width, f.height, f.width, f.height, escape(title), f.left, escape(title)
    );
    s.push_str(&axes(&f, Some(x), y, x_label));
    for (i, c) in curves.iter().enumerate() {
        let points: Vec<String> = c
            .points
            .iter()
            .map(|&p| {
                let (px, py) = to_px(p);
                format!("{px:.1},{py:.1}")
            })
            .collect();
        let _ = write!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2.5\"/>",
            points.join(" "),
            c.color
        );
        if c.marked || c.points.len() == 1 {
            for &p in &c.points {
                let (px, py) = to_px(p);
                let _ = write!(
                    s,
                    "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"4\" fill=\"{}\"/>",
                    c.color
                );
            }
        }
        // The legend, top right.
        let ly = f.top + 4.0 + 18.0 * i as f64;
        let lx = f.width - f.right - 150.0;
        let _ = write!(
            s,
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"14\" height=\"4\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\">{}</text>",
            ly - 2.0,
            c.color,
            lx + 20.0,
            ly + 4.0,
            escape(&c.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn bar_chart(metric: &str, values: &[(String, f64)]) -> String {
    let f = Frame {
        width: 260.0,
        height: 220.0,
        left: 56.0,
        right: 12.0,
        top: 36.0,
        bottom: 28.0,
    };
    let finite: Vec<&(String, f64)> = values.iter().filter(|(_, v)| v.is_finite()).collect();
    let y = range(finite.iter().map(|(_, v)| *v), true);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" role=\"img\" aria-label=\"{}\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"8\" y=\"20\" font-size=\"13\" font-weight=\"bold\">{}</text>",
        f.width, f.height, f.width, f.height, escape(metric), escape(metric)
    );
    s.push_str(&axes(&f, None, y, ""));
    let slot = f.plot_width() / finite.len().max(1) as f64;
    let zero = f.height - f.bottom - (0.0 - y.0) / (y.1 - y.0) * f.plot_height();
    for (i, (label, v)) in finite.iter().enumerate() {
        let top = f.height - f.bottom - (v - y.0) / (y.1 - y.0) * f.plot_height();
        let (y_top, h) = if top < zero {
            (top, zero - top)
        } else {
            (zero, top - zero)
        };
        let x = f.left + slot * i as f64 + slot * 0.2;
        let _ = write!(
            s,
            "<rect x=\"{x:.1}\" y=\"{y_top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            slot * 0.6,
            h.max(1.0),
            color_of(label),
            x + slot * 0.3,
            f.height - f.bottom + 16.0,
            escape(label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_escaped_and_nothing_is_fetched() {
        let rows = vec![(
            "tasks.quiz.acc".to_string(),
            vec![("base".to_string(), 0.25), ("tuned".to_string(), 0.75)],
        )];
        let samples = vec![serde_json::json!({
            "model": "tuned", "prompt": "<script>alert(1)</script>", "output": "a & b", "reference": null
        })];
        let curves = vec![Curve {
            name: "training loss".into(),
            color: BASE_COLOR,
            points: vec![(1.0, 3.0), (2.0, 2.5), (3.0, 2.0)],
            marked: false,
        }];
        let html = render("Evaluation <e>", &rows, &curves, &samples);
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("a &amp; b"));
        assert!(html.contains("Evaluation &lt;e&gt;"));
        // The only URL is SVG's namespace name, which is never fetched.
        let urls = html.matches("http").count();
        assert_eq!(urls, html.matches("http://www.w3.org/2000/svg").count());
        assert_eq!(html.matches("<svg").count(), 2);
        assert!(html.contains(TUNED_COLOR) && html.contains(BASE_COLOR));
    }

    #[test]
    fn flat_and_negative_values_still_draw_inside_the_frame() {
        let html = bar_chart("delta", &[("base".into(), -0.5), ("tuned".into(), 0.5)]);
        for part in html.split("<rect ").skip(2) {
            let attr = |name: &str| -> f64 {
                let start = part.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                part[start..].split('"').next().unwrap().parse().unwrap()
            };
            let (y, h) = (attr("y"), attr("height"));
            assert!(y >= 36.0 - 1e-9 && y + h <= 220.0 - 28.0 + 1e-9, "{part}");
        }
        let flat = line_chart(
            "t",
            "step",
            &[Curve {
                name: "c".into(),
                color: BASE_COLOR,
                points: vec![(1.0, 2.0), (2.0, 2.0)],
                marked: true,
            }],
        );
        assert!(!flat.contains("NaN") && !flat.contains("inf"), "{flat}");
    }
}

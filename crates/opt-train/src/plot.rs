//! The loss curve as a self-contained SVG (no plotting dependency): training loss per logged
//! step, its running average, validation loss, and markers for guard events.

use std::fmt::Write;

/// Points of the curve, as the trainer (or a logbook read on resume) collects them.
#[derive(Clone, Debug, Default)]
pub struct LossCurve {
    pub train: Vec<(u64, f64)>,
    pub valid: Vec<(u64, f64)>,
    /// `(step, event name)` for skipped steps and rollbacks.
    pub events: Vec<(u64, String)>,
}

impl LossCurve {
    /// Rebuild from logbook rows (on resume).
    pub fn from_rows(rows: &[serde_json::Value]) -> LossCurve {
        let mut c = LossCurve::default();
        for r in rows {
            let step = r.get("step").and_then(|s| s.as_u64()).unwrap_or(0);
            match r.get("kind").and_then(|k| k.as_str()) {
                Some("train") => {
                    if let Some(l) = r.get("loss").and_then(|l| l.as_f64()) {
                        c.train.push((step, l));
                    }
                }
                Some("eval") => {
                    if let Some(l) = r.get("valid_loss").and_then(|l| l.as_f64()) {
                        c.valid.push((step, l));
                    }
                }
                Some("event") => {
                    if let Some(e) = r.get("event").and_then(|e| e.as_str()) {
                        if matches!(e, "rollback" | "spike_skipped" | "nonfinite_skipped" | "overflow") {
                            c.events.push((step, e.to_string()));
                        }
                    }
                }
                _ => {}
            }
        }
        c
    }

    /// Render as SVG text.
    pub fn svg(&self, title: &str) -> String {
        const W: f64 = 800.0;
        const H: f64 = 450.0;
        const L: f64 = 64.0; // plot area margins
        const R: f64 = 20.0;
        const T: f64 = 40.0;
        const B: f64 = 48.0;
        let finite = |v: &&(u64, f64)| v.1.is_finite();
        let pts: Vec<(u64, f64)> = self.train.iter().chain(self.valid.iter()).filter(finite).copied().collect();
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ =
            writeln!(s, r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#, W / 2.0, escape(title));
        if pts.is_empty() {
            let _ =
                writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">no data yet</text></svg>"#, W / 2.0, H / 2.0);
            return s;
        }
        let x_max = pts.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
        let x_min = pts.iter().map(|p| p.0).min().unwrap_or(0) as f64;
        let x_min = if x_min >= x_max { 0.0 } else { x_min };
        let mut y_lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let mut y_hi = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        if y_hi - y_lo < 1e-9 {
            y_lo -= 0.5;
            y_hi += 0.5;
        }
        let pad = 0.05 * (y_hi - y_lo);
        let (y_lo, y_hi) = (y_lo - pad, y_hi + pad);
        let px = |x: f64| L + (x - x_min) / (x_max - x_min) * (W - L - R);
        let py = |y: f64| T + (y_hi - y) / (y_hi - y_lo) * (H - T - B);

        // Axes, grid and ticks.
        let _ = writeln!(s, r##"<g stroke="#ddd">"##);
        for i in 0..=5 {
            let y = y_lo + (y_hi - y_lo) * i as f64 / 5.0;
            let _ = writeln!(s, r#"<line x1="{L}" x2="{}" y1="{:.1}" y2="{:.1}"/>"#, W - R, py(y), py(y));
        }
        let _ = writeln!(s, "</g>");
        for i in 0..=5 {
            let y = y_lo + (y_hi - y_lo) * i as f64 / 5.0;
            let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{y:.2}</text>"#, L - 6.0, py(y) + 4.0);
            let x = x_min + (x_max - x_min) * i as f64 / 5.0;
            let _ = writeln!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0}</text>"#, px(x), H - B + 18.0, x);
        }
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#, (L + W - R) / 2.0, H - 8.0);
        let _ = writeln!(
            s,
            r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">loss</text>"#,
            H / 2.0,
            H / 2.0
        );
        let _ = writeln!(
            s,
            r##"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="#888"/>"##,
            W - L - R,
            H - T - B
        );

        // Event markers: red for rollbacks, orange for skipped steps.
        for (step, e) in &self.events {
            let color = if e == "rollback" { "#d62728" } else { "#ff7f0e" };
            let x = px(*step as f64);
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" x2="{x:.1}" y1="{T}" y2="{}" stroke="{color}" stroke-dasharray="4 3"><title>{} at step {step}</title></line>"#,
                H - B,
                escape(e)
            );
        }
        // Training loss, raw and smoothed.
        let train: Vec<(u64, f64)> = self.train.iter().filter(finite).copied().collect();
        let path = |pts: &[(u64, f64)]| -> String {
            pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x as f64), py(y))).collect::<Vec<_>>().join(" ")
        };
        if !train.is_empty() {
            let _ =
                writeln!(s, r##"<polyline fill="none" stroke="#9ecae1" stroke-width="1" points="{}"/>"##, path(&train));
            let mut avg = Vec::with_capacity(train.len());
            let mut e = train[0].1;
            for &(x, y) in &train {
                e = 0.9 * e + 0.1 * y;
                avg.push((x, e));
            }
            let _ =
                writeln!(s, r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##, path(&avg));
        }
        let valid: Vec<(u64, f64)> = self.valid.iter().filter(finite).copied().collect();
        if !valid.is_empty() {
            let _ =
                writeln!(s, r##"<polyline fill="none" stroke="#2ca02c" stroke-width="2" points="{}"/>"##, path(&valid));
            for &(x, y) in &valid {
                let _ = writeln!(
                    s,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#2ca02c"><title>step {x}: valid {y:.4}</title></circle>"##,
                    px(x as f64),
                    py(y)
                );
            }
        }
        // Legend.
        let lx = W - R - 170.0;
        let items = [("#9ecae1", "train loss"), ("#1f77b4", "train (running mean)"), ("#2ca02c", "valid loss")];
        for (i, (c, label)) in items.iter().enumerate() {
            let y = T + 16.0 + 16.0 * i as f64;
            let _ =
                writeln!(s, r#"<line x1="{lx}" x2="{}" y1="{y}" y2="{y}" stroke="{c}" stroke-width="2"/>"#, lx + 20.0);
            let _ = writeln!(s, r#"<text x="{}" y="{}">{label}</text>"#, lx + 26.0, y + 4.0);
        }
        s.push_str("</svg>\n");
        s
    }
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_points_and_events() {
        let c = LossCurve {
            train: vec![(1, 10.0), (2, 8.0), (3, f64::NAN), (4, 6.0)],
            valid: vec![(4, 6.5)],
            events: vec![(3, "nonfinite_skipped".into())],
        };
        let svg = c.svg("run <x>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("run &lt;x&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("nonfinite_skipped at step 3"));
        assert!(!svg.contains("NaN"));
        assert!(LossCurve::default().svg("empty").contains("no data yet"));
    }
}

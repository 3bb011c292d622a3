//! A grouped bar chart in plain SVG: one group per workload, one bar per system, the height the
//! system's speed-up against a baseline system (log scale, bars grow up from 1× when faster
//! and down when slower). Hovering a bar shows the absolute median.

use std::fmt::Write as _;

use crate::config::{System, Workload};
use crate::report::{fmt_value, speedup, Results};

const COLORS: [&str; 8] = [
    "#9c9c9c", "#76b7b2", "#f28e2b", "#59a14f", "#edc948", "#4e79a7", "#b07aa1", "#e15759",
];

fn color(s: System) -> &'static str {
    let i = System::ALL.iter().position(|x| *x == s).unwrap_or(0);
    COLORS[i % COLORS.len()]
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ratio_label(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}×")
    } else if r >= 1.0 {
        format!("{r:.1}×")
    } else {
        format!("{r:.2}×")
    }
}

/// The chart; `None` if the baseline has no value for any workload.
pub fn chart(
    r: &Results,
    systems: &[System],
    workloads: &[Workload],
    baseline: System,
    subtitle: &str,
) -> Option<String> {
    // (workload, [(system, ratio, median)])
    let mut groups = Vec::new();
    for &w in workloads {
        let Some(base) = r.stats(baseline, w) else {
            continue;
        };
        let bars: Vec<(System, f64, f64)> = systems
            .iter()
            .filter_map(|&s| {
                let st = r.stats(s, w)?;
                Some((s, speedup(w, st.median, base.median)?, st.median))
            })
            .collect();
        if !bars.is_empty() {
            groups.push((w, bars));
        }
    }
    if groups.is_empty() {
        return None;
    }
    let logs = groups
        .iter()
        .flat_map(|(_, b)| b.iter().map(|x| x.1.log2()));
    // Whole powers of two, with room for the value labels beyond the longest bars.
    let (mut lo, mut hi) = (-1.0_f64, 1.0_f64);
    for l in logs {
        lo = lo.min((l - 0.6).floor());
        hi = hi.max((l + 0.6).ceil());
    }
    let (lo, hi) = (lo.max(-7.0), hi.min(7.0));

    let bar_w = 16.0;
    let gap = 22.0;
    let group_w = systems.len() as f64 * bar_w + gap;
    let left = 64.0;
    let right = 16.0;
    let top = 92.0;
    let plot_h = 360.0;
    let bottom = 48.0;
    let width = (left + groups.len() as f64 * group_w + right).max(720.0);
    let height = top + plot_h + bottom;
    let y = |log: f64| top + (hi - log.clamp(lo, hi)) / (hi - lo) * plot_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="22" font-size="16" font-weight="bold">vaultfs-bench: speed-up against {}</text>
<text x="{left}" y="40" font-size="11" fill="#444">{}</text>"##,
        esc(baseline.name()),
        esc(subtitle)
    );
    // Legend.
    let mut lx = left;
    let mut ly = 58.0;
    for &sys in systems {
        let w = 26.0 + 7.0 * sys.name().len() as f64;
        if lx + w > width - right {
            lx = left;
            ly += 16.0;
        }
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            ly - 9.0,
            color(sys),
            lx + 14.0,
            ly,
            esc(sys.name())
        );
        lx += w;
    }
    // Grid lines at powers of two.
    let mut k = lo;
    while k <= hi {
        let yy = y(k);
        let label = if k >= 0.0 {
            format!("{}×", 2f64.powf(k))
        } else {
            format!("1/{}×", 2f64.powf(-k))
        };
        let (stroke, sw) = if k == 0.0 {
            ("#000", 1.2)
        } else {
            ("#ddd", 1.0)
        };
        let _ = writeln!(
            s,
            r#"<line x1="{left}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="{stroke}" stroke-width="{sw}"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"#,
            width - right,
            left - 6.0,
            yy + 4.0,
            esc(&label)
        );
        k += 1.0;
    }
    // Bars.
    for (gi, (w, bars)) in groups.iter().enumerate() {
        let gx = left + gi as f64 * group_w + gap / 2.0;
        for &(sys, ratio, median) in bars {
            let si = systems.iter().position(|x| *x == sys).unwrap_or(0);
            let x = gx + si as f64 * bar_w;
            let (y0, y1) = (y(0.0), y(ratio.log2()));
            let (yt, h) = (y0.min(y1), (y0 - y1).abs().max(1.0));
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{yt:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{} {}: {} {} ({} vs {})</title></rect>"#,
                bar_w - 2.0,
                color(sys),
                esc(sys.name()),
                esc(w.name()),
                fmt_value(median, w.unit()),
                esc(w.unit()),
                ratio_label(ratio),
                esc(baseline.name())
            );
            let cx = x + (bar_w - 2.0) / 2.0 + 3.0;
            let (ty, anchor) = if ratio >= 1.0 {
                (yt - 3.0, "start")
            } else {
                (yt + h + 3.0, "end")
            };
            let _ = writeln!(
                s,
                r#"<text transform="translate({cx:.1},{ty:.1}) rotate(-90)" font-size="9" text-anchor="{anchor}">{}</text>"#,
                esc(&ratio_label(ratio))
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text><text x="{:.1}" y="{:.1}" font-size="10" fill="#666" text-anchor="middle">{}</text>"##,
            gx + systems.len() as f64 * bar_w / 2.0,
            top + plot_h + 18.0,
            esc(w.name()),
            gx + systems.len() as f64 * bar_w / 2.0,
            top + plot_h + 32.0,
            esc(w.unit())
        );
    }
    let _ = writeln!(s, "</svg>");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_bar_per_system_and_workload() {
        let mut r = Results::default();
        r.add(System::Plain, Workload::SeqWrite, 1000.0);
        r.add(System::VaultfsGcm, Workload::SeqWrite, 500.0);
        r.add(System::Plain, Workload::Untar, 1.0);
        r.add(System::VaultfsGcm, Workload::Untar, 2.0);
        let svg = chart(
            &r,
            &[System::Plain, System::VaultfsGcm],
            &[Workload::SeqWrite, Workload::Untar],
            System::Plain,
            "test",
        )
        .unwrap();
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<title>").count(), 4);
        assert!(svg.contains("0.50×"));
    }
}

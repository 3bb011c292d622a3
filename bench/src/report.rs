//! Collecting measurements, and the report: JSON, and the Markdown tables (medians with spread,
//! speed-up against gocryptfs and against plain, FUSE daemon memory).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::config::{Better, Sizes, System, Workload};
use crate::tree::TreeInfo;
use crate::workloads::MemStats;

/// Everything measured so far.
#[derive(Default)]
pub struct Results {
    values: BTreeMap<(System, Workload), Vec<f64>>,
    not_applicable: BTreeSet<(System, Workload)>,
    pub memory: Vec<MemRow>,
    pub errors: Vec<ErrorRow>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemRow {
    pub system: String,
    pub rep: u32,
    #[serde(flatten)]
    pub stats: MemStats,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorRow {
    pub system: String,
    pub rep: u32,
    pub workload: Option<String>,
    pub message: String,
}

impl Results {
    pub fn add(&mut self, s: System, w: Workload, v: f64) {
        self.values.entry((s, w)).or_default().push(v);
    }

    pub fn not_applicable(&mut self, s: System, w: Workload) {
        self.not_applicable.insert((s, w));
    }

    pub fn stats(&self, s: System, w: Workload) -> Option<Stats> {
        self.values.get(&(s, w)).and_then(|v| Stats::of(v))
    }
}

/// Median and spread of the repetitions of one (system, workload).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// (max − min) / median, in percent.
    pub spread_pct: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let (min, max) = (v[0], v[n - 1]);
        let spread_pct = if median > 0.0 {
            (max - min) / median * 100.0
        } else {
            0.0
        };
        Some(Stats {
            median,
            min,
            max,
            spread_pct,
        })
    }
}

/// How much faster `ours` is than `reference` (>1: faster), for either kind of unit.
pub fn speedup(w: Workload, ours: f64, reference: f64) -> Option<f64> {
    let r = match w.better() {
        Better::Higher => ours / reference,
        Better::Lower => reference / ours,
    };
    (r.is_finite() && r > 0.0).then_some(r)
}

#[derive(Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    /// File system (type and mount point) that holds the work directory.
    pub work_dir_fs: String,
    /// /proc/loadavg before and after the run: other load on the machine skews results.
    pub loadavg_start: String,
    pub loadavg_end: String,
}

#[derive(Serialize)]
pub struct ResultRow {
    pub system: String,
    pub workload: String,
    pub unit: &'static str,
    pub better: &'static str,
    pub values: Vec<f64>,
    #[serde(flatten)]
    pub stats: Stats,
}

#[derive(Serialize)]
pub struct Pair {
    pub system: String,
    pub workload: String,
}

#[derive(Serialize)]
pub struct Skipped {
    pub system: String,
    pub reason: String,
}

#[derive(Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub date: String,
    pub command: String,
    pub machine: Machine,
    pub quick: bool,
    pub reps: u32,
    pub reps_done: u32,
    /// False when caches could not be dropped (not root): "cold" workloads ran warm.
    pub cold_cache: bool,
    pub sizes: Sizes,
    pub tree: Option<TreeInfo>,
    pub systems: Vec<String>,
    /// `--version` of the programs behind the systems, and where vaultfs came from.
    pub versions: BTreeMap<String, String>,
    pub skipped: Vec<Skipped>,
    pub workloads: Vec<String>,
    pub results: Vec<ResultRow>,
    /// (system, workload) pairs that do not apply, e.g. mount-time of plain.
    pub not_applicable: Vec<Pair>,
    pub memory: Vec<MemRow>,
    pub errors: Vec<ErrorRow>,
    pub interrupted: bool,
}

impl Report {
    pub fn fill(&mut self, r: &Results, systems: &[System], workloads: &[Workload]) {
        for &w in workloads {
            for &s in systems {
                if let (Some(values), Some(stats)) = (r.values.get(&(s, w)), r.stats(s, w)) {
                    self.results.push(ResultRow {
                        system: s.name().into(),
                        workload: w.name().into(),
                        unit: w.unit(),
                        better: match w.better() {
                            Better::Higher => "higher",
                            Better::Lower => "lower",
                        },
                        values: values.clone(),
                        stats,
                    });
                }
                if r.not_applicable.contains(&(s, w)) {
                    self.not_applicable.push(Pair {
                        system: s.name().into(),
                        workload: w.name().into(),
                    });
                }
            }
        }
        self.memory = r.memory.clone();
        self.errors = r.errors.clone();
    }
}

pub fn fmt_value(v: f64, unit: &str) -> String {
    match unit {
        "IOPS" if v >= 10_000.0 => format!("{:.1}k", v / 1000.0),
        "IOPS" if v >= 1000.0 => format!("{:.2}k", v / 1000.0),
        "IOPS" => format!("{v:.0}"),
        _ if v >= 100.0 => format!("{v:.0}"),
        _ if v >= 10.0 => format!("{v:.1}"),
        _ if v >= 1.0 => format!("{v:.2}"),
        _ if v >= 0.1 => format!("{v:.3}"),
        _ => format!("{v:.4}"),
    }
}

/// The Markdown tables.
pub fn markdown(r: &Results, systems: &[System], workloads: &[Workload], reps: u32) -> String {
    let mut out = String::new();
    let header = |out: &mut String, first: &[&str]| {
        let mut cols: Vec<String> = first.iter().map(|s| s.to_string()).collect();
        cols.extend(systems.iter().map(|s| s.name().to_string()));
        let _ = writeln!(out, "| {} |", cols.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            cols.iter()
                .enumerate()
                .map(|(i, _)| if i < first.len() { "---|" } else { "---:|" })
                .collect::<String>()
        );
    };

    let _ = writeln!(
        out,
        "Medians{} (MB/s and IOPS: higher is better; s: lower is better); \
         `–`: not applicable or not measured.\n",
        if reps > 1 {
            format!(" of {reps} repetitions, (min–max) after each")
        } else {
            " (1 repetition)".to_string()
        }
    );
    header(&mut out, &["workload", "unit"]);
    for &w in workloads {
        let mut row = vec![w.name().to_string(), w.unit().to_string()];
        for &s in systems {
            row.push(match r.stats(s, w) {
                Some(st) if reps > 1 => format!(
                    "{} ({}–{})",
                    fmt_value(st.median, w.unit()),
                    fmt_value(st.min, w.unit()),
                    fmt_value(st.max, w.unit())
                ),
                Some(st) => fmt_value(st.median, w.unit()),
                None => "–".into(),
            });
        }
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }

    for reference in [System::Gocryptfs, System::Plain] {
        if !systems.contains(&reference) {
            let _ = writeln!(
                out,
                "\n(No speed-up table against {}: it was not part of this run.)",
                reference.name()
            );
            continue;
        }
        let _ = writeln!(
            out,
            "\nSpeed-up against {0} (>1 = faster than {0}; MB/s and IOPS: system ÷ {0}; \
             seconds: {0} ÷ system):\n",
            reference.name()
        );
        header(&mut out, &["workload"]);
        for &w in workloads {
            let mut row = vec![w.name().to_string()];
            let base = r.stats(reference, w);
            for &s in systems {
                let cell = match (r.stats(s, w), base) {
                    (Some(a), Some(b)) => speedup(w, a.median, b.median)
                        .map_or("–".to_string(), |x| format!("{x:.2}×")),
                    _ => "–".into(),
                };
                row.push(cell);
            }
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
    }

    if !r.memory.is_empty() {
        let _ = writeln!(
            out,
            "\nFUSE daemon memory during seq-write (largest over the repetitions, MiB):\n"
        );
        let _ = writeln!(
            out,
            "| system | max VmRSS | VmHWM | VmRSS at start → end of the write |"
        );
        let _ = writeln!(out, "|---|---:|---:|---|");
        for &s in systems {
            let rows: Vec<&MemRow> = r.memory.iter().filter(|m| m.system == s.name()).collect();
            let Some(worst) = rows
                .iter()
                .max_by(|a, b| a.stats.max_rss_mib.total_cmp(&b.stats.max_rss_mib))
            else {
                continue;
            };
            let hwm = rows.iter().map(|m| m.stats.hwm_mib).fold(0.0_f64, f64::max);
            let flat = match (worst.stats.samples.first(), worst.stats.samples.last()) {
                (Some(a), Some(b)) => format!(
                    "{:.1} (at {:.0} MiB) → {:.1} (at {:.0} MiB)",
                    a[1], a[0], b[1], b[0]
                ),
                _ => "–".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {:.1} | {:.1} | {} |",
                s.name(),
                worst.stats.max_rss_mib,
                hwm,
                flat
            );
        }
    }
    if !r.errors.is_empty() {
        let _ = writeln!(out, "\nErrors:\n");
        for e in &r.errors {
            let _ = writeln!(
                out,
                "- {} rep {} {}: {}",
                e.system,
                e.rep,
                e.workload.as_deref().unwrap_or("setup"),
                e.message
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.spread_pct, 100.0);
        assert_eq!(Stats::of(&[1.0, 3.0]).unwrap().median, 2.0);
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn speedup_direction() {
        assert_eq!(speedup(Workload::SeqWrite, 300.0, 100.0), Some(3.0));
        assert_eq!(speedup(Workload::Untar, 1.0, 4.0), Some(4.0));
        assert_eq!(speedup(Workload::Untar, 0.0, 4.0), None);
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_value(29_123.0, "IOPS"), "29.1k");
        assert_eq!(fmt_value(975.4, "MB/s"), "975");
        assert_eq!(fmt_value(0.88, "s"), "0.880");
    }
}

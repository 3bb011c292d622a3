//! vaultfs-bench: vaultfs side by side with a plain directory, bindfs (FUSE passthrough),
//! gocryptfs, ext4 on a loop device and kernel fscrypt, on the same workloads.
//!
//! ```text
//! cargo build --release --workspace --bins
//! sudo target/release/vaultfs-bench                        # everything, 3 interleaved reps
//! sudo target/release/vaultfs-bench --quick                # tiny sizes, 1 rep (CI)
//! sudo target/release/vaultfs-bench --reps 5 --systems gocryptfs,vaultfs-gcm \
//!          --workloads seq-write,seq-read --json /tmp/r.json --svg /tmp/r.svg
//! target/release/vaultfs-bench --render /tmp/r.json    # tables and chart again, runs nothing
//! ```
//!
//! Run as root: loop devices, mounts, fscrypt keys and `drop_caches` need it (without root only
//! plain and the FUSE systems run, and "cold" workloads run warm; the JSON says so).
//!
//! Every repetition sets each system up fresh under `--dir` (default /var/tmp/vaultfs-bench),
//! runs the workloads in order (mount-time, seq-write, seq-read, rand-read, rand-write, untar,
//! ls-lR, stat-all, rm-rf, create-delete) and tears it down; systems alternate within a
//! repetition so that drift hits all of them. Each workload starts after `sync` and
//! `echo 3 > /proc/sys/vm/drop_caches`. The report gives the median, min and max per system and
//! workload, the speed-up against gocryptfs and against plain, and the FUSE daemons' memory
//! during seq-write: as a table on stdout and in `results.md`, as JSON (`--json`, default
//! `results.json`) and as an SVG chart (`--svg`, default `results.svg`), all in the work
//! directory. Every mount and loop device is undone on success, error, SIGINT or SIGTERM (a
//! second Ctrl-C exits at once; the next run cleans up what is left under the work directory).
//! A system whose tools are missing is skipped with the reason, or is an error with `--strict`.
//! The exit code is 0 when everything ran, 1 on any error, 2 on a bad command line, 130 after
//! an interrupt.
//! See docs/PERFORMANCE.md.

mod config;
mod progress;
mod report;
mod svg;
mod sys;
mod systems;
mod tree;
mod util;
mod workloads;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};

use config::{Sizes, System, Workload, GIB, MIB};
use progress::Progress;
use report::{ErrorRow, Machine, MemRow, Report, Results, Skipped};
use systems::Env;
use util::Interrupt;

#[derive(Parser, Debug)]
#[command(
    name = "vaultfs-bench",
    version,
    about = "Benchmark vaultfs against plain, bindfs, gocryptfs, ext4 on loop and kernel fscrypt"
)]
struct Args {
    /// Work directory: systems, loop images and the source tarball live here.
    #[arg(long, default_value = "/var/tmp/vaultfs-bench")]
    dir: PathBuf,
    /// Systems to compare, comma-separated [default: all available].
    #[arg(long, value_delimiter = ',')]
    systems: Vec<System>,
    /// Workloads to run, comma-separated [default: all].
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<Workload>,
    /// Interleaved repetitions [default: 3, or 1 with --quick].
    #[arg(long)]
    reps: Option<u32>,
    /// Tiny sizes (16 MiB files, 200-file tree, 500 create/delete), 1 repetition: for CI.
    #[arg(long)]
    quick: bool,
    /// A system that cannot run (missing tool) or any error stops the run.
    #[arg(long)]
    strict: bool,
    /// JSON results [default: DIR/results.json].
    #[arg(long)]
    json: Option<PathBuf>,
    /// SVG chart [default: DIR/results.svg].
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Markdown tables [default: DIR/results.md].
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// The system the chart's bars are relative to [default: gocryptfs, else plain].
    #[arg(long)]
    baseline: Option<System>,
    /// Run nothing: make the tables and the chart again from an earlier run's JSON
    /// (--markdown and --svg default to FILE with .md and .svg).
    #[arg(long, value_name = "FILE")]
    render: Option<PathBuf>,
    /// Directory holding the vaultfs and vaultctl binaries [default: this program's directory].
    #[arg(long)]
    vaultfs_bin_dir: Option<PathBuf>,
    /// Source tree for the untar tarball [default: /usr/include, then ~/.cargo/registry/src,
    /// then /usr/share/doc].
    #[arg(long)]
    tree_source: Option<PathBuf>,
    /// Size of the sequential file in MiB [default: 1024; 16 with --quick].
    #[arg(long)]
    seq_mib: Option<u64>,
    /// Size of the random-I/O file in MiB [default: 256; 16 with --quick].
    #[arg(long)]
    rand_mib: Option<u64>,
    /// 4 KiB operations per random workload [default: 32768; 2000 with --quick].
    #[arg(long)]
    rand_ops: Option<u64>,
    /// Files in the untar tree [default: 6000; 200 with --quick].
    #[arg(long)]
    tree_files: Option<usize>,
    /// Files created and deleted [default: 10000; 500 with --quick].
    #[arg(long)]
    create_files: Option<usize>,
    /// Size of each sparse ext4 loop image in GiB [default: 3].
    #[arg(long)]
    image_gib: Option<u64>,
}

/// The validated configuration, built before any side effect.
struct Config {
    work: PathBuf,
    systems: Vec<System>,
    workloads: Vec<Workload>,
    reps: u32,
    quick: bool,
    strict: bool,
    json: Option<PathBuf>,
    svg: Option<PathBuf>,
    markdown: Option<PathBuf>,
    baseline: Option<System>,
    render: Option<PathBuf>,
    bin_dir: PathBuf,
    tree_source: Option<PathBuf>,
    sizes: Sizes,
}

impl Config {
    fn from_args(a: Args) -> Result<Config> {
        let mut sizes = if a.quick {
            Sizes::quick()
        } else {
            Sizes::full()
        };
        if let Some(m) = a.seq_mib {
            sizes.seq_bytes = m * MIB;
        }
        if let Some(m) = a.rand_mib {
            sizes.rand_file_bytes = m * MIB;
        }
        if let Some(n) = a.rand_ops {
            sizes.rand_ops = n;
        }
        if let Some(n) = a.tree_files {
            sizes.tree_files = n;
        }
        if let Some(n) = a.create_files {
            sizes.create_files = n;
        }
        if let Some(g) = a.image_gib {
            sizes.image_bytes = g * GIB;
        }
        ensure!(sizes.seq_bytes > 0, "--seq-mib must be at least 1");
        ensure!(sizes.rand_file_bytes > 0, "--rand-mib must be at least 1");
        ensure!(sizes.rand_ops > 0, "--rand-ops must be at least 1");
        ensure!(sizes.tree_files > 0, "--tree-files must be at least 1");
        ensure!(sizes.create_files > 0, "--create-files must be at least 1");
        ensure!(sizes.image_bytes > 0, "--image-gib must be at least 1");
        let reps = a.reps.unwrap_or(if a.quick { 1 } else { 3 });
        ensure!(reps >= 1, "--reps must be at least 1");

        let mut systems = if a.systems.is_empty() {
            System::ALL.to_vec()
        } else {
            a.systems
        };
        systems.sort();
        systems.dedup();
        let mut workloads = if a.workloads.is_empty() {
            Workload::ALL.to_vec()
        } else {
            a.workloads
        };
        workloads.sort();
        workloads.dedup();

        let bin_dir = match a.vaultfs_bin_dir {
            Some(d) if d.is_absolute() => d,
            Some(d) => std::env::current_dir()?.join(d),
            None => std::env::current_exe()
                .context("locating this program")?
                .parent()
                .map(Path::to_path_buf)
                .context("this program has no directory")?,
        };
        let work = if a.dir.is_absolute() {
            a.dir
        } else {
            std::env::current_dir()?.join(a.dir)
        };
        Ok(Config {
            work,
            systems,
            workloads,
            reps,
            quick: a.quick,
            strict: a.strict,
            json: a.json,
            svg: a.svg,
            markdown: a.markdown,
            baseline: a.baseline,
            render: a.render,
            bin_dir,
            tree_source: a.tree_source,
            sizes,
        })
    }
}

fn main() -> ExitCode {
    let cfg = match Config::from_args(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vaultfs-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cfg.render.clone() {
        Some(json) => render(cfg, &json),
        None => run(cfg),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vaultfs-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cfg: Config) -> Result<ExitCode> {
    let interrupt = Interrupt::install()?;
    std::fs::create_dir_all(&cfg.work)
        .with_context(|| format!("creating {}", cfg.work.display()))?;
    let work = cfg
        .work
        .canonicalize()
        .with_context(|| format!("resolving {}", cfg.work.display()))?;
    for line in systems::clean_stale(&work)? {
        eprintln!("vaultfs-bench: stale from an earlier run: {line}");
    }
    let run_dir = work.join("run");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)
            .with_context(|| format!("removing {}", run_dir.display()))?;
    }
    std::fs::create_dir(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;

    let env = Env {
        bin_dir: cfg.bin_dir.clone(),
        image_bytes: cfg.sizes.image_bytes,
    };
    let mut systems = Vec::new();
    let mut skipped = Vec::new();
    for &s in &cfg.systems {
        match systems::check_available(s, &env) {
            Ok(()) => systems.push(s),
            Err(reason) if cfg.strict => bail!("{}: {reason}", s.name()),
            Err(reason) => {
                eprintln!("vaultfs-bench: skipping {}: {reason}", s.name());
                skipped.push(Skipped {
                    system: s.name().into(),
                    reason,
                });
            }
        }
    }
    ensure!(!systems.is_empty(), "no system can run here");
    let workloads = cfg.workloads.clone();

    let needs_tree = workloads.iter().any(|w| {
        matches!(
            w,
            Workload::Untar | Workload::LsLr | Workload::StatAll | Workload::RmRf
        )
    });
    let tree = if needs_tree {
        let t = tree::ensure_tarball(&work, cfg.sizes.tree_files, cfg.tree_source.as_deref())?;
        eprintln!(
            "vaultfs-bench: source tree {}: {} files, {} directories, {:.1} MB from {:?}",
            t.tarball.display(),
            t.files,
            t.dirs,
            t.bytes as f64 / 1e6,
            t.sources
        );
        Some(t)
    } else {
        None
    };
    let can_drop_caches = util::sync_and_drop_caches();
    if !can_drop_caches {
        if cfg.strict {
            bail!("cannot write /proc/sys/vm/drop_caches (run as root)");
        }
        eprintln!("vaultfs-bench: cannot drop caches (not root?): cold workloads run warm");
    }

    let loadavg_start = loadavg();
    let per_system = 1 + workloads.len() as u64;
    let progress = Progress::new(u64::from(cfg.reps) * systems.len() as u64 * per_system);
    let ctx = workloads::Ctx::new(
        &cfg.sizes,
        tree.as_ref(),
        &interrupt,
        &progress,
        can_drop_caches,
    );
    let mut results = Results::default();
    let mut reps_done = 0;

    'reps: for rep in 1..=cfg.reps {
        // Repetition 1 runs the systems in the listed order; each later one in a different
        // fixed shuffle, so that no system always follows the same neighbour and inherits its
        // leftovers on the shared disk (the discard and write-back of what the previous system
        // deleted; on a journal-less ext4, inode numbers it just freed, which the allocator
        // skips for minutes).
        let order = rep_order(&systems, rep);
        for &s in &order {
            let tag = format!("rep {rep}/{} {}", cfg.reps, s.name());
            progress.step(format!("{tag}: setting up"));
            let root = run_dir.join(format!("{}-{rep}", s.name()));
            let inst = match systems::setup(s, &root, &env) {
                Ok(i) => i,
                Err(e) => {
                    if interrupt.is_set() {
                        break 'reps;
                    }
                    progress.println(&format!("{tag}: setup failed: {e:#}"));
                    results.errors.push(error_row(s, rep, None, &e));
                    progress.main_inc(per_system);
                    if cfg.strict {
                        break 'reps;
                    }
                    continue;
                }
            };
            progress.inc();
            let mut done = 1;
            for &w in &workloads {
                progress.step(format!("{tag}: {}", w.name()));
                match workloads::run(w, &inst, &ctx) {
                    Ok(Some(m)) => {
                        let mem = m
                            .memory
                            .as_ref()
                            .map(|m| format!(" (daemon VmRSS max {:.1} MiB)", m.max_rss_mib))
                            .unwrap_or_default();
                        progress.println(&format!(
                            "{tag} {}: {} {}{mem}",
                            w.name(),
                            report::fmt_value(m.value, w.unit()),
                            w.unit()
                        ));
                        results.add(s, w, m.value);
                        if let Some(stats) = m.memory {
                            results.memory.push(MemRow {
                                system: s.name().into(),
                                rep,
                                stats,
                            });
                        }
                    }
                    Ok(None) => results.not_applicable(s, w),
                    Err(e) => {
                        if !interrupt.is_set() {
                            progress.println(&format!("{tag} {}: failed: {e:#}", w.name()));
                            results.errors.push(error_row(s, rep, Some(w), &e));
                        }
                        break;
                    }
                }
                progress.inc();
                done += 1;
            }
            progress.main_inc(per_system - done);
            progress.step(format!("{tag}: tearing down"));
            if let Err(e) = inst.teardown() {
                progress.println(&format!("{tag}: teardown failed: {e:#}"));
                results.errors.push(error_row(s, rep, None, &e));
            }
            if interrupt.is_set() || (cfg.strict && !results.errors.is_empty()) {
                break 'reps;
            }
        }
        reps_done = rep;
    }
    progress.finish();
    let interrupted = interrupt.is_set();
    if interrupted {
        eprintln!("vaultfs-bench: interrupted; everything is unmounted; writing partial results");
    }
    if let Err(e) = std::fs::remove_dir(&run_dir) {
        eprintln!("vaultfs-bench: {}: {e}", run_dir.display());
    }

    let mut rep = Report {
        tool: "vaultfs-bench",
        version: env!("CARGO_PKG_VERSION"),
        date: util::utc_now(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(&work, loadavg_start),
        quick: cfg.quick,
        reps: cfg.reps,
        reps_done,
        cold_cache: can_drop_caches,
        sizes: cfg.sizes.clone(),
        tree,
        systems: systems.iter().map(|s| s.name().to_string()).collect(),
        versions: versions(&systems, &env),
        skipped,
        workloads: workloads.iter().map(|w| w.name().to_string()).collect(),
        results: Vec::new(),
        not_applicable: Vec::new(),
        memory: Vec::new(),
        errors: Vec::new(),
        interrupted,
    };
    rep.fill(&results, &systems, &workloads);
    let json = cfg.json.unwrap_or_else(|| work.join("results.json"));
    let value = serde_json::to_value(&rep)?;
    std::fs::write(&json, serde_json::to_vec_pretty(&value)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = cfg.markdown.unwrap_or_else(|| work.join("results.md"));
    let svg_path = cfg.svg.unwrap_or_else(|| work.join("results.svg"));
    let out = Outputs {
        results: &results,
        systems: &systems,
        workloads: &workloads,
        reps_done,
        baseline: cfg.baseline,
    };
    let table = out.write(&value, &md, &svg_path)?;
    println!("{table}");
    eprintln!(
        "vaultfs-bench: wrote {}, {} and {}",
        json.display(),
        md.display(),
        svg_path.display()
    );
    Ok(if interrupted {
        ExitCode::from(130)
    } else if !results.errors.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// What the tables and the chart are made from, in a run or from an earlier run's JSON.
struct Outputs<'a> {
    results: &'a Results,
    systems: &'a [System],
    workloads: &'a [Workload],
    reps_done: u32,
    baseline: Option<System>,
}

impl Outputs<'_> {
    /// Writes the Markdown (with a header from the JSON report `v`) and the chart; returns the
    /// tables.
    fn write(&self, v: &serde_json::Value, md: &Path, svg_path: &Path) -> Result<String> {
        let str_of = |x: &serde_json::Value| x.as_str().unwrap_or_default().to_string();
        let m = &v["machine"];
        let versions = v["versions"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, x)| format!("{k}: {}", str_of(x)))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        let header = format!(
            "vaultfs-bench, {}: `{}`\n\nMachine: {}, {} cores, {} GiB, kernel {}; work directory \
             on {}; load average {} before the run, {} after it.\nVersions: {versions}.\n\n",
            str_of(&v["date"]),
            str_of(&v["command"]),
            str_of(&m["cpu"]),
            m["cores"],
            m["memory_gib"],
            str_of(&m["kernel"]),
            str_of(&m["work_dir_fs"]),
            str_of(&m["loadavg_start"]),
            str_of(&m["loadavg_end"]),
        );
        let table = report::markdown(
            self.results,
            self.systems,
            self.workloads,
            self.reps_done.max(1),
        );
        std::fs::write(md, format!("{header}{table}"))
            .with_context(|| format!("writing {}", md.display()))?;
        let Some(&first) = self.systems.first() else {
            return Ok(table);
        };
        let baseline = self
            .baseline
            .unwrap_or(if self.systems.contains(&System::Gocryptfs) {
                System::Gocryptfs
            } else if self.systems.contains(&System::Plain) {
                System::Plain
            } else {
                first
            });
        let subtitle = format!(
            "median of {} rep(s), {}; log scale; >1 = faster than {b}; MB/s, IOPS: system ÷ {b}; \
             seconds: {b} ÷ system",
            self.reps_done,
            str_of(&v["date"]),
            b = baseline.name()
        );
        match svg::chart(
            self.results,
            self.systems,
            self.workloads,
            baseline,
            &subtitle,
        ) {
            Some(s) => std::fs::write(svg_path, s)
                .with_context(|| format!("writing {}", svg_path.display()))?,
            None => eprintln!(
                "vaultfs-bench: no chart: the baseline {} has no results",
                baseline.name()
            ),
        }
        Ok(table)
    }
}

/// `--render FILE`: the tables and the chart again from an earlier run's JSON; runs nothing.
fn render(cfg: Config, json: &Path) -> Result<ExitCode> {
    let bytes = std::fs::read(json).with_context(|| format!("reading {}", json.display()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", json.display()))?;
    let names = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let system = |n: &str| System::from_str(n, false).map_err(|e| anyhow::anyhow!(e));
    let workload = |n: &str| Workload::from_str(n, false).map_err(|e| anyhow::anyhow!(e));
    let systems = names("systems")
        .iter()
        .map(|n| system(n))
        .collect::<Result<Vec<_>>>()?;
    let workloads = names("workloads")
        .iter()
        .map(|n| workload(n))
        .collect::<Result<Vec<_>>>()?;
    let mut results = Results::default();
    for row in v["results"].as_array().into_iter().flatten() {
        let s = system(row["system"].as_str().unwrap_or_default())?;
        let w = workload(row["workload"].as_str().unwrap_or_default())?;
        for x in row["values"].as_array().into_iter().flatten() {
            if let Some(x) = x.as_f64() {
                results.add(s, w, x);
            }
        }
    }
    for row in v["not_applicable"].as_array().into_iter().flatten() {
        results.not_applicable(
            system(row["system"].as_str().unwrap_or_default())?,
            workload(row["workload"].as_str().unwrap_or_default())?,
        );
    }
    results.memory = serde_json::from_value(v["memory"].clone()).context("memory rows")?;
    results.errors = serde_json::from_value(v["errors"].clone()).context("error rows")?;
    let reps_done = v["reps_done"].as_u64().unwrap_or(1) as u32;
    let md = cfg.markdown.unwrap_or_else(|| json.with_extension("md"));
    let svg_path = cfg.svg.unwrap_or_else(|| json.with_extension("svg"));
    let out = Outputs {
        results: &results,
        systems: &systems,
        workloads: &workloads,
        reps_done,
        baseline: cfg.baseline,
    };
    let table = out.write(&v, &md, &svg_path)?;
    println!("{table}");
    eprintln!(
        "vaultfs-bench: wrote {} and {}",
        md.display(),
        svg_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn error_row(s: System, rep: u32, w: Option<Workload>, e: &anyhow::Error) -> ErrorRow {
    ErrorRow {
        system: s.name().into(),
        rep,
        workload: w.map(|w| w.name().to_string()),
        message: format!("{e:#}"),
    }
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// First line that `PROGRAM ARG` prints (on stdout, else stderr), or an empty string.
fn version_of(program: &Path, arg: &str) -> String {
    std::process::Command::new(program)
        .arg(arg)
        .stdin(std::process::Stdio::null())
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn versions(systems: &[System], env: &Env) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    for &s in systems {
        match s {
            System::Bindfs => {
                v.insert(
                    "bindfs".into(),
                    version_of(Path::new("bindfs"), "--version"),
                );
            }
            System::Gocryptfs => {
                v.insert(
                    "gocryptfs".into(),
                    version_of(Path::new("gocryptfs"), "-version"),
                );
            }
            System::VaultfsGcm | System::VaultfsXts | System::VaultfsXtsLoop => {
                let bin = env.bin_dir.join("vaultfs");
                v.insert(
                    "vaultfs".into(),
                    format!("{} ({})", version_of(&bin, "--version"), bin.display()),
                );
            }
            System::Ext4Loop | System::Fscrypt => {
                v.insert("mkfs.ext4".into(), version_of(Path::new("mkfs.ext4"), "-V"));
            }
            System::Plain | System::PlainDirect => {}
        }
    }
    v
}

fn machine(work: &Path, loadavg_start: String) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let memory_kib: f64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let work_dir_fs = util::mounts()
        .ok()
        .and_then(|ms| {
            ms.into_iter()
                .filter(|m| work.starts_with(&m.mount_point))
                .max_by_key(|m| m.mount_point.as_os_str().len())
        })
        .map(|m| format!("{} ({})", m.fstype, m.mount_point.display()))
        .unwrap_or_default();
    Machine {
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        work_dir_fs,
        loadavg_start,
        loadavg_end: loadavg(),
    }
}

/// The order of the systems in repetition `rep` (1-based): as listed for the first, then a
/// Fisher-Yates shuffle seeded by the repetition number (the same on every run).
fn rep_order<T: Copy>(systems: &[T], rep: u32) -> Vec<T> {
    let mut order = systems.to_vec();
    if rep <= 1 {
        return order;
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(rep).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    for i in (1..order.len()).rev() {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let j = (r % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::rep_order;

    #[test]
    fn repetition_orders_are_permutations_with_changing_neighbours() {
        let systems: Vec<u32> = (0..8).collect();
        assert_eq!(rep_order(&systems, 1), systems);
        let orders: Vec<Vec<u32>> = (1..=3).map(|r| rep_order(&systems, r)).collect();
        for o in &orders {
            let mut sorted = o.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, systems);
        }
        // Deterministic from run to run.
        assert_eq!(rep_order(&systems, 2), orders[1]);
        // Over the three repetitions, most systems have more than one predecessor.
        let pred = |o: &Vec<u32>, x: u32| {
            let i = o.iter().position(|&y| y == x).unwrap();
            (i > 0).then(|| o[i - 1])
        };
        let varied = systems
            .iter()
            .filter(|&&x| {
                let p: std::collections::HashSet<_> = orders.iter().map(|o| pred(o, x)).collect();
                p.len() > 1
            })
            .count();
        assert!(varied >= 6, "only {varied} systems change predecessor");
    }
}

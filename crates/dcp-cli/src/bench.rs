//! `dcp bench`: how close dcp runs to the speed of the hardware.
//!
//! Every scenario runs, in the same process and directory, dcp and the
//! physical baseline on the same bytes:
//!
//! * `save` / `save_nosync`: a collective save by N simulated ranks (plan,
//!   write, fsync with `--sync 1`, commit), against a raw write of the same
//!   bytes into as many files as dcp wrote (one thread per file, one
//!   `write_all` each, `sync_all` with sync, then a directory fsync).
//! * `load_warm` / `load_cold`: N ranks load the sharding that was saved;
//!   `reshard_warm` / `reshard_cold`: M ranks load the transposed sharding
//!   (rows become columns). The baseline reads the raw mirror of the
//!   checkpoint's data files whole, one thread per file, into resident
//!   buffers, from the same cache state. Cold means every data file was
//!   dropped from the page cache first (`sys::COLD_METHOD`).
//!
//! Untimed: generating the state dicts, allocating and touching destination
//! and baseline buffers, removing earlier files, `sync(2)` before each timed
//! phase (so writeback of earlier work does not land in it), and checking
//! the loaded bytes (first repetition). `ratio = raw_seconds / seconds`
//! (1.0: dcp runs at the limit), from medians over `--reps`.

mod mpi;
mod scale;
mod staging;
pub use staging::memcpy_seconds;
pub(crate) mod sys;
pub mod workload;

use crate::demo::Format;
use crate::model::ModelSpec;
use crate::{human_bytes, CliError, Progress};
use clap::{Args, ValueEnum};
use dcp_core::local::run_ranks;
use dcp_core::{
    Collective, DestStateDict, FileSystemReader, FileSystemWriter, Metadata, ReaderOptions,
    SaveOptions, StateDict, WriterOptions,
};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use workload::{Workload, WorkloadKind, DEFAULT_SMALL_ITEMS};

/// Deadline of each collective operation among the simulated ranks.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(1800);

/// A scenario family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScenarioKind {
    /// Save by N ranks.
    Save,
    /// Load by N ranks into the sharding that was saved.
    Load,
    /// Load by M ranks into the transposed sharding.
    Reshard,
    /// The same resharded load through dcp-fsspec's reader (torch's
    /// `FsspecReader`) on a `file://` URL: OpenDAL's local backend, with
    /// buffer lending between ranks kept (needs the `object-store` feature).
    ReshardFsspec,
    /// An asynchronous save (`AsyncSaver`): its blocking time against a
    /// plain copy of the same state dicts, and the peak RSS.
    Async,
    /// A save of tensors in simulated device memory (20 GB/s copies): its
    /// time against the larger of the copy time and a raw write.
    Device,
    /// A load into simulated device memory (20 GB/s copies, warm cache):
    /// its time against the larger of the copy time and a raw read.
    DeviceLoad,
}

/// Arguments of `dcp bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The state dict to save and load.
    #[arg(long, value_enum, default_value_t = WorkloadKind::Llm)]
    pub workload: WorkloadKind,
    /// Transformer layers [default: llm 10, optimizer 4].
    #[arg(long)]
    pub layers: Option<u64>,
    /// Hidden size [default: llm 2048, optimizer 1024].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub hidden: Option<u64>,
    /// Vocabulary size [default: 32000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub vocab: Option<u64>,
    /// Tensors of the many-small workload [default: 100000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub items: Option<u64>,
    /// Local directory to work in (its own subdirectories are created and
    /// removed) (default: dcp-bench in the system temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Ranks that save and load [default: llm 4, many-small 4, optimizer 8,
    /// scale 1024 (simulated)].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub ranks: Option<u32>,
    /// Chunks each simulated rank holds (the scale workload: one row of
    /// each of this many tensors).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub chunks_per_rank: u64,
    /// Ranks that load resharded [default: llm 3, many-small 3, optimizer 6].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub load_ranks: Option<u32>,
    /// I/O threads (and data files) per rank.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,
    /// Saves with fsync (1) or without (0) [default: both].
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub sync: Option<u8>,
    /// Data file layout.
    #[arg(long, value_enum, default_value_t = Format::Raw)]
    pub format: Format,
    /// Checksum every record as stored: crc32c (the default, as for every
    /// save), crc32, or none (bytes moved as they are, nothing verified).
    #[arg(long, default_value = "crc32c", value_parser = ["none", "crc32c", "crc32"])]
    pub checksum: String,
    /// Repetitions of every timed phase (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub reps: u32,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [ScenarioKind::Save, ScenarioKind::Load, ScenarioKind::Reshard, ScenarioKind::ReshardFsspec])]
    pub scenarios: Vec<ScenarioKind>,
    /// Do not check the loaded bytes (checked once per load scenario).
    #[arg(long)]
    pub no_verify: bool,
    /// Keep the checkpoint and baseline files.
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object per scenario and line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Run as one rank of an MPI job (under `mpirun -n N` or `srun`): the
    /// N processes save and load, rank 0 runs the raw baseline and prints
    /// the report. Scenarios save, load, reshard and reshard-fsspec; the
    /// reshard runs on the first `--load-ranks` processes. Needs a dcp
    /// built with the `mpi` feature.
    #[arg(long, conflicts_with = "ranks")]
    pub mpi: bool,
    /// Copy bandwidth of each lane of the simulated device of the `device`
    /// and `device-load` scenarios, in GB/s (PCIe 4.0 x16 in practice).
    #[arg(long, default_value_t = staging::DEVICE_BANDWIDTH / 1e9, value_parser = positive_gbps)]
    pub device_gbps: f64,
}

/// A positive, finite bandwidth in GB/s.
fn positive_gbps(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of GB/s")),
    }
}

/// One line of `dcp bench --json`: one scenario, medians over the reps.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchRecord {
    /// `llm`, `many-small` or `optimizer`.
    pub workload: &'static str,
    /// `save`, `save_nosync`, `load_warm`, `load_cold`, `reshard_warm`,
    /// `reshard_cold`.
    pub scenario: String,
    /// How the ranks talked: `local` (tasks of one process, a
    /// `LocalGroup`) or `mpi` (the processes of an MPI job).
    pub collective: &'static str,
    /// Ranks that ran the scenario.
    pub ranks: u32,
    /// Ranks that saved the checkpoint.
    pub save_ranks: u32,
    /// I/O threads per rank.
    pub threads: u32,
    /// Whether the save fsynced (for loads: the checkpoint's save).
    pub sync: bool,
    /// Data file layout.
    pub format: &'static str,
    /// Checksum of every record (`none`, `crc32c`, `crc32`).
    pub checksum: String,
    /// `warm` or `cold` for loads.
    pub cache: Option<&'static str>,
    /// How cold loads were made cold.
    pub cold_method: Option<&'static str>,
    /// Items in the checkpoint.
    pub items: usize,
    /// Records (chunks and bytes items) in the checkpoint.
    pub chunks: usize,
    /// Logical bytes of the state dict.
    pub bytes: u64,
    /// Bytes of the checkpoint's data files.
    pub checkpoint_bytes: u64,
    /// Data files (and baseline files).
    pub files: usize,
    /// Median seconds of dcp.
    pub seconds: f64,
    /// Median seconds of the raw baseline.
    pub raw_seconds: f64,
    /// `raw_seconds / seconds`: 1.0 is the limit.
    pub ratio: f64,
    /// dcp throughput, 10^9 logical bytes per second.
    pub gbps: f64,
    /// Baseline throughput, 10^9 bytes per second.
    pub raw_gbps: f64,
    /// Bytes all ranks read from storage (loads; median rep).
    pub bytes_read: u64,
    /// `bytes_read / checkpoint_bytes`.
    pub read_amplification: f64,
    /// Read requests of all ranks (loads; median rep).
    pub read_requests: u64,
    /// Peak resident set (VmHWM) during dcp's phase, bytes (largest rep);
    /// under MPI, the sum of every process's peak.
    pub peak_rss: u64,
    /// Resident set when dcp's phase started (state dicts, destinations);
    /// under MPI, the sum over the processes.
    pub base_rss: u64,
    /// Whether the peak could be reset before each phase (else it is the
    /// process's peak so far).
    pub peak_rss_reset: bool,
    /// Bytes of `.metadata`.
    pub metadata_bytes: u64,
    /// `metadata_bytes / chunks`.
    pub metadata_bytes_per_chunk: f64,
    /// Repetitions.
    pub reps: u32,
    /// dcp's seconds, every rep.
    pub seconds_all: Vec<f64>,
    /// The baseline's seconds, every rep.
    pub raw_seconds_all: Vec<f64>,
    /// Whether the loaded bytes matched (`null`: not checked).
    pub verified: Option<bool>,
}

/// The median of `v` (mean of the middle two for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Where a run works and what it measures.
struct Bench {
    args: BenchArgs,
    workload: Workload,
    ranks: usize,
    load_ranks: usize,
    ckpt: PathBuf,
    raw: PathBuf,
    rt: tokio::runtime::Runtime,
    cold: Result<&'static str, String>,
    progress: Progress,
}

/// Run `dcp bench`.
pub fn run(args: BenchArgs) -> Result<ExitCode, CliError> {
    if args.mpi {
        return mpi::run(args);
    }
    if args.workload == WorkloadKind::Scale {
        return scale::run(&args);
    }
    if args.ranks.is_some_and(|r| r > 4096) {
        return Err(CliError::usage(
            "--ranks above 4096 is for the scale workload (simulated ranks)",
        ));
    }
    let (workload, ranks, load_ranks) = build_workload(&args);
    let root = root_dir(&args)?;
    std::fs::create_dir_all(&root)
        .map_err(|e| CliError::msg(format!("cannot create {}: {e}", root.display())))?;
    let name = workload.kind.name();
    let mut b = Bench {
        ckpt: root.join(format!("{name}-dcp")),
        raw: root.join(format!("{name}-raw")),
        cold: sys::probe_cold(&root),
        rt: crate::runtime()?,
        progress: Progress::new(),
        ranks: ranks as usize,
        load_ranks: load_ranks as usize,
        workload,
        args,
    };
    let result = b.run_all();
    if !b.args.keep {
        let _ = sys::remove_dir(&b.ckpt);
        let _ = sys::remove_dir(&b.raw);
    }
    let records = result?;
    print_report(&b, &records)
}

/// The local directory `--dir` names (a path or `file:///path`; refuses
/// other URLs: the baseline and cold loads need local files).
fn root_dir(args: &BenchArgs) -> Result<PathBuf, CliError> {
    Ok(match args.dir.as_deref().and_then(Path::to_str) {
        Some(d) if d.starts_with("file://") => PathBuf::from(&d["file://".len()..]),
        Some(d) if d.contains("://") => {
            return Err(CliError::usage(format!(
                "{d}: dcp bench measures a local directory (a path or file:///path)"
            )))
        }
        _ => args
            .dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("dcp-bench")),
    })
}

/// Print the records (JSON lines or the table); exit status 1 when loaded
/// bytes differed.
fn print_report(b: &Bench, records: &[BenchRecord]) -> Result<ExitCode, CliError> {
    if b.args.json {
        let mut out = String::new();
        for r in records {
            let line = serde_json::to_string(r)
                .map_err(|e| CliError::msg(format!("cannot encode the report: {e}")))?;
            outln!(out, "{line}");
        }
        crate::emit(&out)?;
    } else {
        crate::emit(&table(b, records))?;
    }
    if records.iter().any(|r| r.verified == Some(false)) {
        eprintln!("error: loaded bytes differ from what was saved");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// The workload and the rank counts the arguments ask for.
fn build_workload(args: &BenchArgs) -> (Workload, u32, u32) {
    let spec = |layers, hidden| ModelSpec {
        layers: args.layers.unwrap_or(layers),
        hidden: args.hidden.unwrap_or(hidden),
        vocab: args.vocab.unwrap_or(32_000),
        seed: 0,
    };
    let (w, n, m) = match args.workload {
        // The scale workload never gets here (`run` hands it to `scale`).
        WorkloadKind::Llm | WorkloadKind::Scale => (Workload::llm(&spec(10, 2048)), 4, 3),
        WorkloadKind::Optimizer => (Workload::optimizer(&spec(4, 1024)), 8, 6),
        WorkloadKind::ManySmall => (
            Workload::many_small(args.items.unwrap_or(DEFAULT_SMALL_ITEMS), 0),
            4,
            3,
        ),
    };
    (w, args.ranks.unwrap_or(n), args.load_ranks.unwrap_or(m))
}

/// One repetition's measurements.
#[derive(Default)]
struct Rep {
    seconds: f64,
    raw_seconds: f64,
    bytes_read: u64,
    requests: u64,
    peak_rss: u64,
    base_rss: u64,
}

impl Bench {
    fn run_all(&mut self) -> Result<Vec<BenchRecord>, CliError> {
        let kinds = self.args.scenarios.clone();
        let wants = |k| kinds.contains(&k);
        let syncs: Vec<bool> = match self.args.sync {
            Some(s) => vec![s == 1],
            None => vec![true, false],
        };
        self.progress.phase(format_args!(
            "generating {} ({}) for {} ranks",
            self.workload.kind.name(),
            human_bytes(self.workload.total_bytes()),
            self.ranks
        ));
        let sds = Arc::new(self.workload.state_dicts(self.ranks)?);
        let mut out = Vec::new();
        let mut saved: Option<(Arc<Metadata>, bool)> = None;
        if wants(ScenarioKind::Async) {
            out.push(self.async_scenario(&sds, syncs[0])?);
        }
        if wants(ScenarioKind::Device) {
            out.push(self.device_scenario(&sds, syncs[0])?);
        }
        if wants(ScenarioKind::Save) {
            for &sync in &syncs {
                let (rec, md) = self.save_scenario(&sds, sync)?;
                out.push(rec);
                saved = Some((md, sync));
            }
        }
        if !wants(ScenarioKind::Load)
            && !wants(ScenarioKind::Reshard)
            && !wants(ScenarioKind::ReshardFsspec)
            && !wants(ScenarioKind::DeviceLoad)
        {
            return Ok(out);
        }
        let (md, sync) = match saved {
            Some(s) => s,
            None => {
                let sync = syncs[0];
                self.progress.phase("saving the checkpoint to load");
                sys::remove_dir(&self.ckpt).map_err(|e| self.io_err(&self.ckpt, e))?;
                (self.save_once(&sds, sync)?, sync)
            }
        };
        // The baseline's files: the raw mirror of the checkpoint's.
        let raw_files = sys::mirror(&md, &sds).map_err(CliError::msg)?;
        drop(sds);
        sys::remove_dir(&self.raw).map_err(|e| self.io_err(&self.raw, e))?;
        std::fs::create_dir_all(&self.raw).map_err(|e| self.io_err(&self.raw, e))?;
        let images: Vec<Vec<u8>> = raw_files.iter().map(sys::RawFile::image).collect();
        sys::raw_write(&self.raw, &images, true, None).map_err(|e| self.io_err(&self.raw, e))?;
        let lens: Vec<usize> = images.iter().map(Vec::len).collect();
        drop(images);
        drop(raw_files);
        if wants(ScenarioKind::DeviceLoad) {
            out.push(self.device_load_scenario(&md, sync, &lens)?);
        }
        for kind in [
            ScenarioKind::Load,
            ScenarioKind::Reshard,
            ScenarioKind::ReshardFsspec,
        ] {
            if !wants(kind) {
                continue;
            }
            for cold in [false, true] {
                out.push(self.load_scenario(&md, sync, &lens, kind, cold)?);
            }
        }
        Ok(out)
    }

    /// The checkpoint's reader through dcp-fsspec on `file://` (what a
    /// torch user's `FsspecReader` gets).
    #[cfg(feature = "object-store")]
    fn fsspec_reader(&self, options: ReaderOptions) -> Result<FileSystemReader, CliError> {
        let abs = std::path::absolute(&self.ckpt).map_err(|e| self.io_err(&self.ckpt, e))?;
        let url = format!("file://{}", abs.display());
        Ok(dcp::fsspec::reader(
            &url,
            &std::collections::HashMap::new(),
            options,
        )?)
    }

    #[cfg(not(feature = "object-store"))]
    fn fsspec_reader(&self, _options: ReaderOptions) -> Result<FileSystemReader, CliError> {
        Err(CliError::msg(
            "this dcp was built without the object-store feature",
        ))
    }

    /// The checksum the raw baseline computes, matching what dcp records
    /// (`--checksum`): the physical limit of a checksummed save or verified
    /// load includes one pass of it over every byte.
    fn raw_checksum(&self) -> Option<sys::Checksum> {
        match self.args.checksum.as_str() {
            "crc32c" => Some(dcp::Crc32c::checksum),
            "crc32" => Some(dcp::ext::Crc32::checksum),
            _ => None,
        }
    }

    fn io_err(&self, p: &Path, e: std::io::Error) -> CliError {
        CliError::msg(format!("{}: {e}", p.display()))
    }

    fn writer(&self, sync: bool) -> Result<FileSystemWriter, CliError> {
        Ok(FileSystemWriter::new(
            Arc::new(dcp::fs::LocalFs::new(&self.ckpt)),
            WriterOptions::default()
                .thread_count(self.args.threads as usize)
                .sync_files(sync)
                .overwrite(true)
                .serialization_format(self.args.format.serialization_format())
                .extensions(
                    dcp::ext::checksum_from_name(&self.args.checksum)?
                        .into_iter()
                        .collect(),
                ),
        )?)
    }

    /// One collective save into the (emptied) checkpoint directory.
    fn save_once(&self, sds: &Arc<Vec<StateDict>>, sync: bool) -> Result<Arc<Metadata>, CliError> {
        let writer = self.writer(sync)?;
        let sds = sds.clone();
        let results = self
            .rt
            .block_on(run_ranks(self.ranks, COLLECTIVE_TIMEOUT, move |g| {
                let (sds, writer) = (sds.clone(), writer.clone());
                async move {
                    dcp_core::save_with(&sds[g.rank()], &writer, &g, &SaveOptions::default()).await
                }
            }));
        let first = results
            .into_iter()
            .collect::<dcp_core::Result<Vec<_>>>()?
            .into_iter()
            .next()
            .ok_or_else(|| CliError::msg("no rank ran"))?;
        Ok(first.metadata)
    }

    fn save_scenario(
        &self,
        sds: &Arc<Vec<StateDict>>,
        sync: bool,
    ) -> Result<(BenchRecord, Arc<Metadata>), CliError> {
        let label = if sync { "save" } else { "save_nosync" };
        let mut reps = Vec::new();
        let mut md = None;
        let mut images: Option<Vec<Vec<u8>>> = None;
        let mut reset = true;
        // One untimed warm-up: on a virtual machine the first use of a
        // memory page costs far more than later ones, and whichever side
        // ran first would pay for the page cache it grows into.
        for rep in 0..=self.args.reps {
            let timed = rep > 0;
            self.progress.phase(format_args!(
                "{label}: {} with {} ranks",
                if timed { "rep" } else { "warm-up" },
                self.ranks
            ));
            let mut r = Rep::default();
            sys::remove_dir(&self.ckpt).map_err(|e| self.io_err(&self.ckpt, e))?;
            sys::remove_dir(&self.raw).map_err(|e| self.io_err(&self.raw, e))?;
            sys::sync_everything();
            reset &= sys::reset_peak_rss();
            r.base_rss = sys::status_bytes("VmRSS").unwrap_or(0);
            let started = Instant::now();
            let m = self.save_once(sds, sync)?;
            r.seconds = started.elapsed().as_secs_f64();
            r.peak_rss = sys::status_bytes("VmHWM").unwrap_or(0);
            // The baseline: the same bytes into as many files, in buffers
            // built once and kept (so neither side allocates while timed).
            if images.is_none() {
                images = Some(
                    sys::mirror(&m, sds)
                        .map_err(CliError::msg)?
                        .iter()
                        .map(sys::RawFile::image)
                        .collect(),
                );
            }
            // Each side starts with the other's files out of the page
            // cache: dcp's dropped here, the baseline's removed above.
            if self.cold.is_ok() {
                let files = sys::files_in(&self.ckpt).map_err(|e| self.io_err(&self.ckpt, e))?;
                sys::drop_from_cache(&files).map_err(CliError::msg)?;
            }
            std::fs::create_dir_all(&self.raw).map_err(|e| self.io_err(&self.raw, e))?;
            sys::sync_everything();
            let images = images.as_deref().expect("built above");
            let started = Instant::now();
            sys::raw_write(&self.raw, images, sync, self.raw_checksum())
                .map_err(|e| self.io_err(&self.raw, e))?;
            r.raw_seconds = started.elapsed().as_secs_f64();
            md = Some(m);
            if timed {
                reps.push(r);
            }
        }
        let md = md.expect("reps >= 1");
        let mut rec = self.record(&md, label, self.ranks as u32, sync, &reps)?;
        rec.peak_rss_reset = reset;
        Ok((rec, md))
    }

    fn load_scenario(
        &self,
        md: &Metadata,
        sync: bool,
        raw_lens: &[usize],
        kind: ScenarioKind,
        cold: bool,
    ) -> Result<BenchRecord, CliError> {
        let reshard = kind != ScenarioKind::Load;
        let family = match kind {
            ScenarioKind::ReshardFsspec => "reshard_fsspec",
            ScenarioKind::Reshard => "reshard",
            _ => "load",
        };
        let label = format!("{family}_{}", if cold { "cold" } else { "warm" });
        let n = if reshard { self.load_ranks } else { self.ranks };
        let cold_method = match (&self.cold, cold) {
            (_, false) => None,
            (Ok(m), true) => Some(*m),
            (Err(e), true) => {
                eprintln!("dcp bench: {label}: cold not available ({e}); skipped");
                return Ok(BenchRecord {
                    workload: self.workload.kind.name(),
                    scenario: label,
                    cold_method: Some("cold not available"),
                    ..BenchRecord::default()
                });
            }
        };
        let options = ReaderOptions::default()
            .thread_count(self.args.threads as usize)
            .registry(crate::registry());
        let reader = if kind == ScenarioKind::ReshardFsspec {
            match self.fsspec_reader(options) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("dcp bench: {label}: not available ({e}); skipped");
                    return Ok(BenchRecord {
                        workload: self.workload.kind.name(),
                        scenario: label,
                        cold_method: Some("not available"),
                        ..BenchRecord::default()
                    });
                }
            }
        } else {
            FileSystemReader::new(Arc::new(dcp::fs::LocalFs::new(&self.ckpt)), options)
        };
        let ckpt_files = sys::files_in(&self.ckpt).map_err(|e| self.io_err(&self.ckpt, e))?;
        let raw_files: Vec<PathBuf> = (0..raw_lens.len())
            .map(|i| sys::raw_path(&self.raw, i))
            .collect();
        let mut reps = Vec::new();
        let mut verified = None;
        let mut reset = true;
        // Warm: one untimed pass of each first, so both start from the cache.
        let warmups = usize::from(!cold);
        for rep in 0..warmups + self.args.reps as usize {
            let timed = rep >= warmups;
            self.progress.phase(format_args!(
                "{label}: {} with {n} ranks",
                if timed { "rep" } else { "warm-up" }
            ));
            let mut r = Rep::default();
            let dests: Vec<Option<DestStateDict>> = (0..n)
                .map(|k| self.workload.dest(k, n, reshard).map(Some))
                .collect::<dcp_core::Result<_>>()?;
            let dests = Arc::new(Mutex::new(dests));
            if cold {
                sys::drop_from_cache(&ckpt_files).map_err(CliError::msg)?;
            }
            sys::sync_everything();
            reset &= sys::reset_peak_rss();
            r.base_rss = sys::status_bytes("VmRSS").unwrap_or(0);
            let reader = reader.clone();
            let started = Instant::now();
            let results = self.rt.block_on(run_ranks(n, COLLECTIVE_TIMEOUT, move |g| {
                let (dests, reader) = (dests.clone(), reader.clone());
                async move {
                    let dest = dests.lock().unwrap_or_else(|p| p.into_inner())[g.rank()]
                        .take()
                        .expect("each rank takes its own destination once");
                    dcp_core::load(dest, &reader, &g).await
                }
            }));
            r.seconds = started.elapsed().as_secs_f64();
            r.peak_rss = sys::status_bytes("VmHWM").unwrap_or(0);
            let loaded = results.into_iter().collect::<dcp_core::Result<Vec<_>>>()?;
            r.bytes_read = loaded.iter().map(|l| l.stats.bytes_read).sum();
            r.requests = loaded.iter().map(|l| l.stats.requests).sum();
            if timed && verified.is_none() && !self.args.no_verify {
                let sds: Vec<DestStateDict> = loaded.into_iter().map(|l| l.state_dict).collect();
                let bad = self.workload.check(&sds);
                for line in bad.iter().take(10) {
                    eprintln!("mismatch: {label}: {line}");
                }
                verified = Some(bad.is_empty());
            } else {
                drop(loaded);
            }
            // The baseline: every raw file read whole, from the same state.
            let mut bufs: Vec<Vec<u8>> = raw_lens
                .iter()
                .map(|&l| vec![crate::model::POISON; l])
                .collect();
            if cold {
                sys::drop_from_cache(&raw_files).map_err(CliError::msg)?;
            }
            sys::sync_everything();
            let started = Instant::now();
            sys::raw_read(&self.raw, &mut bufs, self.raw_checksum())
                .map_err(|e| self.io_err(&self.raw, e))?;
            r.raw_seconds = started.elapsed().as_secs_f64();
            drop(bufs);
            if timed {
                reps.push(r);
            }
        }
        let mut rec = self.record(md, &label, n as u32, sync, &reps)?;
        rec.cache = Some(if cold { "cold" } else { "warm" });
        rec.cold_method = cold_method;
        rec.verified = verified;
        rec.peak_rss_reset = reset;
        Ok(rec)
    }

    /// A scenario's record from its reps.
    fn record(
        &self,
        md: &Metadata,
        label: &str,
        ranks: u32,
        sync: bool,
        reps: &[Rep],
    ) -> Result<BenchRecord, CliError> {
        let seconds_all: Vec<f64> = reps.iter().map(|r| r.seconds).collect();
        let raw_seconds_all: Vec<f64> = reps.iter().map(|r| r.raw_seconds).collect();
        let seconds = median(&seconds_all);
        let raw_seconds = median(&raw_seconds_all);
        // The rep whose time is the median (lower middle) gives the counts.
        let mid = {
            let mut idx: Vec<usize> = (0..reps.len()).collect();
            idx.sort_by(|&a, &b| reps[a].seconds.total_cmp(&reps[b].seconds));
            idx[(idx.len() - 1) / 2]
        };
        let bytes = md.logical_bytes();
        let checkpoint_bytes: u64 = md.files.iter().map(|f| f.length).sum();
        let chunks = md.record_count();
        let metadata_bytes = std::fs::metadata(self.ckpt.join(dcp_core::storage::METADATA_FILE))
            .map(|m| m.len())
            .map_err(|e| self.io_err(&self.ckpt, e))?;
        let per_s = |b: u64, s: f64| if s > 0.0 { b as f64 / s / 1e9 } else { 0.0 };
        let bytes_read = reps[mid].bytes_read;
        Ok(BenchRecord {
            workload: self.workload.kind.name(),
            scenario: label.to_string(),
            collective: "local",
            ranks,
            save_ranks: self.ranks as u32,
            threads: self.args.threads,
            sync,
            format: self.args.format.name(),
            checksum: self.args.checksum.clone(),
            cache: None,
            cold_method: None,
            items: md.items.len(),
            chunks,
            bytes,
            checkpoint_bytes,
            files: md.files.len(),
            seconds,
            raw_seconds,
            ratio: if seconds > 0.0 {
                raw_seconds / seconds
            } else {
                0.0
            },
            gbps: per_s(bytes, seconds),
            raw_gbps: per_s(checkpoint_bytes, raw_seconds),
            bytes_read,
            read_amplification: if checkpoint_bytes > 0 {
                bytes_read as f64 / checkpoint_bytes as f64
            } else {
                0.0
            },
            read_requests: reps[mid].requests,
            peak_rss: reps.iter().map(|r| r.peak_rss).max().unwrap_or(0),
            base_rss: reps.iter().map(|r| r.base_rss).min().unwrap_or(0),
            peak_rss_reset: false,
            metadata_bytes,
            metadata_bytes_per_chunk: if chunks > 0 {
                metadata_bytes as f64 / chunks as f64
            } else {
                0.0
            },
            reps: reps.len() as u32,
            seconds_all,
            raw_seconds_all,
            verified: None,
        })
    }
}

/// The human-readable report.
fn table(b: &Bench, records: &[BenchRecord]) -> String {
    let mut out = String::new();
    let w = &b.workload;
    outln!(
        out,
        "dcp bench: {} ({} items, {}), {} ranks save/load, {} reshard, {} thread(s) per rank, {} reps (medians)",
        w.kind.name(),
        w.items.len(),
        human_bytes(w.total_bytes()),
        b.ranks,
        b.load_ranks,
        b.args.threads,
        b.args.reps
    );
    match &b.cold {
        Ok(m) => outln!(out, "cold loads: {m}"),
        Err(e) => outln!(out, "cold not available: {e}"),
    }
    outln!(
        out,
        "{:<13} {:>5} {:>9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "scenario",
        "ranks",
        "dcp s",
        "raw s",
        "ratio",
        "dcp GB/s",
        "raw GB/s",
        "read/size",
        "peak RSS",
        "base RSS"
    );
    for r in records {
        if r.reps == 0 {
            outln!(out, "{:<13} {}", r.scenario, "cold not available");
            continue;
        }
        outln!(
            out,
            "{:<13} {:>5} {:>9.3} {:>9.3} {:>6.2} {:>9.2} {:>9.2} {:>9.2} {:>10} {:>10}{}",
            r.scenario,
            r.ranks,
            r.seconds,
            r.raw_seconds,
            r.ratio,
            r.gbps,
            r.raw_gbps,
            r.read_amplification,
            human_bytes(r.peak_rss),
            human_bytes(r.base_rss),
            match r.verified {
                Some(false) => "  MISMATCH",
                _ => "",
            }
        );
    }
    if let Some(r) = records.iter().find(|r| r.chunks > 0) {
        outln!(
            out,
            "checkpoint: {} in {} data files, {} chunks; .metadata {} ({:.1} B/chunk)",
            human_bytes(r.checkpoint_bytes),
            r.files,
            r.chunks,
            human_bytes(r.metadata_bytes),
            r.metadata_bytes_per_chunk
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}

//! `dcp demo`: save an LLM-shaped state dict with N simulated ranks, load it
//! back with M ranks and a different sharding, and verify every byte.
//!
//! Generating the state dicts and checking the loaded bytes are not timed;
//! the save and load times cover the whole collective operation (planning,
//! writing, fsync, commit; metadata broadcast, planning, reading).

use crate::model::{self, ModelSpec};
use crate::{human_bytes, human_rate, location::open_location, CliError, Progress};
use clap::{Args, ValueEnum};
use dcp_core::local::run_ranks;
use dcp_core::{
    Collective, DestStateDict, FileSystem, FileSystemReader, FileSystemWriter, Metadata,
    ReaderOptions, SaveOptions, SerializationFormat, WriterOptions,
};
use serde::Serialize;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default number of layers (with the other defaults: about 109 MB).
pub const DEFAULT_LAYERS: u64 = 4;
/// Default hidden size.
pub const DEFAULT_HIDDEN: u64 = 1024;
/// Default vocabulary size.
pub const DEFAULT_VOCAB: u64 = 4096;
/// Deadline of each collective operation among the ranks.
pub(crate) const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(600);
/// Mismatch lines printed before the rest are counted.
const MAX_MISMATCH_LINES: usize = 20;

/// Data file layout of the demo checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Records back to back, 64-byte aligned.
    Raw,
    /// Every data file a valid safetensors file.
    Safetensors,
}

impl Format {
    /// The serialization format this choice names.
    pub fn serialization_format(self) -> Arc<dyn SerializationFormat> {
        match self {
            Format::Raw => Arc::new(dcp_core::format::Raw),
            Format::Safetensors => Arc::new(dcp_core::format::Safetensors),
        }
    }

    /// The name recorded in the metadata.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Safetensors => "safetensors",
        }
    }
}

/// Arguments of `dcp demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Checkpoint location (path or URL) (default: dcp-demo in the system temp dir).
    #[arg(long)]
    pub dir: Option<String>,
    /// Ranks that save (with --load-only: taken from the checkpoint).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub ranks: u32,
    /// Ranks that load (with the transposed sharding).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub load_ranks: u32,
    /// Transformer layers [default: 4, or the checkpoint's with --load-only].
    #[arg(long)]
    pub layers: Option<u64>,
    /// Hidden size [default: 1024, or the checkpoint's with --load-only].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub hidden: Option<u64>,
    /// Vocabulary size [default: 4096, or the checkpoint's with --load-only].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub vocab: Option<u64>,
    /// I/O threads (and data files) per rank.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,
    /// Data file layout.
    #[arg(long, value_enum, default_value_t = Format::Raw)]
    pub format: Format,
    /// Seed of every value [default: 0, or the checkpoint's with --load-only].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Only save (then `--load-only` can load with another number of ranks).
    #[arg(long, conflicts_with = "load_only")]
    pub save_only: bool,
    /// Only load and verify a checkpoint saved by `dcp demo --save-only`.
    #[arg(long)]
    pub load_only: bool,
    /// Do not fsync data files and the directory.
    #[arg(long)]
    pub no_sync: bool,
    /// Compress every record: zstd, lz4 or none (raw format only).
    #[arg(long, default_value = "none", value_parser = ["zstd", "lz4", "none"])]
    pub compress: String,
    /// zstd level (1 to 22, or negative for faster levels).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub zstd_level: i32,
    /// Checksum every record as stored: crc32c, crc32 or none. Loads and
    /// `dcp verify` check it.
    #[arg(long, default_value = "crc32c", value_parser = ["crc32c", "crc32", "none"])]
    pub checksum: String,
    /// Save asynchronously: each rank's `async_save` returns once its state
    /// dict is copied; the report adds that blocking time, the time of a
    /// plain memory copy of the same state dicts, and the peak RSS.
    #[arg(long = "async", conflicts_with = "load_only")]
    pub async_save: bool,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Run as one rank of an MPI job (under `mpirun -n N` or `srun`): the
    /// N processes save, then load resharded; rank 0 prints the report.
    /// Needs a dcp built with the `mpi` feature.
    #[arg(long, conflicts_with_all = ["ranks", "load_ranks"])]
    pub mpi: bool,
}

/// What `dcp demo --json` prints.
#[derive(Debug, Default, Serialize)]
pub struct DemoReport {
    /// Checkpoint location.
    pub dir: String,
    /// Bytes stored in data files (after compression).
    pub stored_bytes: u64,
    /// Transform descriptors of the checkpoint (compression, checksum).
    pub transforms: Vec<String>,
    /// Logical bytes of the state dict (each saved byte once).
    pub bytes: u64,
    /// Items in the state dict.
    pub items: usize,
    /// Ranks that save (with --load-only: taken from the checkpoint)..
    pub ranks: u32,
    /// Ranks that loaded (`null` with `--save-only`).
    pub load_ranks: Option<u32>,
    /// Data files in the checkpoint.
    pub files: usize,
    /// Data file layout.
    pub format: String,
    /// Model dimensions and seed.
    pub layers: u64,
    /// See `layers`.
    pub hidden: u64,
    /// See `layers`.
    pub vocab: u64,
    /// See `layers`.
    pub seed: u64,
    /// I/O threads per rank.
    pub threads: u32,
    /// Whether data files were fsynced.
    pub sync: bool,
    /// Seconds the save took (`null` with `--load-only`).
    pub save_seconds: Option<f64>,
    /// Save throughput in GB/s (10^9 bytes).
    pub save_gbps: Option<f64>,
    /// Seconds the load took (`null` with `--save-only`).
    pub load_seconds: Option<f64>,
    /// Load throughput in GB/s (10^9 bytes).
    pub load_gbps: Option<f64>,
    /// Bytes all loading ranks read from storage.
    pub bytes_read: Option<u64>,
    /// Read requests all loading ranks issued.
    pub read_requests: Option<u64>,
    /// True when every loaded byte matched (`null` with `--save-only`).
    pub verified: Option<bool>,
    /// What differed, one line per chunk or item.
    pub mismatches: Vec<String>,
    /// With `--async`: seconds until every rank's `async_save` returned
    /// (the time training would pause).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocking_seconds: Option<f64>,
    /// With `--async`: seconds of a plain memory copy of the same state
    /// dicts into fresh buffers (each rank's on its own thread, as staging
    /// runs), measured just after the save.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memcpy_seconds: Option<f64>,
    /// With `--async`: the process's peak resident set (VmHWM), bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss: Option<u64>,
}

/// Run `dcp demo` (with `--mpi`: [`crate::mpi::demo`]).
pub fn run(args: DemoArgs) -> Result<ExitCode, CliError> {
    if args.mpi {
        return crate::mpi::demo(args);
    }
    let fs = open_location(&location(&args))?;
    let rt = crate::runtime()?;
    let progress = Progress::new();
    let mut report = DemoReport {
        dir: fs.location(),
        ranks: args.ranks,
        format: args.format.name().to_string(),
        threads: args.threads,
        sync: !args.no_sync,
        ..DemoReport::default()
    };

    let (spec, md) = if args.load_only {
        let reader = reader(&fs, args.threads);
        let md = rt.block_on(dcp_core::read_metadata(&reader))?;
        let spec = spec_for_load(&args, &md)?;
        check_demo_checkpoint(&spec, &md, &fs)?;
        report.ranks = md.world_size;
        report.format = md.format.name().to_string();
        (spec, md)
    } else {
        let spec = ModelSpec {
            layers: args.layers.unwrap_or(DEFAULT_LAYERS),
            hidden: args.hidden.unwrap_or(DEFAULT_HIDDEN),
            vocab: args.vocab.unwrap_or(DEFAULT_VOCAB),
            seed: args.seed.unwrap_or(0),
        };
        let n = args.ranks as usize;
        progress.phase(format_args!(
            "generating {} for {n} ranks",
            human_bytes(spec.total_bytes())
        ));
        let sds = Arc::new(model::generate_state_dicts(&spec, n)?);
        progress.phase(format_args!("saving with {n} ranks to {}", fs.location()));
        // The bar follows the bytes written (less than this when compressed).
        let bar = crate::progress::bar(spec.total_bytes(), "saving");
        let writer = writer(&crate::progress::Metered::wrap(fs.clone(), &bar), &args)?;
        let options = SaveOptions::default().user_metadata(spec.user_metadata());
        let started = Instant::now();
        let results = if args.async_save {
            let plain = sds.clone();
            let started = Instant::now();
            let writer: Arc<dyn dcp_core::StorageWriter> = Arc::new(writer);
            let handles = rt.block_on(run_ranks(n, COLLECTIVE_TIMEOUT, move |g| {
                let (sds, writer, options) = (sds.clone(), writer.clone(), options.clone());
                async move {
                    let rank = g.rank();
                    dcp_core::AsyncSaver::new()
                        .async_save(&sds[rank], writer, Arc::new(g), options)
                        .await
                }
            }));
            report.blocking_seconds = Some(started.elapsed().as_secs_f64());
            let handles = collect_ok(handles)?;
            let results = rt.block_on(async {
                let mut out = Vec::with_capacity(handles.len());
                for h in handles {
                    out.push(h.await);
                }
                out
            });
            report.peak_rss = crate::bench::sys::status_bytes("VmHWM");
            // The baseline after the save, so that its buffers do not count
            // in the save's peak.
            report.memcpy_seconds = Some(crate::bench::memcpy_seconds(&plain));
            results
        } else {
            rt.block_on(run_ranks(n, COLLECTIVE_TIMEOUT, move |g| {
                let (sds, writer, options) = (sds.clone(), writer.clone(), options.clone());
                async move { dcp_core::save_with(&sds[g.rank()], &writer, &g, &options).await }
            }))
        };
        let seconds = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let saved = first_ok(results)?;
        let md = Arc::unwrap_or_clone(saved.metadata);
        report.save_seconds = Some(seconds);
        report.save_gbps = Some(gbps(md.logical_bytes(), seconds));
        (spec, md)
    };
    report.describe(&spec, &md);

    if !args.save_only {
        let m = args.load_ranks as usize;
        report.load_ranks = Some(args.load_ranks);
        let dests: Vec<Option<DestStateDict>> = (0..m)
            .map(|r| model::rank_dest(&spec, r, m).map(Some))
            .collect::<dcp_core::Result<_>>()?;
        let dests = Arc::new(Mutex::new(dests));
        progress.phase(format_args!("loading with {m} ranks, resharded"));
        let bar = crate::progress::bar(md.files.iter().map(|f| f.length).sum(), "loading");
        let reader = reader(
            &crate::progress::Metered::wrap(fs.clone(), &bar),
            args.threads,
        );
        let started = Instant::now();
        let results = rt.block_on(run_ranks(m, COLLECTIVE_TIMEOUT, move |g| {
            let (dests, reader) = (dests.clone(), reader.clone());
            async move {
                let dest = dests.lock().unwrap_or_else(|p| p.into_inner())[g.rank()]
                    .take()
                    .expect("each rank takes its own destination once");
                dcp_core::load(dest, &reader, &g).await
            }
        }));
        let seconds = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let loaded = collect_ok(results)?;
        report.load_seconds = Some(seconds);
        report.load_gbps = Some(gbps(report.bytes, seconds));
        report.bytes_read = Some(loaded.iter().map(|l| l.stats.bytes_read).sum());
        report.read_requests = Some(loaded.iter().map(|l| l.stats.requests).sum());
        progress.phase("verifying every byte");
        let loaded: Vec<DestStateDict> = loaded.into_iter().map(|l| l.state_dict).collect();
        let mismatches = model::check_all(&spec, &loaded);
        report.verified = Some(mismatches.is_empty());
        report.mismatches = mismatches.iter().map(|m| m.to_string()).collect();
    }

    finish(&report, args.json)
}

impl DemoReport {
    /// Fill in what the checkpoint and the model say.
    pub(crate) fn describe(&mut self, spec: &ModelSpec, md: &Metadata) {
        self.bytes = md.logical_bytes();
        self.stored_bytes = md.stored_bytes();
        self.transforms = md.transforms.clone();
        self.items = md.items.len();
        self.files = md.files.len();
        self.layers = spec.layers;
        self.hidden = spec.hidden;
        self.vocab = spec.vocab;
        self.seed = spec.seed;
    }

    /// The exit status the report ends the command with.
    pub(crate) fn exit_code(&self) -> ExitCode {
        if self.verified == Some(false) {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// The checkpoint location the arguments name (default: `dcp-demo` in the
/// system temp dir).
pub(crate) fn location(args: &DemoArgs) -> String {
    args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir()
            .join("dcp-demo")
            .to_string_lossy()
            .into_owned()
    })
}

/// The writer of the demo's save: the arguments' threads, fsync, format,
/// compression and checksum.
pub(crate) fn writer(
    fs: &Arc<dyn FileSystem>,
    args: &DemoArgs,
) -> Result<FileSystemWriter, CliError> {
    Ok(FileSystemWriter::new(
        fs.clone(),
        WriterOptions::default()
            .thread_count(args.threads as usize)
            .sync_files(!args.no_sync)
            .overwrite(true)
            .serialization_format(args.format.serialization_format())
            .extensions(dcp::ext::chain(
                dcp::ext::compression_from_name(&args.compress, args.zstd_level)?,
                dcp::ext::checksum_from_name(&args.checksum)?,
            )),
    )?)
}

/// Print the report (JSON or summary) and the mismatches, and return the
/// exit status.
pub(crate) fn finish(report: &DemoReport, json: bool) -> Result<ExitCode, CliError> {
    if json {
        let out = serde_json::to_string(report)
            .map_err(|e| CliError::msg(format!("cannot encode the report: {e}")))?;
        crate::emit(&format!("{out}\n"))?;
    } else {
        crate::emit(&summary(report))?;
    }
    for line in report.mismatches.iter().take(MAX_MISMATCH_LINES) {
        eprintln!("mismatch: {line}");
    }
    if report.mismatches.len() > MAX_MISMATCH_LINES {
        eprintln!(
            "mismatch: ... and {} more",
            report.mismatches.len() - MAX_MISMATCH_LINES
        );
    }
    if report.verified == Some(false) {
        eprintln!(
            "error: verification failed: {} chunks or items differ from the model",
            report.mismatches.len()
        );
    }
    Ok(report.exit_code())
}

/// Refuse a checkpoint that does not hold the demo model `spec`.
pub(crate) fn check_demo_checkpoint(
    spec: &ModelSpec,
    md: &Metadata,
    fs: &Arc<dyn FileSystem>,
) -> Result<(), CliError> {
    spec.check_matches(md).map_err(|e| {
        CliError::msg(format!(
            "{}: not a demo checkpoint of this model: {e}",
            fs.location()
        ))
    })
}

/// The model to expect in a checkpoint being loaded alone: the one its demo
/// user metadata records, checked against any dimension given on the
/// command line; or, for a checkpoint without it, the command line's.
pub(crate) fn spec_for_load(args: &DemoArgs, md: &Metadata) -> Result<ModelSpec, CliError> {
    let flags = [
        ("--layers", args.layers),
        ("--hidden", args.hidden),
        ("--vocab", args.vocab),
        ("--seed", args.seed),
    ];
    match ModelSpec::from_user_metadata(&md.user).map_err(CliError::msg)? {
        Some(saved) => {
            let values = [saved.layers, saved.hidden, saved.vocab, saved.seed];
            for ((flag, given), saved) in flags.iter().zip(values) {
                if let Some(g) = given {
                    if *g != saved {
                        return Err(CliError::usage(format!(
                            "the checkpoint was saved with {flag} {saved}, not {g}; drop {flag} or pass {saved}"
                        )));
                    }
                }
            }
            Ok(saved)
        }
        None => Ok(ModelSpec {
            layers: args.layers.unwrap_or(DEFAULT_LAYERS),
            hidden: args.hidden.unwrap_or(DEFAULT_HIDDEN),
            vocab: args.vocab.unwrap_or(DEFAULT_VOCAB),
            seed: args.seed.unwrap_or(0),
        }),
    }
}

pub(crate) fn reader(fs: &Arc<dyn FileSystem>, threads: u32) -> FileSystemReader {
    FileSystemReader::new(
        fs.clone(),
        ReaderOptions::default()
            .thread_count(threads as usize)
            .registry(crate::registry()),
    )
}

/// Every rank returns the same outcome; report the first error.
fn collect_ok<T>(results: Vec<dcp_core::Result<T>>) -> Result<Vec<T>, CliError> {
    results
        .into_iter()
        .collect::<dcp_core::Result<Vec<T>>>()
        .map_err(CliError::from)
}

fn first_ok<T>(results: Vec<dcp_core::Result<T>>) -> Result<T, CliError> {
    collect_ok(results)?
        .into_iter()
        .next()
        .ok_or_else(|| CliError::msg("no rank ran"))
}

pub(crate) fn gbps(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds / 1e9
    } else {
        0.0
    }
}

fn summary(r: &DemoReport) -> String {
    let mut out = String::new();
    outln!(
        out,
        "dcp demo: {} layers, hidden {}, vocab {}, seed {}: {} items, {} in {}",
        r.layers,
        r.hidden,
        r.vocab,
        r.seed,
        r.items,
        human_bytes(r.bytes),
        r.dir
    );
    if let Some(s) = r.save_seconds {
        outln!(
            out,
            "  save  {} ranks  {:>8.3} s  {:>10}  ({} {} files, {} thread(s) per rank, fsync {})",
            r.ranks,
            s,
            human_rate(r.bytes, s),
            r.files,
            r.format,
            r.threads,
            if r.sync { "on" } else { "off" }
        );
    } else {
        outln!(
            out,
            "  saved by {} ranks: {} {} files",
            r.ranks,
            r.files,
            r.format
        );
    }
    if let (Some(b), Some(m)) = (r.blocking_seconds, r.memcpy_seconds) {
        outln!(
            out,
            "  async save blocked {:.3} s ({:.2}x a plain copy of the same bytes, {:.3} s); peak RSS {}",
            b,
            b / m.max(1e-9),
            m,
            r.peak_rss.map_or("unknown".into(), human_bytes)
        );
    }
    if !r.transforms.is_empty() {
        outln!(
            out,
            "  stored {} ({:.2}x) with {}",
            human_bytes(r.stored_bytes),
            r.bytes as f64 / r.stored_bytes.max(1) as f64,
            r.transforms.join(" > ")
        );
    }
    if let (Some(m), Some(s)) = (r.load_ranks, r.load_seconds) {
        outln!(
            out,
            "  load  {m} ranks  {s:>8.3} s  {:>10}  (resharded rows <-> columns; read {} in {} requests)",
            human_rate(r.bytes, s),
            human_bytes(r.bytes_read.unwrap_or(0)),
            r.read_requests.unwrap_or(0)
        );
    }
    match r.verified {
        Some(true) => outln!(
            out,
            "  verified: every byte loaded by {} ranks matches the model",
            r.load_ranks.unwrap_or(0)
        ),
        Some(false) => outln!(
            out,
            "  verification FAILED: {} chunks or items differ",
            r.mismatches.len()
        ),
        None => outln!(
            out,
            "  not loaded (--save-only); check it with: dcp demo --load-only --dir {}",
            r.dir
        ),
    }
    out
}

//! dcp-cli: the `dcp` command.
//!
//! * `dcp demo`: an LLM-shaped state dict saved by N simulated ranks, loaded
//!   back by M ranks with a different sharding, every byte verified, and the
//!   throughput printed ([`demo`], with the model in [`model`]). With
//!   `--mpi` (a build with the `mpi` feature), under `mpirun -n N`: the N
//!   processes are the ranks ([`mpi`]).
//! * `dcp inspect PATH`: items, shapes, dtypes, chunks and files of a
//!   checkpoint, for people or (`--json`) for scripts ([`inspect`]).
//! * `dcp verify PATH`: every data file present with its recorded length,
//!   every record inside its file, every recorded checksum matching
//!   ([`verify`]).
//!
//! Every command takes a path or a URL; [`location::open_location`] maps
//! them to storage backends through [`dcp::open`]. Exit status: 0 on success,
//! 1 on an error, a damaged checkpoint or a failed verification, 2 on a
//! usage error. Errors print as one `error: ...` line, then one `  caused
//! by: ...` line per cause ([`CliError::report`]), never a panic.
//!
//! On a terminal, commands that move bytes draw progress bars on stderr
//! ([`progress`]); piped, or with `--quiet`, they draw nothing. `--log
//! LEVEL` or `RUST_LOG` send tracing to stderr ([`log_filter`]).
//!
//! ```no_run
//! use clap::Parser;
//! let cli = dcp_cli::Cli::parse_from(["dcp", "inspect", "/tmp/dcp-demo", "--json"]);
//! let code = dcp_cli::run(cli);
//! ```

/// Append a formatted line to a `String` (output is built whole, then
/// written once by [`emit`]).
macro_rules! outln {
    ($out:expr) => {
        $out.push('\n')
    };
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

pub mod bench;
pub mod convert;
pub mod demo;
pub mod inspect;
pub mod location;
pub mod model;
pub mod mpi;
pub mod progress;
pub mod verify;

use clap::{Parser, Subcommand};
use dcp_core::{ExtensionRegistry, ReaderOptions};
use std::fmt;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

/// The `dcp` command line.
#[derive(Debug, Parser)]
#[command(
    name = "dcp",
    version,
    about = "Distributed checkpoints: demo, inspect, verify, convert.",
    after_help = "Examples:\n  dcp demo --ranks 4 --load-ranks 3\n  dcp inspect ckpt/step100\n  dcp convert ckpt/ --to-safetensors hf/\n\nExit status: 0 success, 1 failure (one error line, then its causes), 2 usage error."
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
    /// No progress bars or phase lines on stderr (they are drawn only when
    /// stderr is a terminal anyway). Errors and results still print.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
    /// Tracing output on stderr: a level (error, warn, info, debug, trace)
    /// or a filter like `dcp_core=debug,info`. Overrides `RUST_LOG`;
    /// default `warn`.
    #[arg(long, global = true, value_name = "LEVEL", value_parser = parse_log_filter)]
    pub log: Option<String>,
}

/// `--log`: a level or an `EnvFilter` directive list, checked here so a bad
/// one is a usage error.
fn parse_log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("{s:?} is not a log level or filter (error, warn, info, debug, trace, or e.g. dcp_core=debug): {e}"))
}

/// The subcommands of `dcp`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Save an LLM-shaped state dict with N ranks, load it with M ranks
    /// resharded, verify every byte, and print the throughput.
    #[command(
        after_help = "Examples:\n  dcp demo --ranks 4 --load-ranks 3 --dir /tmp/dcp-demo\n  dcp demo --dir s3://bucket/demo --compress zstd --json"
    )]
    Demo(demo::DemoArgs),
    /// Show a checkpoint's items, chunks and files.
    #[command(
        after_help = "Examples:\n  dcp inspect ckpt/step100\n  dcp inspect s3://bucket/ckpt --keys 'model.layers.0.*' --json"
    )]
    Inspect(inspect::InspectArgs),
    /// Check that a checkpoint's files and checksums match its metadata.
    #[command(
        after_help = "Examples:\n  dcp verify ckpt/step100\n  dcp verify s3://bucket/ckpt --no-checksums"
    )]
    Verify(verify::VerifyArgs),
    /// Measure save, load and resharded load against the raw speed of the
    /// disk (the same bytes written and read with plain file I/O).
    #[command(
        after_help = "Examples:\n  dcp bench --dir /mnt/nvme/bench\n  dcp bench --dir /mnt/nvme/bench --json"
    )]
    Bench(bench::BenchArgs),
    /// Write a checkpoint (dcp's, or one written by
    /// torch.distributed.checkpoint) out as a dcp checkpoint for N ranks or
    /// as Hugging Face safetensors; or Hugging Face safetensors in as a dcp
    /// checkpoint. Example: `dcp convert ckpt/ --to-safetensors hf/
    /// --max-shard-size 5GB`.
    #[command(
        after_help = "Examples:\n  dcp convert ckpt/ --to-safetensors hf/ --max-shard-size 5GB\n  dcp convert ckpt/ --to-safetensors model.safetensors --keys 'model.*' --rename model.=\n  dcp convert hf/ --to-dcp s3://bucket/ckpt --ranks 8 --shard row\n  dcp convert ckpt/ --to-dcp resharded/ --ranks 4"
    )]
    Convert(convert::ConvertArgs),
    /// Print a shell completion script: `dcp completions bash >
    /// /etc/bash_completion.d/dcp` (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  dcp completions bash > /etc/bash_completion.d/dcp\n  dcp completions zsh > ~/.zfunc/_dcp\n  dcp completions fish > ~/.config/fish/completions/dcp.fish"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// An error of a `dcp` command: a message for people and an exit status.
#[derive(Debug)]
pub struct CliError {
    message: String,
    causes: Vec<String>,
    code: u8,
}

impl CliError {
    /// A failure (exit status 1).
    pub fn msg(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            causes: Vec::new(),
            code: 1,
        }
    }

    /// A usage error (exit status 2).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            causes: Vec::new(),
            code: 2,
        }
    }

    /// A failure (exit status 1) saying what could not be done, caused by
    /// `cause`: its message and its chain of sources become the causes.
    pub fn failed(message: impl Into<String>, cause: &(dyn std::error::Error + 'static)) -> Self {
        let mut e = CliError::msg(message);
        e.causes.push(cause.to_string());
        e.add_sources(cause);
        e
    }

    /// The causes printed under the message, outermost first.
    pub fn causes(&self) -> &[String] {
        &self.causes
    }

    /// Append the sources of `e` not already said by the message or an
    /// earlier cause (an I/O error's text is usually part of its message).
    fn add_sources(&mut self, e: &(dyn std::error::Error + 'static)) {
        let mut next = e.source();
        while let Some(s) = next {
            let text = s.to_string();
            let said = std::iter::once(&self.message)
                .chain(&self.causes)
                .any(|m| m.contains(&text));
            if !text.is_empty() && !said {
                self.causes.push(text);
            }
            next = s.source();
        }
    }

    /// The text printed on stderr: `error: MESSAGE`, then one
    /// `  caused by: CAUSE` line per cause.
    pub fn report(&self) -> String {
        let mut out = format!("error: {}", self.message);
        for c in &self.causes {
            out.push_str("\n  caused by: ");
            out.push_str(c);
        }
        out
    }

    /// The exit status this error ends the command with.
    pub fn exit_code(&self) -> u8 {
        self.code
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

impl From<dcp_core::Error> for CliError {
    fn from(e: dcp_core::Error) -> Self {
        let mut c = CliError::msg(e.to_string());
        c.add_sources(&e);
        c
    }
}

/// The transform extensions (checksums, compression) this build can read:
/// [`dcp::default_registry`], every extension of the `dcp-ext` crate. Every
/// command that reads a checkpoint resolves transform descriptors through
/// this one function.
pub fn registry() -> ExtensionRegistry {
    dcp::default_registry()
}

/// The reader options every command that reads a checkpoint uses: this
/// build's transforms ([`registry`]) and the readers of other tools'
/// checkpoints ([`dcp::add_foreign_readers`]: torch DCP's), so `inspect`,
/// `verify` and `convert` accept a checkpoint written by
/// `torch.distributed.checkpoint` as they accept dcp's.
pub fn reader_options() -> ReaderOptions {
    let mut o = ReaderOptions::default().registry(registry());
    dcp::add_foreign_readers(&mut o);
    o
}

/// Phase lines on stderr, printed only when stderr is a terminal and
/// `--quiet` was not given ([`progress::enabled`]).
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    started: Instant,
}

impl Progress {
    /// Progress that prints when stderr is a terminal (and not `--quiet`).
    pub fn new() -> Self {
        Progress {
            enabled: progress::enabled(),
            started: Instant::now(),
        }
    }

    /// Announce a phase.
    pub fn phase(&self, what: impl fmt::Display) {
        if self.enabled {
            eprintln!("[{:>7.2}s] {what}", self.started.elapsed().as_secs_f64());
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// Write a command's output to stdout. A closed pipe (`dcp inspect | head`)
/// is not an error: the reader has what it wanted.
pub fn emit(text: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::msg(format!("cannot write to stdout: {e}"))),
    }
}

/// A multi-threaded tokio runtime for a command.
pub fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::msg(format!("cannot start the tokio runtime: {e}")))
}

/// `bytes` in decimal units (`109.1 MB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A throughput in decimal units per second (`1.23 GB/s`, `45.6 MB/s`).
pub fn human_rate(bytes: u64, seconds: f64) -> String {
    let rate = if seconds > 0.0 {
        bytes as f64 / seconds
    } else {
        0.0
    };
    if rate >= 1e9 {
        format!("{:.2} GB/s", rate / 1e9)
    } else {
        format!("{:.1} MB/s", rate / 1e6)
    }
}

/// Run a parsed command line; prints `error: ...` for a failure and returns
/// the exit status.
pub fn run(cli: Cli) -> ExitCode {
    progress::set_quiet(cli.quiet);
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "dcp",
                &mut out,
            );
            emit(&String::from_utf8_lossy(&out)).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", e.report());
            ExitCode::from(e.exit_code())
        }
    }
}

/// The tracing filter: `--log` if given, else `RUST_LOG` if set and valid,
/// else `warn` (with the S3 signer's credential probing and OpenDAL's retry
/// notices at `error`). An invalid `RUST_LOG` is reported once on stderr and
/// the default used.
pub fn log_filter(log: Option<&str>) -> tracing_subscriber::EnvFilter {
    const DEFAULT: &str = "warn,reqsign_core=error,reqsign=error,opendal=error";
    if let Some(f) = log.and_then(|l| tracing_subscriber::EnvFilter::try_new(l).ok()) {
        return f;
    }
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            tracing_subscriber::EnvFilter::try_new(&v).unwrap_or_else(|e| {
                eprintln!("warning: RUST_LOG={v:?} is not a log filter ({e}); using warn");
                tracing_subscriber::EnvFilter::new(DEFAULT)
            })
        }
        _ => tracing_subscriber::EnvFilter::new(DEFAULT),
    }
}

/// The whole program: argument parsing (usage errors exit 2), tracing to
/// stderr filtered by `--log` or `RUST_LOG` ([`log_filter`]; lines are
/// written around a drawn bar, see [`progress::LogWriter`]), then [`run`].
pub fn main() -> ExitCode {
    match Cli::try_parse() {
        Ok(cli) => {
            tracing_subscriber::fmt()
                .with_env_filter(log_filter(cli.log.as_deref()))
                .with_writer(|| progress::LogWriter)
                .with_ansi(std::io::stderr().is_terminal())
                .init();
            run(cli)
        }
        Err(e) => {
            let _ = e.print();
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(109_051_904), "109.1 MB");
        assert_eq!(human_bytes(2_500_000_000), "2.5 GB");
        assert_eq!(human_rate(2_000_000_000, 0.5), "4.00 GB/s");
        assert_eq!(human_rate(1_000_000, 0.5), "2.0 MB/s");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

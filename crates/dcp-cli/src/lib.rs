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
//! usage error. Errors print as one `error: ...` line, never a panic.
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
    about = "Distributed checkpoints: demo, inspect, verify, convert."
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `dcp`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Save an LLM-shaped state dict with N ranks, load it with M ranks
    /// resharded, verify every byte, and print the throughput.
    Demo(demo::DemoArgs),
    /// Show a checkpoint's items, chunks and files.
    Inspect(inspect::InspectArgs),
    /// Check that a checkpoint's files and checksums match its metadata.
    Verify(verify::VerifyArgs),
    /// Measure save, load and resharded load against the raw speed of the
    /// disk (the same bytes written and read with plain file I/O).
    Bench(bench::BenchArgs),
    /// Write a checkpoint (dcp's, or one written by
    /// torch.distributed.checkpoint) out as a dcp checkpoint for N ranks or
    /// as Hugging Face safetensors; or Hugging Face safetensors in as a dcp
    /// checkpoint. Example: `dcp convert ckpt/ --to-safetensors hf/
    /// --max-shard-size 5GB`.
    Convert(convert::ConvertArgs),
    /// Print a shell completion script: `dcp completions bash >
    /// /etc/bash_completion.d/dcp` (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// An error of a `dcp` command: a message for people and an exit status.
#[derive(Debug)]
pub struct CliError {
    message: String,
    code: u8,
}

impl CliError {
    /// A failure (exit status 1).
    pub fn msg(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 1,
        }
    }

    /// A usage error (exit status 2).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 2,
        }
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
        CliError::msg(e.to_string())
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

/// Phase lines on stderr, printed only when stderr is a terminal.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    started: Instant,
}

impl Progress {
    /// Progress that prints when stderr is a terminal.
    pub fn new() -> Self {
        Progress {
            enabled: std::io::stderr().is_terminal(),
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
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The whole program: logging from `RUST_LOG` (default `warn`, with the S3
/// signer's credential probing and OpenDAL's retry notices at `error`) to
/// stderr, argument parsing (usage errors exit 2), then [`run`].
pub fn main() -> ExitCode {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => tracing_subscriber::EnvFilter::new(v),
        _ => tracing_subscriber::EnvFilter::new(
            "warn,reqsign_core=error,reqsign=error,opendal=error",
        ),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::try_parse() {
        Ok(cli) => run(cli),
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

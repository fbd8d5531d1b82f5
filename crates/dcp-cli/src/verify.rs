//! `dcp verify`: check a checkpoint's data files against its metadata
//! without loading it: every file present with its recorded length, every
//! record inside its file, every recorded checksum matching.

use crate::{human_bytes, location::open_location, CliError};
use clap::Args;
use dcp_core::FileSystemReader;
use std::process::ExitCode;

/// Arguments of `dcp verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Checkpoint location: a path or a URL.
    pub path: String,
    /// Skip reading records to check their checksums (files and lengths only).
    #[arg(long)]
    pub no_checksums: bool,
    /// Threads reading records to check checksums.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,
}

/// Run `dcp verify`: one summary line and exit 0 when sound; one
/// `problem: ...` line per problem (each naming its file) and exit 1
/// otherwise.
pub fn run(args: VerifyArgs) -> Result<ExitCode, CliError> {
    let fs = open_location(&args.path)?;
    let options = crate::reader_options();
    let registry = options.registry.clone();
    let reader = FileSystemReader::new(fs.clone(), options);
    let rt = crate::runtime()?;
    let md = rt.block_on(dcp_core::read_metadata(&reader))?;
    let checksums = !args.no_checksums;
    tracing::info!(
        items = md.items.len(),
        files = md.files.len(),
        checksums,
        "verifying"
    );
    let threads = args.threads as usize;
    // With checksums, verify reads every record: a bar of the files' bytes.
    let bar = if checksums {
        crate::progress::bar(md.files.iter().map(|f| f.length).sum(), "verifying")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let metered = crate::progress::Metered::wrap(fs.clone(), &bar);
    let report = dcp_core::verify::verify(metered.as_ref(), &md, &registry, checksums, threads);
    bar.finish_and_clear();
    let report = report?;
    let location = fs.location();
    if report.is_sound() {
        let checks = if !checksums {
            "checksums not checked (--no-checksums)".to_string()
        } else if report.checksummed_records == 0 {
            "no checksums recorded".to_string()
        } else {
            format!(
                "checksums of {} records ({}) match",
                report.checksummed_records,
                human_bytes(report.bytes_checked)
            )
        };
        crate::emit(&format!(
            "ok: {location}: {} items, {} records in {} files ({}) present with their recorded lengths; {checks}\n",
            md.items.len(),
            md.record_count(),
            md.files.len(),
            human_bytes(md.files.iter().map(|f| f.length).sum()),
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::new();
    for p in &report.problems {
        outln!(out, "problem: {p}");
    }
    crate::emit(&out)?;
    eprintln!(
        "error: {location}: {} problems found; the checkpoint is damaged",
        report.problems.len()
    );
    Ok(ExitCode::from(1))
}

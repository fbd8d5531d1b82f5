//! `--mpi`: the ranks of `dcp demo` as the processes of an MPI job.
//!
//! Under `mpirun -n N dcp demo --mpi` (or `srun`), every process is one
//! rank of a `dcp::mpi::MpiGroup` over a duplicate of the
//! world communicator: each generates only its own state dict, the N
//! processes save together, then load with the transposed sharding; rank 0
//! prints the report, with the same fields as without `--mpi`. The
//! checkpoint is the same format either way, so `--save-only` and
//! `--load-only` cross modes and rank counts.
//!
//! A step a process fails before the save or load starts (opening the
//! location, reading the metadata, generating its state dict) is agreed on
//! first, so every process stops with the failing rank's error instead of
//! waiting for it. A missed collective deadline leaves MPI unusable: the
//! process prints its error and aborts the job (`MPI_Abort`).
//!
//! Built without the `mpi` feature, `--mpi` is refused as a usage error
//! saying how to build it.

use crate::demo::DemoArgs;
use crate::CliError;
use std::process::ExitCode;

/// The message for `--mpi` in a build without MPI.
#[cfg(not(feature = "mpi"))]
pub(crate) fn unavailable() -> CliError {
    CliError::usage(
        "--mpi: this dcp was built without MPI; build it with `cargo build --release -p dcp-cli --features mpi` (needs an MPI library and libclang: libopenmpi-dev openmpi-bin libclang-dev)",
    )
}

/// Run `dcp demo --mpi` as this process's rank.
#[cfg(not(feature = "mpi"))]
pub fn demo(args: DemoArgs) -> Result<ExitCode, CliError> {
    let _ = args;
    Err(unavailable())
}

#[cfg(feature = "mpi")]
pub(crate) use imp::agree;
#[cfg(feature = "mpi")]
pub use imp::demo;

#[cfg(feature = "mpi")]
mod imp {
    use super::*;
    use crate::demo::{self, DemoReport, COLLECTIVE_TIMEOUT};
    use crate::model::{self, ModelSpec};
    use crate::{location::open_location, Progress};
    use bytes::Bytes;
    use dcp::mpi::{Mpi, MpiGroup};
    use dcp_core::{Collective, Metadata, SaveOptions};
    use serde::{Deserialize, Serialize};
    use std::time::Instant;

    /// Run `dcp demo --mpi` as this process's rank: initialize MPI, run,
    /// finalize. A missed deadline aborts the whole job after printing the
    /// error.
    pub fn demo(args: DemoArgs) -> Result<ExitCode, CliError> {
        let mpi = Mpi::init()?;
        let group = MpiGroup::new(&mpi.world(), COLLECTIVE_TIMEOUT)?;
        let rt = crate::runtime()?;
        let out = rt.block_on(run(&args, &group));
        drop(rt);
        if let Err(e) = &out {
            if group.is_broken() {
                eprintln!("error: {e}");
                group.abort(1);
            }
        }
        drop(group);
        drop(mpi);
        out
    }

    /// What every rank tells the others after its load.
    #[derive(Serialize, Deserialize)]
    struct LoadSummary {
        bytes_read: u64,
        requests: u64,
        mismatches: Vec<String>,
    }

    /// Every rank's local outcome: all succeed, or all fail with the first
    /// failing rank's error (named).
    pub(crate) async fn agree<T>(
        group: &MpiGroup,
        local: Result<T, CliError>,
    ) -> Result<T, CliError> {
        let msg = match &local {
            Ok(_) => Bytes::new(),
            Err(e) => Bytes::from(e.to_string()),
        };
        let all = group.all_gather(msg).await?;
        if let Some((r, m)) = all.iter().enumerate().find(|(_, m)| !m.is_empty()) {
            if local.is_ok() {
                return Err(CliError::msg(format!(
                    "rank {r}: {}",
                    String::from_utf8_lossy(m)
                )));
            }
        }
        local
    }

    async fn run(args: &DemoArgs, group: &MpiGroup) -> Result<ExitCode, CliError> {
        let (me, n) = (group.rank(), group.world_size());
        let ranks = n as u32;
        let progress = if me == 0 {
            Progress::new()
        } else {
            Progress {
                enabled: false,
                started: Instant::now(),
            }
        };
        let fs = agree(group, open_location(&demo::location(args))).await?;
        let mut report = DemoReport {
            dir: fs.location(),
            ranks,
            format: args.format.name().to_string(),
            threads: args.threads,
            sync: !args.no_sync,
            ..DemoReport::default()
        };

        let (spec, md): (ModelSpec, Metadata) = if args.load_only {
            let reader = demo::reader(&fs, args.threads);
            let found = async {
                let md = dcp_core::read_metadata(&reader).await?;
                let spec = demo::spec_for_load(args, &md)?;
                demo::check_demo_checkpoint(&spec, &md, &fs)?;
                Ok::<_, CliError>((spec, md))
            }
            .await;
            let (spec, md) = agree(group, found).await?;
            report.ranks = md.world_size;
            report.format = md.format.name().to_string();
            (spec, md)
        } else {
            let spec = ModelSpec {
                layers: args.layers.unwrap_or(demo::DEFAULT_LAYERS),
                hidden: args.hidden.unwrap_or(demo::DEFAULT_HIDDEN),
                vocab: args.vocab.unwrap_or(demo::DEFAULT_VOCAB),
                seed: args.seed.unwrap_or(0),
            };
            progress.phase(format_args!(
                "generating {} for {n} processes",
                crate::human_bytes(spec.total_bytes())
            ));
            let ready = model::generate_state_dict(&spec, me, n)
                .map_err(CliError::from)
                .and_then(|sd| Ok((sd, demo::writer(&fs, args)?)));
            let (sd, writer) = agree(group, ready).await?;
            let options = SaveOptions::default().user_metadata(spec.user_metadata());
            progress.phase(format_args!(
                "saving with {n} processes to {}",
                fs.location()
            ));
            group.barrier().await?;
            let started = Instant::now();
            let saved = dcp_core::save_with(&sd, &writer, group, &options).await?;
            let seconds = started.elapsed().as_secs_f64();
            let md = std::sync::Arc::unwrap_or_clone(saved.metadata);
            report.save_seconds = Some(seconds);
            report.save_gbps = Some(demo::gbps(md.logical_bytes(), seconds));
            (spec, md)
        };
        report.describe(&spec, &md);

        if !args.save_only {
            report.load_ranks = Some(ranks);
            let dest = agree(
                group,
                model::rank_dest(&spec, me, n).map_err(CliError::from),
            )
            .await?;
            let reader = demo::reader(&fs, args.threads);
            progress.phase(format_args!("loading with {n} processes, resharded"));
            group.barrier().await?;
            let started = Instant::now();
            let loaded = dcp_core::load(dest, &reader, group).await?;
            let seconds = started.elapsed().as_secs_f64();
            progress.phase("verifying every byte");
            let mine = LoadSummary {
                bytes_read: loaded.stats.bytes_read,
                requests: loaded.stats.requests,
                mismatches: model::check_loaded(&spec, me, &loaded.state_dict)
                    .iter()
                    .map(|m| m.to_string())
                    .collect(),
            };
            drop(loaded);
            let msg = serde_json::to_vec(&mine)
                .map_err(|e| CliError::msg(format!("cannot encode the load summary: {e}")))?;
            let all = group.all_gather(Bytes::from(msg)).await?;
            report.load_seconds = Some(seconds);
            report.load_gbps = Some(demo::gbps(report.bytes, seconds));
            let (mut read, mut requests) = (0, 0);
            for (r, m) in all.iter().enumerate() {
                let s: LoadSummary = serde_json::from_slice(m).map_err(|e| {
                    CliError::msg(format!("rank {r} sent a malformed load summary: {e}"))
                })?;
                read += s.bytes_read;
                requests += s.requests;
                report.mismatches.extend(s.mismatches);
            }
            report.bytes_read = Some(read);
            report.read_requests = Some(requests);
            report.verified = Some(report.mismatches.is_empty());
        }

        if me == 0 {
            demo::finish(&report, args.json)
        } else {
            Ok(report.exit_code())
        }
    }
}

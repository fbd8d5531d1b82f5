//! `dcp bench --mpi`: the save, load and resharded-load scenarios with
//! every rank one process of an MPI job (`mpirun -n N dcp bench --mpi`).
//!
//! Each process generates only its own state dict and destinations. A
//! timed phase starts at a barrier of all the processes; its time is the
//! slowest process's. Rank 0 then runs the raw baseline alone, exactly as
//! `dcp bench` without `--mpi` does (one thread per file, as many files
//! and bytes as the checkpoint's data files, the same cache state), while
//! the other processes wait, and prints the report: the same records and
//! fields, with `collective: "mpi"`. A resharded load runs on the first
//! `--load-ranks` processes (a sub-communicator); the others wait for it.
//!
//! The baseline's files are byte copies of the checkpoint's data files: no
//! process holds every state dict, so none can build the mirror that
//! `dcp bench` builds from them (the lengths and bytes are the same).
//! The directory must be one every process sees: one machine, or a shared
//! file system.
//!
//! Built without the `mpi` feature, `--mpi` is refused as a usage error
//! saying how to build it.

/// Run `dcp bench --mpi` as this process's rank.
#[cfg(not(feature = "mpi"))]
pub fn run(args: super::BenchArgs) -> Result<std::process::ExitCode, crate::CliError> {
    let _ = args;
    Err(crate::mpi::unavailable())
}

#[cfg(feature = "mpi")]
pub use imp::run;

#[cfg(feature = "mpi")]
mod imp {
    use super::super::{
        build_workload, print_report, root_dir, sys, Bench, BenchArgs, BenchRecord, Rep,
        ScenarioKind, WorkloadKind, COLLECTIVE_TIMEOUT,
    };
    use crate::mpi::agree;
    use crate::{CliError, Progress};
    use bytes::Bytes;
    use dcp::mpi::mpi::topology::{Color, Communicator};
    use dcp::mpi::{Mpi, MpiGroup};
    use dcp_core::{Collective, Metadata, ReaderOptions, SaveOptions, StateDict};
    use serde::{Deserialize, Serialize};
    use std::path::PathBuf;
    use std::process::ExitCode;
    use std::sync::Arc;
    use std::time::Instant;

    /// What every process tells the others after a timed phase.
    #[derive(Debug, Default, Serialize, Deserialize)]
    struct Mine {
        /// Whether it took part (a reshard runs on the first M processes).
        ran: bool,
        seconds: f64,
        bytes_read: u64,
        requests: u64,
        peak_rss: u64,
        base_rss: u64,
        /// Chunks it loaded that differ from the workload (checked once).
        mismatches: Vec<String>,
        /// Its error, if its part failed.
        error: Option<String>,
    }

    /// Run `dcp bench --mpi` as this process's rank: initialize MPI, run,
    /// finalize. Refuses (as a usage error, on every process alike, before
    /// MPI starts) the scale workload, the async and device scenarios,
    /// and, once the job's size is known, `--load-ranks` above it. A
    /// missed collective deadline aborts the job after printing the error.
    pub fn run(args: BenchArgs) -> Result<ExitCode, CliError> {
        if args.workload == WorkloadKind::Scale {
            return Err(CliError::usage(
                "--mpi: the scale workload simulates its ranks in one process; run it without --mpi",
            ));
        }
        if let Some(s) = args.scenarios.iter().find(|s| {
            matches!(
                s,
                ScenarioKind::Async | ScenarioKind::Device | ScenarioKind::DeviceLoad
            )
        }) {
            return Err(CliError::usage(format!(
                "--mpi: scenario {s:?} is not measured across processes (save, load, reshard and reshard-fsspec are)"
            )));
        }
        let root = root_dir(&args)?;
        let mpi = Mpi::init()?;
        let world = MpiGroup::new(&mpi.world(), COLLECTIVE_TIMEOUT)?;
        let out = run_job(&mpi, &world, args, root);
        if let Err(e) = &out {
            if world.is_broken() {
                eprintln!("error: {e}");
                world.abort(1);
            }
        }
        drop(world);
        drop(mpi);
        out
    }

    fn run_job(
        mpi: &Mpi,
        world: &MpiGroup,
        args: BenchArgs,
        root: PathBuf,
    ) -> Result<ExitCode, CliError> {
        let (me, n) = (world.rank(), world.world_size());
        let (workload, _, load_ranks) = build_workload(&args);
        let load_ranks = load_ranks as usize;
        if load_ranks > n {
            return Err(CliError::usage(format!(
                "--load-ranks {load_ranks}: the job has {n} processes; a resharded load runs on some of them"
            )));
        }
        let rt = crate::runtime()?;
        // Rank 0 prepares the directory and finds out whether loads can be
        // made cold; every process learns the answer.
        let prepared = if me == 0 {
            std::fs::create_dir_all(&root)
                .map_err(|e| CliError::msg(format!("cannot create {}: {e}", root.display())))
                .map(|()| sys::probe_cold(&root).err().unwrap_or_default())
        } else {
            Ok(String::new())
        };
        let cold_err = rt.block_on(async {
            let why = agree(world, prepared).await?;
            let all = world.broadcast(Some(Bytes::from(why)), 0).await?;
            Ok::<_, CliError>(String::from_utf8_lossy(&all).into_owned())
        })?;
        // The processes of a resharded load: the first `load_ranks`.
        let color = if me < load_ranks {
            Color::with_value(0)
        } else {
            Color::undefined()
        };
        let sub_comm = mpi.world().split_by_color(color);
        let sub = match &sub_comm {
            Some(c) if load_ranks < n => Some(MpiGroup::new(c, COLLECTIVE_TIMEOUT)?),
            _ => None,
        };
        let name = workload.kind.name();
        let b = Bench {
            ckpt: root.join(format!("{name}-dcp")),
            raw: root.join(format!("{name}-raw")),
            cold: if cold_err.is_empty() {
                Ok(sys::COLD_METHOD)
            } else {
                Err(cold_err)
            },
            rt,
            progress: if me == 0 {
                Progress::new()
            } else {
                Progress {
                    enabled: false,
                    started: Instant::now(),
                }
            },
            ranks: n,
            load_ranks,
            workload,
            args,
        };
        let reshard_group = if load_ranks == n {
            Some(world)
        } else {
            sub.as_ref()
        };
        let result = b.rt.block_on(job(&b, world, reshard_group));
        drop(sub);
        drop(sub_comm);
        if me == 0 && !b.args.keep {
            let _ = sys::remove_dir(&b.ckpt);
            let _ = sys::remove_dir(&b.raw);
        }
        let records = result?;
        if me == 0 {
            print_report(&b, &records)
        } else if records.iter().any(|r| r.verified == Some(false)) {
            Ok(ExitCode::from(1))
        } else {
            Ok(ExitCode::SUCCESS)
        }
    }

    /// Every scenario asked for; full records on rank 0 (the others' carry
    /// only `verified`).
    async fn job(
        b: &Bench,
        world: &MpiGroup,
        reshard_group: Option<&MpiGroup>,
    ) -> Result<Vec<BenchRecord>, CliError> {
        let me = world.rank();
        let kinds = b.args.scenarios.clone();
        let wants = |k| kinds.contains(&k);
        let syncs: Vec<bool> = match b.args.sync {
            Some(s) => vec![s == 1],
            None => vec![true, false],
        };
        b.progress.phase(format_args!(
            "generating {} ({}) for {} processes",
            b.workload.kind.name(),
            crate::human_bytes(b.workload.total_bytes()),
            b.ranks
        ));
        let mine = b
            .workload
            .rank_state_dicts(me..me + 1, b.ranks)
            .map_err(CliError::from)
            .map(|mut v| v.pop().unwrap_or_default());
        let sd = agree(world, mine).await?;
        let mut out = Vec::new();
        let mut saved: Option<(Arc<Metadata>, bool)> = None;
        if wants(ScenarioKind::Save) {
            for &sync in &syncs {
                let (rec, md) = save_scenario(b, world, &sd, sync).await?;
                out.push(rec);
                saved = Some((md, sync));
            }
        }
        if !wants(ScenarioKind::Load)
            && !wants(ScenarioKind::Reshard)
            && !wants(ScenarioKind::ReshardFsspec)
        {
            return Ok(out);
        }
        let (md, sync) = match saved {
            Some(s) => s,
            None => {
                let sync = syncs[0];
                b.progress.phase("saving the checkpoint to load");
                let cleared = if me == 0 {
                    sys::remove_dir(&b.ckpt).map_err(|e| b.io_err(&b.ckpt, e))
                } else {
                    Ok(())
                };
                agree(world, cleared).await?;
                let saved =
                    dcp_core::save_with(&sd, &b.writer(sync)?, world, &SaveOptions::default())
                        .await?;
                (saved.metadata, sync)
            }
        };
        drop(sd);
        // The baseline's files: byte copies of the checkpoint's data files.
        let lens: Vec<usize> = md.files.iter().map(|f| f.length as usize).collect();
        let copied = if me == 0 { copy_raw(b, &md) } else { Ok(()) };
        agree(world, copied).await?;
        for kind in [
            ScenarioKind::Load,
            ScenarioKind::Reshard,
            ScenarioKind::ReshardFsspec,
        ] {
            if !wants(kind) {
                continue;
            }
            let group = if kind == ScenarioKind::Load {
                Some(world)
            } else {
                reshard_group
            };
            for cold in [false, true] {
                out.push(load_scenario(b, world, group, &md, sync, &lens, kind, cold).await?);
            }
        }
        Ok(out)
    }

    /// Every process's [`Mine`], in rank order; an error if any process's
    /// part failed (the same error on every process, naming the rank).
    async fn gather(world: &MpiGroup, mine: &Mine) -> Result<Vec<Mine>, CliError> {
        let msg = serde_json::to_vec(mine)
            .map_err(|e| CliError::msg(format!("cannot encode this process's report: {e}")))?;
        let all = world.all_gather(Bytes::from(msg)).await?;
        let mut out = Vec::with_capacity(all.len());
        for (r, m) in all.iter().enumerate() {
            let m: Mine = serde_json::from_slice(m)
                .map_err(|e| CliError::msg(format!("rank {r} sent a malformed report: {e}")))?;
            out.push(m);
        }
        if let Some((r, e)) = out
            .iter()
            .enumerate()
            .find_map(|(r, m)| m.error.as_ref().map(|e| (r, e)))
        {
            // dcp's errors already name their rank; others get it here.
            let e = if e.starts_with("rank ") {
                e.clone()
            } else {
                format!("rank {r}: {e}")
            };
            return Err(CliError::msg(e));
        }
        Ok(out)
    }

    /// One repetition's measurements from every process's: the slowest
    /// process's time, the sums of the rest.
    fn rep_of(all: &[Mine]) -> Rep {
        let ran = || all.iter().filter(|m| m.ran);
        Rep {
            seconds: ran().map(|m| m.seconds).fold(0.0, f64::max),
            raw_seconds: 0.0,
            bytes_read: ran().map(|m| m.bytes_read).sum(),
            requests: ran().map(|m| m.requests).sum(),
            peak_rss: all.iter().map(|m| m.peak_rss).sum(),
            base_rss: all.iter().map(|m| m.base_rss).sum(),
        }
    }

    /// Start a timed phase: every dirty page flushed, the peak RSS reset,
    /// the resident set noted, then a barrier of every process. Returns the
    /// resident set and whether the peak could be reset.
    async fn start(world: &MpiGroup) -> Result<(u64, bool), CliError> {
        sys::sync_everything();
        let reset = sys::reset_peak_rss();
        let base = sys::status_bytes("VmRSS").unwrap_or(0);
        world.barrier().await?;
        Ok((base, reset))
    }

    async fn save_scenario(
        b: &Bench,
        world: &MpiGroup,
        sd: &StateDict,
        sync: bool,
    ) -> Result<(BenchRecord, Arc<Metadata>), CliError> {
        let me = world.rank();
        let label = if sync { "save" } else { "save_nosync" };
        let writer = b.writer(sync)?;
        let mut reps = Vec::new();
        let mut md = None;
        let mut images: Option<Vec<Vec<u8>>> = None;
        let mut reset = true;
        // One untimed warm-up, as without --mpi.
        for rep in 0..=b.args.reps {
            let timed = rep > 0;
            b.progress.phase(format_args!(
                "{label}: {} with {} processes",
                if timed { "rep" } else { "warm-up" },
                b.ranks
            ));
            let cleared = if me == 0 {
                sys::remove_dir(&b.ckpt)
                    .map_err(|e| b.io_err(&b.ckpt, e))
                    .and_then(|()| sys::remove_dir(&b.raw).map_err(|e| b.io_err(&b.raw, e)))
            } else {
                Ok(())
            };
            agree(world, cleared).await?;
            let (base_rss, r) = start(world).await?;
            reset &= r;
            let started = Instant::now();
            let saved = dcp_core::save_with(sd, &writer, world, &SaveOptions::default()).await?;
            let mine = Mine {
                ran: true,
                seconds: started.elapsed().as_secs_f64(),
                peak_rss: sys::status_bytes("VmHWM").unwrap_or(0),
                base_rss,
                ..Mine::default()
            };
            let mut r = rep_of(&gather(world, &mine).await?);
            let raw = if me == 0 {
                raw_save(b, &saved.metadata, &mut images, sync)
            } else {
                Ok(0.0)
            };
            r.raw_seconds = agree(world, raw).await?;
            md = Some(saved.metadata);
            if timed {
                reps.push(r);
            }
        }
        let md = md.expect("reps >= 1");
        let rec = if me == 0 {
            let mut rec = b.record(&md, label, b.ranks as u32, sync, &reps)?;
            rec.collective = "mpi";
            rec.peak_rss_reset = reset;
            rec
        } else {
            BenchRecord::default()
        };
        Ok((rec, md))
    }

    /// Rank 0's baseline of a save: the checkpoint's data files (read once,
    /// untimed) written raw into as many files, the checkpoint dropped from
    /// the page cache first, as without `--mpi`.
    fn raw_save(
        b: &Bench,
        md: &Metadata,
        images: &mut Option<Vec<Vec<u8>>>,
        sync: bool,
    ) -> Result<f64, CliError> {
        if images.is_none() {
            let mut v = Vec::with_capacity(md.files.len());
            for f in &md.files {
                let p = b.ckpt.join(&f.name);
                v.push(std::fs::read(&p).map_err(|e| b.io_err(&p, e))?);
            }
            *images = Some(v);
        }
        if b.cold.is_ok() {
            let files = sys::files_in(&b.ckpt).map_err(|e| b.io_err(&b.ckpt, e))?;
            sys::drop_from_cache(&files).map_err(CliError::msg)?;
        }
        std::fs::create_dir_all(&b.raw).map_err(|e| b.io_err(&b.raw, e))?;
        sys::sync_everything();
        let images = images.as_deref().expect("read above");
        let started = Instant::now();
        sys::raw_write(&b.raw, images, sync, b.raw_checksum()).map_err(|e| b.io_err(&b.raw, e))?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Rank 0: the load baseline's files, byte copies of the checkpoint's
    /// data files, flushed to disk.
    fn copy_raw(b: &Bench, md: &Metadata) -> Result<(), CliError> {
        sys::remove_dir(&b.raw).map_err(|e| b.io_err(&b.raw, e))?;
        std::fs::create_dir_all(&b.raw).map_err(|e| b.io_err(&b.raw, e))?;
        for (i, f) in md.files.iter().enumerate() {
            let from = b.ckpt.join(&f.name);
            std::fs::copy(&from, sys::raw_path(&b.raw, i)).map_err(|e| b.io_err(&from, e))?;
        }
        sys::sync_everything();
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn load_scenario(
        b: &Bench,
        world: &MpiGroup,
        group: Option<&MpiGroup>,
        md: &Metadata,
        sync: bool,
        raw_lens: &[usize],
        kind: ScenarioKind,
        cold: bool,
    ) -> Result<BenchRecord, CliError> {
        let me = world.rank();
        let reshard = kind != ScenarioKind::Load;
        let family = match kind {
            ScenarioKind::ReshardFsspec => "reshard_fsspec",
            ScenarioKind::Reshard => "reshard",
            _ => "load",
        };
        let label = format!("{family}_{}", if cold { "cold" } else { "warm" });
        let n = if reshard { b.load_ranks } else { b.ranks };
        let skipped = |why: &'static str| BenchRecord {
            workload: b.workload.kind.name(),
            scenario: label.clone(),
            collective: "mpi",
            cold_method: Some(why),
            ..BenchRecord::default()
        };
        // Every process decides alike: the cold probe's answer was shared,
        // and every process has the same build.
        let cold_method = match (&b.cold, cold) {
            (_, false) => None,
            (Ok(m), true) => Some(*m),
            (Err(e), true) => {
                if me == 0 {
                    eprintln!("dcp bench: {label}: cold not available ({e}); skipped");
                }
                return Ok(skipped("cold not available"));
            }
        };
        let options = ReaderOptions::default()
            .thread_count(b.args.threads as usize)
            .registry(crate::registry());
        let reader = if kind == ScenarioKind::ReshardFsspec {
            match b.fsspec_reader(options) {
                Ok(r) => r,
                Err(e) => {
                    if me == 0 {
                        eprintln!("dcp bench: {label}: not available ({e}); skipped");
                    }
                    return Ok(skipped("not available"));
                }
            }
        } else {
            dcp_core::FileSystemReader::new(Arc::new(dcp::fs::LocalFs::new(&b.ckpt)), options)
        };
        let raw_files: Vec<PathBuf> = (0..raw_lens.len())
            .map(|i| sys::raw_path(&b.raw, i))
            .collect();
        let mut reps = Vec::new();
        let mut verified = None;
        let mut reset = true;
        let warmups = usize::from(!cold);
        for rep in 0..warmups + b.args.reps as usize {
            let timed = rep >= warmups;
            b.progress.phase(format_args!(
                "{label}: {} with {n} processes",
                if timed { "rep" } else { "warm-up" }
            ));
            let dest = match group {
                Some(_) => b.workload.dest(me, n, reshard).map(Some),
                None => Ok(None),
            }
            .map_err(CliError::from)
            .and_then(|d| {
                if cold && me == 0 {
                    let files = sys::files_in(&b.ckpt).map_err(|e| b.io_err(&b.ckpt, e))?;
                    sys::drop_from_cache(&files).map_err(CliError::msg)?;
                }
                Ok(d)
            });
            let dest = agree(world, dest).await?;
            let (base_rss, r) = start(world).await?;
            reset &= r;
            let check = timed && verified.is_none() && !b.args.no_verify;
            let mut mine = Mine {
                base_rss,
                ..Mine::default()
            };
            if let (Some(dest), Some(g)) = (dest, group) {
                let started = Instant::now();
                let loaded = dcp_core::load(dest, &reader, g).await;
                mine.ran = true;
                mine.seconds = started.elapsed().as_secs_f64();
                match loaded {
                    Ok(l) => {
                        mine.bytes_read = l.stats.bytes_read;
                        mine.requests = l.stats.requests;
                        if check {
                            mine.mismatches = b
                                .workload
                                .check(std::slice::from_ref(&l.state_dict))
                                .into_iter()
                                .map(|m| m.replacen("rank 0", &format!("rank {me}"), 1))
                                .collect();
                        }
                    }
                    Err(e) => mine.error = Some(e.to_string()),
                }
            }
            mine.peak_rss = sys::status_bytes("VmHWM").unwrap_or(0);
            let all = gather(world, &mine).await?;
            if check {
                let bad: Vec<&String> = all.iter().flat_map(|m| &m.mismatches).collect();
                if me == 0 {
                    for line in bad.iter().take(10) {
                        eprintln!("mismatch: {label}: {line}");
                    }
                }
                verified = Some(bad.is_empty());
            }
            let mut r = rep_of(&all);
            let raw = if me == 0 {
                raw_load(b, raw_lens, &raw_files, cold)
            } else {
                Ok(0.0)
            };
            r.raw_seconds = agree(world, raw).await?;
            if timed {
                reps.push(r);
            }
        }
        if me != 0 {
            return Ok(BenchRecord {
                verified,
                ..BenchRecord::default()
            });
        }
        let mut rec = b.record(md, &label, n as u32, sync, &reps)?;
        rec.collective = "mpi";
        rec.cache = Some(if cold { "cold" } else { "warm" });
        rec.cold_method = cold_method;
        rec.verified = verified;
        rec.peak_rss_reset = reset;
        Ok(rec)
    }

    /// Rank 0's baseline of a load: every raw file read whole into resident
    /// buffers, from the same cache state, as without `--mpi`.
    fn raw_load(
        b: &Bench,
        raw_lens: &[usize],
        raw_files: &[PathBuf],
        cold: bool,
    ) -> Result<f64, CliError> {
        let mut bufs: Vec<Vec<u8>> = raw_lens
            .iter()
            .map(|&l| vec![crate::model::POISON; l])
            .collect();
        if cold {
            sys::drop_from_cache(raw_files).map_err(CliError::msg)?;
        }
        sys::sync_everything();
        let started = Instant::now();
        sys::raw_read(&b.raw, &mut bufs, b.raw_checksum()).map_err(|e| b.io_err(&b.raw, e))?;
        Ok(started.elapsed().as_secs_f64())
    }
}

//! [`FileSystemWriter`]: the writer of the design (torch's
//! `FileSystemWriter`) over any [`FileSystem`].

use crate::checkpoint::lease::Lease;
use crate::checkpoint::versioned::{read_versioned, Versioned};
use crate::checkpoint::{RankWrite, StorageWriter, WriteRecord, WriterOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::metadata::{DataFile, FormatKind, Metadata, MAX_METADATA_LEN};
use crate::pipeline::blocking;
use crate::pipeline::write::{write_file, FileJob, Lane, RecordJob, RecordResult, WriteConfig};
use crate::plan::SavePlan;
use crate::stage::budget::Budget;
use crate::stage::StagedGauge;
use crate::storage::{FileSystem, METADATA_FILE};
use async_trait::async_trait;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The writer of the design (torch's `FileSystemWriter`), generic over the
/// [`FileSystem`]: local disk, or an object store through OpenDAL.
///
/// Each save it coordinates holds the location's lease (see
/// [`StorageWriter::begin`]) from before any rank writes until the end of
/// the save; clones share the saves in progress.
#[derive(Clone, Debug)]
pub struct FileSystemWriter {
    fs: Arc<dyn FileSystem>,
    options: WriterOptions,
    active: Arc<Mutex<HashMap<String, Active>>>,
}

/// A save this writer coordinates, between `begin` and `end`.
#[derive(Debug)]
struct Active {
    lease: Lease,
    /// `.metadata` as it was when the save began (`None`: there was none).
    base: Option<Vec<u8>>,
    /// The version `base` was read at, where the store has a conditional
    /// replace (see [`Versioned::version`]): the commit swaps only over it.
    base_version: Option<Option<String>>,
    /// `base` decoded, when it decodes.
    previous: Option<Metadata>,
}

impl FileSystemWriter {
    /// A writer over `fs` with `options`. Refuses `thread_count == 0`, and a
    /// serialization format whose name or file extension is not valid
    /// ([`check_format_name`](crate::format::check_format_name); extensions
    /// are 1 to 16 bytes of `[a-z0-9]`).
    pub fn new(fs: Arc<dyn FileSystem>, options: WriterOptions) -> Result<Self> {
        if options.thread_count == 0 {
            return Err(Error::invalid("thread_count must be at least 1"));
        }
        let format = &options.serialization_format;
        crate::format::check_format_name(format.name())
            .and_then(|_| check_extension(format.file_extension()))
            .map_err(|e| {
                Error::invalid(format!("serialization format {format:?}: {}", e.message()))
            })?;
        Ok(FileSystemWriter {
            fs,
            options,
            active: Arc::default(),
        })
    }

    /// The options.
    pub fn options(&self) -> &WriterOptions {
        &self.options
    }

    /// The file system.
    pub fn fs(&self) -> &Arc<dyn FileSystem> {
        &self.fs
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, HashMap<String, Active>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Is `name` a data file dcp writes (and may therefore remove)? Data files
/// are named `__{rank}_{n}-{save_id}.{extension}`: a rank and a file number
/// in decimal, the save's 16 hex digits, and the format's extension
/// (`[a-z0-9]`, 1 to 16 bytes). Nothing else is ever removed.
pub fn is_data_file_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("__") else {
        return false;
    };
    let Some((stem, ext)) = rest.rsplit_once('.') else {
        return false;
    };
    let Some((ranks, id)) = stem.split_once('-') else {
        return false;
    };
    let Some((rank, n)) = ranks.split_once('_') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(rank)
        && digits(n)
        && id.len() == 16
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && check_extension(ext).is_ok()
}

/// The save id in a data file's name (see [`is_data_file_name`]).
fn data_file_save_id(name: &str) -> Option<&str> {
    if !is_data_file_name(name) {
        return None;
    }
    let stem = name.rsplit_once('.')?.0;
    Some(stem.split_once('-')?.1)
}

/// Read `.metadata` whole: `None` when there is none.
fn read_metadata_bytes(fs: &dyn FileSystem) -> Result<Option<Vec<u8>>> {
    match fs.read_small(METADATA_FILE, MAX_METADATA_LEN) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// `.metadata` (raw bytes, or `None`) for messages: its save and generation.
fn describe_metadata(bytes: Option<&[u8]>) -> String {
    match bytes {
        None => "no checkpoint".into(),
        Some(b) => match Metadata::decode(b) {
            Ok(m) => format!("save {} (generation {})", m.save_id, m.generation),
            Err(e) => format!("an unreadable .metadata ({})", e.message()),
        },
    }
}

/// The compare of a commit failed: `.metadata` is no longer the checkpoint
/// the save began from. If it holds this save (a retried conditional PUT
/// whose first reply was lost), the commit took effect; otherwise another
/// writer replaced it and nothing was committed (`Busy`).
fn changed_or_ours(fs: &dyn FileSystem, save_id: &str, base: Option<&[u8]>) -> Result<()> {
    let current = read_metadata_bytes(fs)?;
    if let Some(b) = &current {
        if Metadata::decode(b).is_ok_and(|m| m.save_id == save_id) {
            tracing::warn!(
                location = %fs.location(),
                "save {save_id} committed (.metadata holds it); a retried write found it already in place"
            );
            return Ok(());
        }
    }
    Err(Error::new(
        ErrorKind::Busy,
        format!(
            "the checkpoint at {} changed while save {save_id} ran: it started from {} and .metadata now holds {}; nothing was committed",
            fs.location(),
            describe_metadata(base),
            describe_metadata(current.as_deref()),
        ),
    ))
}

/// The write of `.metadata` failed with `e`, which may have come after it
/// took effect (a failed directory fsync after the rename, a lost reply to
/// the PUT): decide from what `.metadata` holds now, never guess. `Ok` when
/// it holds this save (the error becomes a warning), `e` when it still
/// holds the base, `OutcomeUnknown` otherwise (no rank may remove a file).
fn resolve_failed_commit(
    fs: &dyn FileSystem,
    save_id: &str,
    base: Option<&[u8]>,
    e: Error,
) -> Result<()> {
    match read_metadata_bytes(fs) {
        Ok(Some(b)) if Metadata::decode(&b).is_ok_and(|m| m.save_id == save_id) => {
            tracing::warn!(
                location = %fs.location(),
                "save {save_id} committed (.metadata holds it), but the commit reported: {e}"
            );
            Ok(())
        }
        Ok(now) if now.as_deref() == base => Err(e),
        Ok(now) => Err(Error::new(
            ErrorKind::OutcomeUnknown,
            format!(
                "the commit of save {save_id} to {} failed ({e}), and .metadata now holds {}, neither this save nor the one it started from: the outcome is unknown; every data file was kept",
                fs.location(),
                describe_metadata(now.as_deref())
            ),
        )),
        Err(re) => Err(Error::new(
            ErrorKind::OutcomeUnknown,
            format!(
                "the commit of save {save_id} to {} failed ({e}), and .metadata could not be read back ({re}): the outcome is unknown; every data file was kept",
                fs.location()
            ),
        )),
    }
}

/// Check a format's data-file extension: 1 to 16 bytes of `[a-z0-9]`.
fn check_extension(ext: &str) -> Result<()> {
    if (1..=16).contains(&ext.len())
        && ext
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "data-file extension {ext:?} is not 1 to 16 bytes of [a-z0-9]"
        )))
    }
}

#[async_trait]
impl StorageWriter for FileSystemWriter {
    fn location(&self) -> String {
        self.fs.location()
    }

    fn format(&self) -> FormatKind {
        FormatKind::from_name(self.options.serialization_format.name())
    }

    fn check_plan(&self, _plan: &SavePlan) -> Result<()> {
        self.options
            .serialization_format
            .check_transforms(&self.options.extensions)
    }

    async fn prepare(&self) -> Result<()> {
        let fs = self.fs.clone();
        let overwrite = self.options.overwrite;
        blocking(move || {
            fs.prepare()?;
            if !overwrite && fs.file_len(METADATA_FILE)?.is_some() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "a checkpoint already exists at {}; pass overwrite = true to replace it",
                        fs.location()
                    ),
                ));
            }
            Ok(())
        })
        .await
    }

    async fn write_rank(
        &self,
        rank: usize,
        save_id: &str,
        records: Vec<WriteRecord>,
    ) -> Result<RankWrite> {
        let opts = &self.options;
        let ext = opts.serialization_format.file_extension();
        let sizes: Vec<usize> = records.iter().map(|r| r.data.len() as usize).collect();
        let buckets = if opts.single_file_per_rank {
            bucket(&sizes, opts.thread_count)
        } else {
            (0..records.len()).map(|i| vec![i]).collect()
        };
        let jobs: Vec<FileJob> = buckets
            .into_iter()
            .enumerate()
            .map(|(k, idx)| FileJob {
                file_name: format!("__{rank}_{k}-{save_id}.{ext}"),
                records: idx
                    .into_iter()
                    .map(|i| {
                        let r = &records[i];
                        RecordJob {
                            name: r.name.clone(),
                            index: r.index.clone(),
                            dtype: r.dtype,
                            whole: r.whole,
                            data: r.data.clone(),
                        }
                    })
                    .collect(),
            })
            .collect();
        drop(records);
        let cfg = WriteConfig {
            format: opts.serialization_format.clone(),
            sync: opts.sync_files,
            piece: opts.per_thread_copy_ahead,
            save_id: save_id.to_string(),
            transforms: opts
                .extensions
                .iter()
                .enumerate()
                .map(|(i, t)| (i as u32, t.clone()))
                .collect(),
        };
        let transforms: Vec<String> = opts.extensions.iter().map(|t| t.descriptor()).collect();
        let fs = self.fs.clone();
        let threads = opts.thread_count;
        let started = Instant::now();
        let out = blocking(move || {
            let rw = write_files(fs.as_ref(), &jobs, &cfg, threads);
            rw.map(|mut rw| {
                rw.transforms = transforms;
                rw
            })
        })
        .await?;
        tracing::debug!(
            rank,
            bytes = out.bytes(),
            seconds = started.elapsed().as_secs_f64(),
            "wrote rank"
        );
        Ok(out)
    }

    async fn begin(&self, save_id: &str) -> Result<u64> {
        let fs = self.fs.clone();
        let opts = &self.options;
        let (expiry, wait, sync) = (opts.lease_expiry, opts.lease_wait, opts.sync_files);
        let overwrite = opts.overwrite;
        let id = save_id.to_string();
        let (active, generation) = blocking(move || {
            let lease = Lease::acquire(fs.clone(), &id, expiry, wait, sync)?;
            let base = match read_versioned(fs.as_ref(), METADATA_FILE, MAX_METADATA_LEN) {
                Ok(b) => b,
                Err(e) => {
                    lease.release();
                    return Err(e.context("read the current .metadata"));
                }
            };
            let Versioned {
                bytes: base,
                version: base_version,
            } = base;
            if !overwrite && base.is_some() {
                // A checkpoint appeared between `prepare` and the lease (a
                // save that held it committed while this one waited).
                lease.release();
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "a checkpoint already exists at {}; pass overwrite = true to replace it",
                        fs.location()
                    ),
                ));
            }
            let previous = base.as_deref().and_then(|b| Metadata::decode(b).ok());
            let generation = previous.as_ref().map_or(0, |m| m.generation) + 1;
            Ok((
                Active {
                    lease,
                    base,
                    base_version,
                    previous,
                },
                generation,
            ))
        })
        .await?;
        self.lock_active().insert(save_id.to_string(), active);
        Ok(generation)
    }

    async fn commit(&self, metadata: &Metadata, encoded: &[u8]) -> Result<()> {
        let fs = self.fs.clone();
        let sync = self.options.sync_files;
        let data = encoded.to_vec();
        let active = self.active.clone();
        let save_id = metadata.save_id.clone();
        blocking(move || {
            let guard = active.lock().unwrap_or_else(|p| p.into_inner());
            let a = guard.get(&save_id).ok_or_else(|| {
                Error::invalid(format!("commit of save {save_id}, which did not begin"))
            })?;
            a.lease.check()?;
            if sync {
                // The data files' directory entries are durable before the
                // checkpoint that names them is.
                fs.sync_dir()?;
            }
            let outcome = match &a.base_version {
                // Compare-and-swap by the store itself (If-Match on the
                // ETag; a directory lock on local disk).
                Some(version) => fs.replace_if(METADATA_FILE, &data, sync, version.as_deref()),
                // No conditional replace: compare under the lease, then swap.
                None => match read_metadata_bytes(fs.as_ref())? {
                    current if current == a.base => {
                        fs.write_atomic(METADATA_FILE, &data, sync).map(|()| true)
                    }
                    _ => Ok(false),
                },
            };
            match outcome {
                Ok(true) => Ok(()),
                Ok(false) => changed_or_ours(fs.as_ref(), &save_id, a.base.as_deref()),
                Err(e) => resolve_failed_commit(fs.as_ref(), &save_id, a.base.as_deref(), e),
            }
        })
        .await
    }

    async fn cleanup(&self, metadata: &Metadata) -> Result<Vec<String>> {
        let fs = self.fs.clone();
        let previous = self
            .lock_active()
            .get(&metadata.save_id)
            .and_then(|a| a.previous.clone());
        // Kept: the new checkpoint's files and the previous one's (a load
        // that read the previous .metadata before this commit still finds
        // its files), and any file of those two saves.
        let mut keep: HashSet<String> = metadata.files.iter().map(|f| f.name.clone()).collect();
        let mut keep_ids: HashSet<String> = HashSet::from([metadata.save_id.clone()]);
        if let Some(p) = previous {
            keep.extend(p.files.into_iter().map(|f| f.name));
            keep_ids.insert(p.save_id);
        }
        blocking(move || {
            // Under this save's lease no other save is live: a data file of
            // any other save id belongs to an older generation or to a save
            // that died.
            let mut removed = Vec::new();
            for f in fs.list()? {
                let Some(id) = data_file_save_id(&f.name) else {
                    continue;
                };
                if !keep.contains(&f.name) && !keep_ids.contains(id) {
                    fs.remove(&f.name)?;
                    removed.push(f.name);
                }
            }
            Ok(removed)
        })
        .await
    }

    async fn end(&self, save_id: &str) {
        let Some(a) = self.lock_active().remove(save_id) else {
            return;
        };
        let _ = blocking(move || {
            a.lease.release();
            Ok(())
        })
        .await;
    }

    async fn discard(&self, files: &[DataFile]) {
        let fs = self.fs.clone();
        let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
        let _ = blocking(move || {
            for n in names {
                if let Err(e) = fs.remove(&n) {
                    tracing::warn!("could not remove {n} after a failed save: {e}");
                }
            }
            Ok(())
        })
        .await;
    }
}

/// Bucket records of `sizes` bytes into at most `buckets` files: largest
/// first into the least-loaded bucket (ties to the lowest index), then each
/// bucket in state-dict order. Returns record indices per bucket.
fn bucket(sizes: &[usize], buckets: usize) -> Vec<Vec<usize>> {
    let n = buckets.min(sizes.len());
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let mut loads = vec![0usize; n];
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    for i in order {
        let k = (0..n)
            .min_by_key(|&k| (loads[k], k))
            .expect("n > 0 when records exist");
        loads[k] += sizes[i];
        out[k].push(i);
    }
    for b in &mut out {
        b.sort_unstable();
    }
    out
}

/// What writing one data file gave: the file and where its records went.
type FileOutcome = Result<(DataFile, Vec<RecordResult>)>;

/// Write `jobs` on at most `threads` scoped worker threads, each taking the
/// next job. After the first failure no new file is started, and the files
/// already written are removed. Blocking.
fn write_files(
    fs: &dyn FileSystem,
    jobs: &[FileJob],
    cfg: &WriteConfig,
    threads: usize,
) -> Result<RankWrite> {
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Option<FileOutcome>>> = Mutex::new((0..jobs.len()).map(|_| None).collect());
    let failed = std::sync::atomic::AtomicBool::new(false);
    let gauge = Arc::new(StagedGauge::default());
    std::thread::scope(|s| {
        for index in 0..threads.min(jobs.len()) {
            let lane = Lane {
                index,
                budget: Budget::new(cfg.piece as u64, gauge.clone()),
            };
            let (next, done, failed) = (&next, &done, &failed);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs.len() || failed.load(Ordering::Relaxed) {
                    break;
                }
                let r = write_file(fs, &jobs[i], i as u32, cfg, &lane);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                done.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    let done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut rw = RankWrite {
        staged_peak_bytes: gauge.peak(),
        ..RankWrite::default()
    };
    let mut first_err = None;
    for r in done.into_iter().flatten() {
        match r {
            Ok((file, recs)) => {
                rw.files.push(file);
                for rec in recs {
                    let mut st = rec.storage;
                    st.file = (rw.files.len() - 1) as u32;
                    rw.records.push((rec.name, rec.index, st));
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        for f in &rw.files {
            let _ = fs.remove(&f.name);
        }
        return Err(e);
    }
    Ok(rw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_balance_bytes_and_keep_state_dict_order() {
        // 50 and 30 open the buckets, 20 joins 30, 10 goes to the lower index on a tie.
        assert_eq!(bucket(&[10, 50, 30, 20], 2), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(bucket(&[5, 5, 5], 8), vec![vec![0], vec![1], vec![2]]);
        assert!(bucket(&[], 4).is_empty());
    }

    #[test]
    fn data_file_names_of_any_format_are_recognised() {
        for good in [
            "__0_0-0123456789abcdef.dcp",
            "__12_3-0123456789ABCDEF.safetensors",
            "__1_0-0123456789abcdef.frm",
        ] {
            assert!(is_data_file_name(good), "{good}");
        }
        for bad in [
            "__0_0.distcp",
            "__0_0-0123.dcp",
            "__x_0-0123456789abcdef.dcp",
            "__0_0-0123456789abcdef.",
            "__0_0-0123456789abcdef.D",
            "model.safetensors",
            ".metadata",
        ] {
            assert!(!is_data_file_name(bad), "{bad}");
        }
    }
}

//! The physical baseline and the measurements around it: raw sequential
//! writes and reads of the same bytes into the same number of files,
//! dropping files from the page cache, syncing, and peak RSS.

use bytes::Bytes;
use dcp_core::{Item, Metadata, StateDict};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// How cold loads are made cold.
pub const COLD_METHOD: &str =
    "posix_fadvise(POSIX_FADV_DONTNEED) on every data file (after fdatasync), via rustix::fs::fadvise";

/// One file of the raw baseline: a checkpoint data file's length, and the
/// record bytes at the offsets the checkpoint stores them (gaps are zeros).
#[derive(Clone, Debug)]
pub struct RawFile {
    /// The file's length.
    pub len: u64,
    /// `(offset, bytes)` of every record in the file.
    pub pieces: Vec<(u64, Bytes)>,
}

impl RawFile {
    /// The file's bytes, in a buffer whose every page has been written.
    pub fn image(&self) -> Vec<u8> {
        let mut buf = vec![crate::model::POISON; self.len as usize];
        let mut at = 0usize;
        for (off, data) in &self.pieces {
            let off = *off as usize;
            buf[at..off].fill(0);
            buf[off..off + data.len()].copy_from_slice(data);
            at = off + data.len();
        }
        buf[at..].fill(0);
        buf
    }
}

/// The raw mirror of the data files of `md`, saved from `sds`: one
/// [`RawFile`] per data file, with the same records at the same offsets.
pub fn mirror(md: &Metadata, sds: &[StateDict]) -> Result<Vec<RawFile>, String> {
    let mut held: HashMap<(&str, &[u64]), &Bytes> = HashMap::new();
    for sd in sds {
        for (name, item) in sd.iter() {
            match item {
                Item::Tensor(t) => {
                    for c in &t.chunks {
                        let data = c.data.host().ok_or_else(|| {
                            format!("{name}: the raw mirror needs chunks in host memory")
                        })?;
                        held.insert((name.as_str(), c.region.offsets.as_slice()), data);
                    }
                }
                Item::Bytes { data, .. } => {
                    held.insert((name.as_str(), &[]), data);
                }
            }
        }
    }
    let mut files: Vec<RawFile> = md
        .files
        .iter()
        .map(|f| RawFile {
            len: f.length,
            pieces: Vec::new(),
        })
        .collect();
    for (name, region, storage) in md.records() {
        let offsets: &[u64] = region.map(|r| r.offsets.as_slice()).unwrap_or(&[]);
        let data = held
            .get(&(name, offsets))
            .ok_or_else(|| format!("{name}: saved but not held by any rank"))?;
        if data.len() as u64 != storage.length {
            return Err(format!(
                "{name}: stored as {} bytes, held as {} (transformed records have no raw mirror)",
                storage.length,
                data.len()
            ));
        }
        let f = files
            .get_mut(storage.file as usize)
            .ok_or_else(|| format!("{name}: file index out of range"))?;
        f.pieces.push((storage.offset, (*data).clone()));
    }
    for f in &mut files {
        f.pieces.sort_by_key(|p| p.0);
        let end = f.pieces.last().map_or(0, |(o, d)| o + d.len() as u64);
        if end > f.len {
            return Err("a record ends past its file".into());
        }
    }
    Ok(files)
}

/// The path of raw file `i` in `dir`.
pub fn raw_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("raw_{i}.bin"))
}

/// A checksum the raw baseline computes over every byte it moves, as dcp
/// does when its saves record one (the physical limit of a verified save or
/// load is the I/O plus one checksum pass).
pub type Checksum = fn(&[u8]) -> u32;

/// Write `images[i]` to [`raw_path`]`(dir, i)`, one thread per file, each with
/// `File::create` + one `write_all` (+ `sync_all` with `sync`, and then an
/// fsync of the directory, as dcp does). With `checksum`, each thread first
/// computes it over its image.
pub fn raw_write(
    dir: &Path,
    images: &[Vec<u8>],
    sync: bool,
    checksum: Option<Checksum>,
) -> std::io::Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                s.spawn(move || -> std::io::Result<()> {
                    if let Some(c) = checksum {
                        std::hint::black_box(c(img));
                    }
                    let mut f = File::create(raw_path(dir, i))?;
                    f.write_all(img)?;
                    if sync {
                        f.sync_all()?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|_| Err(panicked())))
    })?;
    if sync {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Read [`raw_path`]`(dir, i)` whole into `bufs[i]` (already the file's
/// length and resident), one thread per file, one `read_exact` each; with
/// `checksum`, each thread then computes it over what it read.
pub fn raw_read(
    dir: &Path,
    bufs: &mut [Vec<u8>],
    checksum: Option<Checksum>,
) -> std::io::Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| {
                s.spawn(move || -> std::io::Result<()> {
                    File::open(raw_path(dir, i))?.read_exact(buf)?;
                    if let Some(c) = checksum {
                        std::hint::black_box(c(buf));
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|_| Err(panicked())))
    })
}

fn panicked() -> std::io::Error {
    std::io::Error::other("an I/O thread panicked")
}

/// Drop `paths` from the page cache: `fdatasync` (only clean pages can be
/// dropped), then `posix_fadvise(POSIX_FADV_DONTNEED)` over the whole file.
pub fn drop_from_cache(paths: &[PathBuf]) -> Result<(), String> {
    for p in paths {
        let f = File::open(p).map_err(|e| format!("open {}: {e}", p.display()))?;
        f.sync_data()
            .map_err(|e| format!("fdatasync {}: {e}", p.display()))?;
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
            .map_err(|e| format!("posix_fadvise {}: {e}", p.display()))?;
    }
    Ok(())
}

/// Whether files in `dir` can be dropped from the page cache: `Ok` with the
/// method, or why not.
pub fn probe_cold(dir: &Path) -> Result<&'static str, String> {
    let p = dir.join(".dcp-bench-probe");
    std::fs::write(&p, [0u8; 4096]).map_err(|e| format!("write {}: {e}", p.display()))?;
    let r = drop_from_cache(std::slice::from_ref(&p));
    let _ = std::fs::remove_file(&p);
    r.map(|()| COLD_METHOD)
}

/// Every regular file directly in `dir`.
pub fn files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Flush every dirty page of the system (`sync(2)`), so that writeback of
/// earlier work does not run during a timed phase.
pub fn sync_everything() {
    rustix::fs::sync();
}

/// Remove `dir` and everything in it; a missing directory is fine.
pub fn remove_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A `/proc/self/status` field in bytes (`VmHWM`, `VmRSS`).
pub fn status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Reset the peak RSS (`VmHWM`) to the current RSS by writing `5` to
/// `/proc/self/clear_refs`. Returns whether that was allowed.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_places_pieces_and_zeros_gaps() {
        let f = RawFile {
            len: 10,
            pieces: vec![
                (2, Bytes::from_static(b"ab")),
                (6, Bytes::from_static(b"c")),
            ],
        };
        assert_eq!(f.image(), b"\0\0ab\0\0c\0\0\0");
    }

    #[test]
    fn raw_write_read_round_trip_and_cache_drop() {
        let d = tempfile::tempdir().unwrap();
        let images = vec![vec![1u8; 5000], vec![2u8; 3]];
        raw_write(d.path(), &images, true, Some(dcp::Crc32c::checksum)).unwrap();
        let mut bufs = vec![vec![0u8; 5000], vec![0u8; 3]];
        raw_read(d.path(), &mut bufs, Some(dcp::Crc32c::checksum)).unwrap();
        assert_eq!(bufs, images);
        // Where the kernel refuses, the bench says "cold not available".
        let _ = drop_from_cache(&files_in(d.path()).unwrap());
        assert!(status_bytes("VmRSS").unwrap() > 0);
        assert!(status_bytes("VmHWM").unwrap() > 0);
    }
}

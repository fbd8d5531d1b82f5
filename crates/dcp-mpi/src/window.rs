//! MPI shared memory: one window (`MPI_Win_allocate_shared`) over the
//! processes of one node, through which a resharded load moves the slices
//! one process read for another of its node (dcp-core's
//! [`NodeWindow`]). rsmpi 0.8 wraps no windows, so this module calls the C
//! functions through `mpi::ffi`; every `unsafe` block of the crate's
//! window path is here.
//!
//! * [`Window::allocate`] / [`Window::free`]: blocking MPI collectives over
//!   the node communicator. [`MpiGroup`](crate::MpiGroup) calls them only
//!   right after a deadline-bounded all-gather that every rank passed, so
//!   every process of the node enters them within moments of the others.
//! * [`Window::sync`]: `MPI_Win_sync`, a local memory barrier (the window
//!   is in a passive-target epoch, `MPI_Win_lock_all` with
//!   `MPI_MODE_NOCHECK`, from allocation to free).
//! * [`Segments`]: what a load sees; safe. This process writes only its
//!   own segment, through [`Piece`]s (disjoint, at most one carving alive
//!   at a time), and reads the other processes' segments only by copying
//!   (never a reference to memory another process may write).

use crate::env::lock;
use dcp_core::model::TensorBuffer;
use dcp_core::{Error, ErrorKind, NodeWindow, Result};
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::SimpleCommunicator;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};

/// One shared-memory window of the node's processes.
pub(crate) struct Window {
    win: ffi::MPI_Win,
    /// This process's rank on the node communicator.
    me: usize,
    /// Every node rank's segment: start and length.
    segments: Vec<(*mut u8, usize)>,
    /// Whether [`Piece`]s of this process's segment are alive.
    carved: AtomicBool,
}

// SAFETY: `Window` holds an MPI handle and pointers into memory MPI
// mapped for the window, which stays mapped until `free` (which consumes
// the window) or the end of the process; none of it is tied to a thread.
// MPI calls on the handle happen only under the process-wide MPI lock
// (`allocate`, `sync` and `free` demand its guard), which is what thread
// level `Serialized` requires (`MpiGroup` refuses lower levels). The
// memory is written only through `Piece`s, which `carved` keeps to one
// disjoint set at a time, and read only by copying.
unsafe impl Send for Window {}
// SAFETY: see `Send`: `&Window` allows MPI calls only under the MPI lock,
// reading other segments by copying, and carving guarded by `carved`.
unsafe impl Sync for Window {}

/// An MPI return code as a dcp error.
fn check(rc: std::ffi::c_int, what: &str) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Collective,
            format!("{what} failed (MPI error {rc})"),
        ))
    }
}

impl Window {
    /// Allocate a window in which this process's segment holds `len` bytes,
    /// collectively over `node` (every process of it calls this, each with
    /// its own length), and open the passive-target epoch that
    /// [`Window::sync`] needs.
    pub(crate) fn allocate(
        node: &SimpleCommunicator,
        me: usize,
        node_size: usize,
        len: usize,
        _held: &MutexGuard<'static, ()>,
    ) -> Result<Window> {
        let size = ffi::MPI_Aint::try_from(len)
            .map_err(|_| Error::invalid(format!("a window of {len} bytes is too large")))?;
        let mut base: *mut u8 = std::ptr::null_mut();
        // SAFETY: an `MPI_Win` is a plain handle (a pointer in Open MPI);
        // all zeros is a valid value to be overwritten below.
        let mut win: ffi::MPI_Win = unsafe { std::mem::zeroed() };
        // SAFETY: collective over `node`, a live communicator (its owner
        // holds it for as long as this call runs); `base` and `win` are
        // valid out-pointers of the types MPI writes (`void **` as
        // `*mut *mut u8`, `MPI_Win *`); `RSMPI_INFO_NULL` is
        // `MPI_INFO_NULL`; the MPI lock is held (`_held`), so no other
        // thread of this process is inside MPI.
        let rc = unsafe {
            ffi::MPI_Win_allocate_shared(
                size,
                1,
                ffi::RSMPI_INFO_NULL,
                node.as_raw(),
                &mut base as *mut *mut u8 as *mut std::ffi::c_void,
                &mut win,
            )
        };
        check(rc, "MPI_Win_allocate_shared")?;
        let mut segments = Vec::with_capacity(node_size);
        for rank in 0..node_size {
            let mut size: ffi::MPI_Aint = 0;
            let mut unit: std::ffi::c_int = 0;
            let mut ptr: *mut u8 = std::ptr::null_mut();
            // SAFETY: `win` was allocated above; `rank` is a rank of its
            // communicator (`0..node_size`); the out-pointers are valid
            // for the types MPI writes (`MPI_Aint *`, `int *`, `void **`).
            let rc = unsafe {
                ffi::MPI_Win_shared_query(
                    win,
                    rank as std::ffi::c_int,
                    &mut size,
                    &mut unit,
                    &mut ptr as *mut *mut u8 as *mut std::ffi::c_void,
                )
            };
            check(rc, "MPI_Win_shared_query")?;
            let size = usize::try_from(size).unwrap_or(0);
            segments.push((if size == 0 { std::ptr::null_mut() } else { ptr }, size));
        }
        if segments.get(me).map(|s| s.1) != Some(len) {
            return Err(Error::new(
                ErrorKind::Collective,
                format!("MPI gave this process a window segment of other than {len} bytes"),
            ));
        }
        // SAFETY: `win` is a window allocated above, in no epoch yet;
        // `MPI_MODE_NOCHECK` (no conflicting locks: nobody locks this window
        // exclusively) makes this a local call that waits for nobody.
        let rc = unsafe { ffi::MPI_Win_lock_all(ffi::MPI_MODE_NOCHECK as std::ffi::c_int, win) };
        check(rc, "MPI_Win_lock_all")?;
        Ok(Window {
            win,
            me,
            segments,
            carved: AtomicBool::new(false),
        })
    }

    /// This process's segment length.
    pub(crate) fn own_len(&self) -> usize {
        self.segments[self.me].1
    }

    /// `MPI_Win_sync`: a memory barrier for the window (local, waits for
    /// nobody).
    pub(crate) fn sync(&self, _held: &MutexGuard<'static, ()>) {
        // SAFETY: `self.win` is a live window (freeing consumes `self`) in
        // the passive-target epoch opened by `allocate`, as `MPI_Win_sync`
        // requires; the MPI lock is held.
        let rc = unsafe { ffi::MPI_Win_sync(self.win) };
        if rc != 0 {
            tracing::warn!("MPI_Win_sync failed (MPI error {rc})");
        }
    }

    /// Close the epoch and free the window, collectively over the node (every
    /// process of it calls this). Only with no [`Piece`] or [`Segments`]
    /// alive: the caller owns the last reference.
    pub(crate) fn free(mut self, _held: &MutexGuard<'static, ()>) {
        // SAFETY: the window is live and in the epoch `allocate` opened;
        // the MPI lock is held.
        let rc = unsafe { ffi::MPI_Win_unlock_all(self.win) };
        if rc != 0 {
            tracing::warn!("MPI_Win_unlock_all failed (MPI error {rc})");
        }
        // SAFETY: collective over the window's communicator, which every
        // process of the node calls at the same point (see the module
        // docs); `self` is consumed and was the last reference (the caller
        // took it out of an `Arc` it held alone), so no `Piece` or
        // `Segments` can touch the memory after it is unmapped.
        let rc = unsafe { ffi::MPI_Win_free(&mut self.win) };
        if rc != 0 {
            tracing::warn!("MPI_Win_free failed (MPI error {rc})");
        }
    }
}

/// A window as dcp-core's [`NodeWindow`]: the window (none while no
/// process of the node needs one), the group ranks of the node, and the
/// counter of bytes copied out of peers' segments.
pub(crate) struct Segments {
    pub(crate) window: Option<Arc<Window>>,
    /// Group ranks of the node, in node-rank order (ascending).
    pub(crate) ranks: Arc<Vec<usize>>,
    pub(crate) copied: Arc<AtomicU64>,
}

impl Segments {
    fn node_rank(&self, rank: usize) -> Option<usize> {
        self.ranks.binary_search(&rank).ok()
    }
}

impl NodeWindow for Segments {
    fn node_ranks(&self) -> &[usize] {
        &self.ranks
    }

    fn segment_len(&self, rank: usize) -> usize {
        match (&self.window, self.node_rank(rank)) {
            (Some(w), Some(i)) => w.segments[i].1,
            _ => 0,
        }
    }

    fn carve(&self, lens: &[usize]) -> Result<Vec<Box<dyn TensorBuffer>>> {
        let total = lens
            .iter()
            .try_fold(0usize, |a, &l| a.checked_add(l))
            .ok_or_else(|| Error::invalid("window pieces overflow"))?;
        if total == 0 {
            return Ok(lens
                .iter()
                .map(|_| Box::new(Vec::<u8>::new()) as Box<dyn TensorBuffer>)
                .collect());
        }
        let Some(w) = &self.window else {
            return Err(Error::invalid(format!(
                "{total} bytes asked of a shared-memory segment of 0"
            )));
        };
        if total > w.own_len() {
            return Err(Error::invalid(format!(
                "{total} bytes asked of a shared-memory segment of {}",
                w.own_len()
            )));
        }
        if w.carved.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                ErrorKind::Collective,
                "the shared-memory segment is still lent out",
            ));
        }
        let guard = Arc::new(Carving(w.clone()));
        let base = w.segments[w.me].0;
        let mut at = 0usize;
        let mut out: Vec<Box<dyn TensorBuffer>> = Vec::with_capacity(lens.len());
        for &len in lens {
            out.push(Box::new(Piece {
                // SAFETY: `at + len <= total <= own_len`, so the offset
                // stays inside this process's segment (`base` is non-null:
                // the segment is not empty).
                ptr: unsafe { base.add(at) },
                len,
                _carving: guard.clone(),
            }));
            at += len;
        }
        Ok(out)
    }

    fn copy_out(&self, rank: usize, runs: &[(usize, usize, usize)], dst: &mut [u8]) -> Result<()> {
        let (Some(w), Some(i)) = (&self.window, self.node_rank(rank)) else {
            if runs.iter().all(|r| r.2 == 0) {
                return Ok(());
            }
            return Err(Error::invalid(format!(
                "rank {rank} has no shared-memory segment this process can read"
            )));
        };
        let (ptr, seg_len) = w.segments[i];
        let mut total = 0u64;
        for &(from, to, len) in runs {
            let inside = |at: usize, limit: usize| at.checked_add(len).is_some_and(|e| e <= limit);
            if !inside(from, seg_len) || !inside(to, dst.len()) {
                return Err(Error::invalid(format!(
                    "run of {len} bytes from {from} to {to} is outside rank {rank}'s shared-memory segment of {seg_len} or the destination of {}",
                    dst.len()
                )));
            }
            total += len as u64;
        }
        for &(from, to, len) in runs {
            if len == 0 {
                continue;
            }
            // SAFETY: `from + len <= seg_len`, the length MPI reported for
            // that segment (non-empty, so `ptr` is its start), which stays
            // mapped while `w` (an `Arc` held here) lives; `to + len <=
            // dst.len()` (both checked above); `dst` is an exclusively
            // borrowed Rust buffer, not window memory, so the ranges cannot
            // overlap. The source is copied, never borrowed: if a peer broke
            // the protocol and wrote meanwhile, the bytes copied would be
            // wrong, not this process's memory unsound.
            unsafe { std::ptr::copy_nonoverlapping(ptr.add(from), dst.as_mut_ptr().add(to), len) };
        }
        self.copied.fetch_add(total, Ordering::Relaxed);
        Ok(())
    }

    fn sync(&self) {
        if let Some(w) = &self.window {
            let g = lock();
            w.sync(&g);
        }
    }
}

/// Holds one carving of this process's segment: when its last [`Piece`]
/// is dropped, the segment may be carved again.
struct Carving(Arc<Window>);

impl Drop for Carving {
    fn drop(&mut self) {
        self.0.carved.store(false, Ordering::Release);
    }
}

/// A disjoint part of this process's segment, for a load to fill.
struct Piece {
    ptr: *mut u8,
    len: usize,
    _carving: Arc<Carving>,
}

// SAFETY: a `Piece` is the only handle to its bytes in this process:
// `Segments::carve` hands out disjoint ranges, and no second carving until
// every piece of this one is dropped; other processes only read them
// (between collective operations). The memory stays mapped while the
// `Arc<Window>` inside `_carving` lives.
unsafe impl Send for Piece {}
// SAFETY: `&Piece` only gives `&[u8]` (`as_bytes`); writing needs `&mut`.
unsafe impl Sync for Piece {}

impl TensorBuffer for Piece {
    fn as_bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr..ptr+len` lies in this process's segment (see
        // `carve`), mapped while `_carving` lives, and only this piece
        // writes it (`as_mut_bytes` needs `&mut self`).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_bytes(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as `as_bytes`, and `&mut self` makes this the only
        // reference to these bytes in this process; other processes never
        // write this segment.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

//! The MPI environment: initialisation, finalisation, and the one lock
//! every MPI call of this crate takes.
//!
//! dcp calls MPI from threads of its own (one per collective operation, see
//! [`crate::group`]), so MPI must run at thread level `Serialized` or
//! `Multiple`. At `Serialized` no two threads may be inside MPI at once:
//! every call this crate makes holds [`lock`], and [`Mpi`] finalizes under
//! it. (An application that calls MPI itself at `Serialized`, beside dcp,
//! must not do so while a dcp operation is running.)

use dcp_core::{Error, ErrorKind, Result};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::Threading;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

static MPI_LOCK: Mutex<()> = Mutex::new(());

/// Set (under [`lock`]) just before [`Mpi`] finalizes MPI: a thread still
/// waiting on a failed operation's requests stops calling MPI.
static FINALIZING: AtomicBool = AtomicBool::new(false);

/// Hold this while calling MPI. Never poisoned for good: a panic while
/// holding it leaves no state behind, so the next caller goes on.
pub(crate) fn lock() -> MutexGuard<'static, ()> {
    MPI_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether MPI is finalized or about to be (call under [`lock`]): no MPI
/// call may be made any more.
pub(crate) fn finalizing() -> bool {
    FINALIZING.load(Ordering::SeqCst) || mpi::environment::is_finalized()
}

/// Whether `t` lets dcp call MPI from its own threads.
pub(crate) fn threads_allowed(t: Threading) -> bool {
    matches!(t, Threading::Serialized | Threading::Multiple)
}

/// MPI, initialized for dcp: thread level `Multiple` where the library
/// offers it, else `Serialized`. Dropping it finalizes MPI (every process
/// of the job must then drop theirs: `MPI_Finalize` is collective).
///
/// An application that initializes MPI itself (with
/// `mpi::initialize_with_threading(Threading::Serialized)` or `Multiple`)
/// does not need this: it passes its communicator to
/// [`MpiGroup::new`](crate::MpiGroup::new).
pub struct Mpi {
    universe: Option<Universe>,
    threading: Threading,
}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("threading", &self.threading)
            .finish()
    }
}

impl Mpi {
    /// Initialize MPI (`MPI_Init_thread`). Run under `mpirun`, `srun` or a
    /// similar launcher; a program started alone becomes a job of one
    /// process where the MPI library allows it.
    ///
    /// Refuses with [`ErrorKind::InvalidInput`] when MPI was initialized
    /// already in this process (use [`MpiGroup::new`](crate::MpiGroup::new)
    /// on that communicator), and with [`ErrorKind::Unsupported`] when the
    /// library offers neither `Serialized` nor `Multiple` (MPI is finalized
    /// again before returning).
    pub fn init() -> Result<Mpi> {
        let _g = lock();
        if mpi::environment::is_initialized() {
            return Err(Error::invalid(
                "MPI is already initialized in this process; pass its communicator to MpiGroup::new",
            ));
        }
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| Error::invalid("MPI could not be initialized (already initialized)"))?;
        if !threads_allowed(threading) {
            drop(universe);
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "this MPI library offers thread level {threading:?}; dcp needs Serialized or Multiple"
                ),
            ));
        }
        Ok(Mpi {
            universe: Some(universe),
            threading,
        })
    }

    /// The world communicator: every process of the job. Hand it to
    /// [`MpiGroup::new`](crate::MpiGroup::new) (which duplicates it), or
    /// split it first to checkpoint with a subset of the processes.
    pub fn world(&self) -> SimpleCommunicator {
        SimpleCommunicator::world()
    }

    /// The thread level MPI runs at (`Serialized` or `Multiple`).
    pub fn threading(&self) -> Threading {
        self.threading
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        let _g = lock();
        FINALIZING.store(true, Ordering::SeqCst);
        // `MPI_Finalize`, under the lock so no dcp thread is inside MPI.
        drop(self.universe.take());
    }
}

//! dcp-mpi: the ranks of a dcp save or load as separate processes, on one
//! machine or many, exchanging their plans and outcomes over MPI.
//!
//! [`MpiGroup`] implements dcp-core's [`Collective`](dcp_core::Collective)
//! over an MPI communicator, through the `mpi` crate (rsmpi) and the
//! system's MPI library (Open MPI on Debian: `libopenmpi-dev`,
//! `openmpi-bin`; rsmpi's bindings need `libclang-dev` to build). Each
//! process of an `mpirun` / `srun` job is one rank; the data itself never
//! crosses MPI on a save (every rank writes its own files), and on a
//! resharded load only the slices one rank read for another do.
//!
//! ```no_run
//! use dcp_core::{save, StateDict};
//! use dcp_mpi::{Mpi, MpiGroup};
//! use std::time::Duration;
//!
//! # async fn f(state_dict: StateDict, writer: dcp_core::FileSystemWriter) -> dcp_core::Result<()> {
//! let mpi = Mpi::init()?; // MPI_Init_thread, thread level Multiple or Serialized
//! let group = MpiGroup::new(&mpi.world(), Duration::from_secs(300))?;
//! match save(&state_dict, &writer, &group).await {
//!     Ok(_) => {}
//!     // A missed deadline leaves MPI unusable: end the whole job.
//!     Err(e) if group.is_broken() => {
//!         eprintln!("error: {e}");
//!         group.abort(1)
//!     }
//!     Err(e) => return Err(e), // every rank returns the same error
//! }
//! drop(group);
//! drop(mpi); // MPI_Finalize, on every process
//! # Ok(()) }
//! ```
//!
//! * **Communicators.** [`MpiGroup::new`] duplicates the communicator it is
//!   given (the world, or a sub-communicator the job keeps for
//!   checkpointing), so dcp's messages never mix with the application's.
//!   An application that initializes MPI itself passes its communicator;
//!   it must ask for thread level `Serialized` or `Multiple`.
//! * **Messages** of any length: split into pieces of at most
//!   [`MpiOptions::piece_size`] (default 1 GiB), under MPI's `i32` count
//!   limit, and received in place.
//! * **Deadlines.** Every operation is made of immediate sends and receives
//!   polled against its deadline ([`MpiOptions::timeout`]) on a thread of
//!   its own, never blocking the async runtime. A rank that never arrives
//!   makes every waiting rank fail with
//!   [`ErrorKind::Collective`](dcp_core::ErrorKind::Collective) naming it
//!   (`collective deadline of 5s passed waiting for rank(s) [1]`). MPI
//!   cannot cancel operations, so the group is broken from then on: later
//!   operations fail at once and the job should end with
//!   [`MpiGroup::abort`]. A rank whose storage fails mid-save is not a
//!   missed deadline: the save protocol carries its error to every rank,
//!   each returns it naming that rank, and nothing is committed.
//! * **A process that dies** (killed, crashed, its node lost) ends the job
//!   the MPI way: the launcher kills the other processes. Nothing of an
//!   unfinished save was committed, so the previous checkpoint still
//!   loads.
//! * **Threads.** dcp calls MPI from threads of its own, one at a time
//!   (every call holds one process-wide lock), so thread level
//!   `Serialized` suffices; [`Mpi::init`] asks for `Multiple`.
//!
//! Ranks in different processes cannot lend each other buffers, so a
//! resharded load exchanges the slices one rank read for another as bytes
//! (each saved byte is still read from storage once in total): one
//! `all_to_all_v` per round, whose buffers travel without being framed
//! into one message. Lending through MPI shared memory
//! (`MPI_Win_allocate_shared` on the node communicator) would save the
//! copies into fresh buffers this costs; rsmpi 0.8 does not wrap windows,
//! and the measurement and what it would take are in BENCHMARKS.md ("Would
//! MPI shared memory pay?", example `shm_exchange`).

mod env;
mod group;
mod header;

pub use env::Mpi;
pub use group::{MpiGroup, MpiOptions, DEFAULT_PIECE_SIZE};
/// The `mpi` crate (rsmpi) this crate is built on, for communicators and
/// thread levels.
pub use mpi;

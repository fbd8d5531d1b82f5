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
//! resharded load moves the slices one rank read for another between them
//! (each saved byte is still read from storage once in total).
//!
//! # Shared memory
//!
//! Between the processes of one node the slices go through MPI shared
//! memory: [`MpiGroup::new`] splits dcp's communicator by node
//! (`MPI_Comm_split_type`, `MPI_COMM_TYPE_SHARED`), and a resharded load
//! asks for a window on it (`MPI_Win_allocate_shared`; dcp-core's
//! [`Collective::node_window`](dcp_core::Collective::node_window)):
//!
//! 1. every process reads the shared records it serves once, scattered
//!    straight into its own destination, into its window segment (the
//!    slices the other processes of its node need, each once) and into
//!    message buffers for processes on other nodes;
//! 2. `MPI_Win_sync`, one exchange of statuses (and of the other nodes'
//!    slices, as messages), `MPI_Win_sync`;
//! 3. every process copies its slices from its peers' segments straight
//!    into its destination: one copy, no buffer of its own;
//! 4. a barrier before the segments are written again.
//!
//! The window is kept by the group for the next load (allocated again,
//! larger, only when a load needs more) and freed when the group is
//! dropped: dropping an `MpiGroup` that allocated one is then a collective
//! over the node, as creating it is. Turn it off with
//! [`MpiOptions::shared_memory`] (`false`): every slice then travels as a
//! message, as between nodes. [`MpiGroup::shared_memory_bytes`] counts the
//! bytes a process copied out of its peers' segments.
//!
//! **Failures.** Every step that waits for other processes is one of the
//! group's deadline-bounded operations, except allocating and freeing the
//! window, which are blocking MPI collectives: the group enters them only
//! right after an all-gather every rank passed (so no rank is late), and
//! never after a missed deadline (the window is then left mapped). A rank
//! whose read fails still takes part in the exchange, with its error:
//! every rank returns that error, naming it, before reading any segment. A
//! rank that stalls fails every other rank at the next exchange's deadline;
//! a process that dies ends the job the MPI way. All the `unsafe` of the
//! window (the FFI calls rsmpi 0.8 does not wrap, and the segment
//! pointers) is in one module, `window.rs`.

mod env;
mod group;
mod header;
mod window;

pub use env::Mpi;
pub use group::{MpiGroup, MpiOptions, DEFAULT_PIECE_SIZE};
/// The `mpi` crate (rsmpi) this crate is built on, for communicators and
/// thread levels.
pub use mpi;

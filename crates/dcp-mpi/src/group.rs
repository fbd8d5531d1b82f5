//! [`MpiGroup`]: the ranks of an MPI communicator as a dcp [`Collective`].
//!
//! One operation is one all-to-all exchange in two phases, each made of
//! immediate (non-blocking) point-to-point operations polled against the
//! operation's deadline:
//!
//! 1. every rank sends every other rank a [`Header`] (operation number,
//!    message length, piece size, the lengths of the buffers the message is
//!    made of) and receives theirs;
//! 2. every rank sends each buffer of its messages in pieces of at most the
//!    piece size and receives the others' straight into one buffer per
//!    sender, handed out as slices (no copy on either side).
//!
//! `all_to_all` and `all_to_all_v` (a message of several buffers, as the
//! resharded load's shared-read exchange sends) are native. Gather,
//! scatter, broadcast, all-gather and barrier are the trait's defaults on
//! top of this exchange, so in every operation every rank hears from every
//! rank: a rank that never arrives is named by all the others, not only by
//! a root.
//!
//! The exchange runs on a thread of its own, so the async caller never
//! blocks its runtime. MPI cannot cancel an operation another rank never
//! joins: when the deadline passes, the caller gets its error at once and
//! the thread keeps the buffers MPI may still write into until the
//! operation completes (or MPI is finalized: then the thread parks for
//! good, holding them). The group is broken from then on.

use crate::env::{finalizing, lock, threads_allowed};
use crate::header::{frame, piece_count, unframe, Header, HEADER_LEN, MAX_PIECE, MAX_SEGMENTS};
use crate::window::{Segments, Window};
use async_trait::async_trait;
use bytes::Bytes;
use dcp_core::collective::DEFAULT_TIMEOUT;
use dcp_core::{Collective, Error, ErrorKind, NodeWindow, Result};
use mpi::collective::CommunicatorCollectives;
use mpi::point_to_point::{Destination, Source};
use mpi::request::{LocalScope, Request};
use mpi::topology::{Communicator, SimpleCommunicator};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OwnedMutexGuard};

/// Tag of the headers on dcp's communicator.
const TAG_HEADER: i32 = 0x0dc1;
/// Tag of the message pieces.
const TAG_DATA: i32 = 0x0dc2;

/// Default largest piece of a message: 1 GiB, under MPI's `i32` count
/// limit.
pub const DEFAULT_PIECE_SIZE: usize = 1 << 30;

/// Settings of an [`MpiGroup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MpiOptions {
    /// Deadline of one collective operation (default
    /// [`DEFAULT_TIMEOUT`], 10 minutes).
    pub timeout: Duration,
    /// Largest piece a message is sent in, in bytes (default
    /// [`DEFAULT_PIECE_SIZE`]); `1..=i32::MAX`.
    pub piece_size: usize,
    /// Whether the processes of one node move a resharded load's slices
    /// through MPI shared memory (`MPI_Win_allocate_shared` on the node's
    /// communicator) instead of as messages (default `true`; see the crate
    /// docs, "Shared memory"). `false` keeps every byte on messages and
    /// allocates no window.
    pub shared_memory: bool,
}

impl Default for MpiOptions {
    fn default() -> Self {
        MpiOptions {
            timeout: DEFAULT_TIMEOUT,
            piece_size: DEFAULT_PIECE_SIZE,
            shared_memory: true,
        }
    }
}

impl MpiOptions {
    /// Set the deadline of one collective operation.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Set the largest piece a message is sent in.
    pub fn piece_size(mut self, bytes: usize) -> Self {
        self.piece_size = bytes;
        self
    }

    /// Set [`MpiOptions::shared_memory`].
    pub fn shared_memory(mut self, on: bool) -> Self {
        self.shared_memory = on;
        self
    }
}

/// dcp's own duplicate of the caller's communicator.
struct Comm(Option<SimpleCommunicator>);

// SAFETY: a `SimpleCommunicator` is an MPI handle (a pointer into the MPI
// library, hence not `Send` by default) with no Rust-side state. MPI allows
// any thread to use a handle when the thread level is `Serialized` or
// `Multiple`, provided (at `Serialized`) that no two calls overlap.
// `MpiGroup::with_options` refuses any other level, and every use of the
// handle goes through `Comm::get`, which demands the guard of the one
// process-wide MPI lock, or through `Drop`, which takes it: calls never
// overlap. Exercised by the mpirun tests, whose operations start on several
// tokio worker threads and run on threads of their own.
unsafe impl Send for Comm {}
// SAFETY: see `Send`: shared references only reach the handle through
// `Comm::get`, under the MPI lock.
unsafe impl Sync for Comm {}

impl Comm {
    /// The communicator, for as long as the MPI lock is held.
    fn get<'g>(&'g self, _held: &'g MutexGuard<'static, ()>) -> &'g SimpleCommunicator {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        let _g = lock();
        if let Some(c) = self.0.take() {
            if finalizing() {
                // Freeing a communicator after `MPI_Finalize` is an error;
                // the handle is only forgotten.
                std::mem::forget(c);
            } else {
                drop(c); // MPI_Comm_free
            }
        }
    }
}

struct State {
    /// Operations started so far; the next one is `op + 1`.
    op: u64,
    /// Why the group cannot be used any more, once it cannot.
    broken: Option<String>,
}

/// The processes of this group on this process's node, and the
/// shared-memory window they keep between loads.
struct Node {
    /// dcp's communicator split by node (`MPI_Comm_split_type`,
    /// `MPI_COMM_TYPE_SHARED`), keyed by group rank.
    comm: Comm,
    /// Group ranks of the node, in node-rank order (ascending).
    ranks: Arc<Vec<usize>>,
    /// This process's rank on `comm`.
    me: usize,
    /// The window, once a load needed one; kept for the next load and
    /// freed with the group.
    window: Mutex<Option<Arc<Window>>>,
    /// Bytes this process copied out of its peers' segments.
    copied: Arc<AtomicU64>,
}

struct Shared {
    comm: Comm,
    node: Option<Node>,
    rank: usize,
    size: usize,
    options: MpiOptions,
    state: Mutex<State>,
    /// Held by the operation in flight (by its thread, so an abandoned
    /// future cannot let the next operation overtake it).
    op: Arc<tokio::sync::Mutex<()>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self) -> Result<()> {
        match &self.state().broken {
            Some(why) => Err(Error::new(
                ErrorKind::Collective,
                format!("the MPI group cannot be used after an earlier failure: {why}"),
            )
            .with_rank(self.rank)),
            None => Ok(()),
        }
    }

    fn window(&self) -> MutexGuard<'_, Option<Arc<Window>>> {
        let node = self.node.as_ref().expect("called with a node");
        node.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn break_with(&self, why: &str) {
        let mut st = self.state();
        if st.broken.is_none() {
            st.broken = Some(why.to_string());
        }
    }
}

/// The processes of an MPI communicator as the ranks of a dcp save or load:
/// a [`Collective`] whose messages cross processes and machines.
///
/// Every process creates one from the same communicator (creation is
/// collective: `MPI_Comm_dup`), then passes it to `dcp::save` / `dcp::load`
/// like a `LocalGroup` member. dcp's traffic runs on its own duplicate of
/// the communicator, so it never mixes with the application's.
///
/// **Deadlines.** Every operation fails after [`MpiOptions::timeout`] on
/// every rank that is waiting, with [`ErrorKind::Collective`] naming the
/// ranks that did not arrive (`collective deadline of 10s passed waiting
/// for rank(s) [1]`). MPI cannot cancel an operation, so the group is
/// unusable afterwards: later operations fail at once, and the job should
/// end with [`MpiGroup::abort`] (`MPI_Finalize` would wait for the missing
/// rank). A rank that fails *inside* a save or load reports it through the
/// protocol's own exchanges, and every rank returns its error; the group
/// stays usable then.
///
/// **Messages** of any length travel in pieces of at most
/// [`MpiOptions::piece_size`] bytes, under MPI's `i32` count limit.
pub struct MpiGroup {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MpiGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiGroup")
            .field("rank", &self.shared.rank)
            .field("size", &self.shared.size)
            .field("options", &self.shared.options)
            .field("broken", &self.is_broken())
            .finish()
    }
}

impl MpiGroup {
    /// A group over a duplicate of `comm` with deadline `timeout` and the
    /// default piece size. See [`MpiGroup::with_options`].
    pub fn new(comm: &SimpleCommunicator, timeout: Duration) -> Result<MpiGroup> {
        Self::with_options(comm, MpiOptions::default().timeout(timeout))
    }

    /// A group over a duplicate of `comm` (the world communicator, or a
    /// sub-communicator kept for checkpointing). Every process of `comm`
    /// must call it: duplicating a communicator is collective, and waits
    /// for all of them.
    ///
    /// Refuses with [`ErrorKind::InvalidInput`] a piece size outside
    /// `1..=i32::MAX` and an MPI that is not initialized or already
    /// finalized; with [`ErrorKind::Unsupported`] an MPI initialized at a
    /// thread level below `Serialized` (dcp calls MPI from threads of its
    /// own).
    pub fn with_options(comm: &SimpleCommunicator, options: MpiOptions) -> Result<MpiGroup> {
        if options.piece_size == 0 || options.piece_size > MAX_PIECE {
            return Err(Error::invalid(format!(
                "MPI piece size must be 1 to {MAX_PIECE} bytes, not {}",
                options.piece_size
            )));
        }
        let g = lock();
        if !mpi::environment::is_initialized() || finalizing() {
            return Err(Error::invalid(
                "MPI is not initialized (or already finalized): call dcp_mpi::Mpi::init first",
            ));
        }
        let threading = mpi::environment::threading_support();
        if !threads_allowed(threading) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "MPI was initialized at thread level {threading:?}; dcp calls MPI from threads of its own and needs Serialized or Multiple"
                ),
            ));
        }
        let dup = comm.duplicate();
        let (rank, size) = (dup.rank(), dup.size());
        let node = options.shared_memory.then(|| {
            let node = dup.split_shared(rank);
            let mut ranks = vec![0u64; node.size().max(0) as usize];
            node.all_gather_into(&(rank as u64), &mut ranks[..]);
            let me = node.rank().max(0) as usize;
            Node {
                comm: Comm(Some(node)),
                ranks: Arc::new(ranks.into_iter().map(|r| r as usize).collect()),
                me,
                window: Mutex::new(None),
                copied: Arc::new(AtomicU64::new(0)),
            }
        });
        drop(g);
        let comm = Comm(Some(dup));
        let rank =
            usize::try_from(rank).map_err(|_| Error::invalid("MPI reported a negative rank"))?;
        let size =
            usize::try_from(size).map_err(|_| Error::invalid("MPI reported a negative size"))?;
        Ok(MpiGroup {
            shared: Arc::new(Shared {
                comm,
                node,
                rank,
                size,
                options,
                state: Mutex::new(State {
                    op: 0,
                    broken: None,
                }),
                op: Arc::new(tokio::sync::Mutex::new(())),
            }),
        })
    }

    /// The settings this group was created with.
    pub fn options(&self) -> &MpiOptions {
        &self.shared.options
    }

    /// Bytes this process has copied out of the shared-memory segments of
    /// the other processes of its node (resharded loads through the
    /// window; see the crate docs, "Shared memory"), over the group's life.
    /// 0 with [`MpiOptions::shared_memory`] off.
    pub fn shared_memory_bytes(&self) -> u64 {
        self.shared
            .node
            .as_ref()
            .map_or(0, |n| n.copied.load(Ordering::Relaxed))
    }

    /// Whether an operation missed its deadline (or its thread died), so
    /// every later operation fails at once.
    pub fn is_broken(&self) -> bool {
        self.shared.state().broken.is_some()
    }

    /// End every process of the job (`MPI_Abort` on dcp's communicator)
    /// with exit status `code`. The way out after a missed deadline:
    /// finalizing would wait for the rank that never came.
    pub fn abort(&self, code: i32) -> ! {
        let g = lock();
        self.shared.comm.get(&g).abort(code)
    }
}

#[async_trait]
impl Collective for MpiGroup {
    fn rank(&self) -> usize {
        self.shared.rank
    }

    fn world_size(&self) -> usize {
        self.shared.size
    }

    async fn all_to_all(&self, send: Vec<Bytes>) -> Result<Vec<Bytes>> {
        let shared = &self.shared;
        if send.len() != shared.size {
            return Err(Error::invalid(format!(
                "all_to_all needs {} messages, got {}",
                shared.size,
                send.len()
            )));
        }
        let recv = self
            .exchange(send.into_iter().map(|m| vec![m]).collect())
            .await?;
        recv.into_iter()
            .enumerate()
            .map(|(from, mut bufs)| match bufs.len() {
                1 => Ok(bufs.pop().expect("one")),
                k => Err(Error::new(
                    ErrorKind::Collective,
                    format!(
                        "rank {from} sent {k} buffers where this rank expected one message: ranks called different collective operations"
                    ),
                )
                .with_rank(shared.rank)),
            })
            .collect()
    }

    /// Native: each buffer travels as it is (no framing copy), and arrives
    /// as a slice of one receive buffer per sender.
    async fn all_to_all_v(&self, send: Vec<Vec<Bytes>>) -> Result<Vec<Vec<Bytes>>> {
        if send.len() != self.shared.size {
            return Err(Error::invalid(format!(
                "all_to_all_v needs {} message lists, got {}",
                self.shared.size,
                send.len()
            )));
        }
        self.exchange(send).await
    }

    fn node_ranks(&self) -> Option<Vec<usize>> {
        self.shared.node.as_ref().map(|n| n.ranks.to_vec())
    }

    /// Agree (one deadline-bounded all-gather) on whether the processes of
    /// each node need a larger window than the one they keep; if so, free
    /// the old one (or leave it mapped, when some process still lends it
    /// out) and allocate the new one, both blocking MPI collectives over the
    /// node that every process enters right after the all-gather.
    async fn node_window(&self, len: usize) -> Result<Arc<dyn NodeWindow>> {
        let shared = &self.shared;
        let Some(node) = &shared.node else {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "this MPI group was created with shared memory off",
            ));
        };
        let (cap, idle) = match &*shared.window() {
            Some(w) => (w.own_len(), Arc::strong_count(w) == 1),
            None => (0, true),
        };
        let mut msg = Vec::with_capacity(17);
        msg.extend_from_slice(&(len as u64).to_le_bytes());
        msg.extend_from_slice(&(cap as u64).to_le_bytes());
        msg.push(u8::from(idle));
        let all = self.all_gather(Bytes::from(msg)).await?;
        let mut grow = false;
        let mut all_idle = true;
        for &r in node.ranks.iter() {
            let m = all.get(r).filter(|m| m.len() == 17).ok_or_else(|| {
                Error::new(
                    ErrorKind::Collective,
                    format!("rank {r} sent a malformed shared-memory request"),
                )
                .with_rank(shared.rank)
            })?;
            let word = |at: usize| u64::from_le_bytes(m[at..at + 8].try_into().expect("8 bytes"));
            grow |= word(0) > word(8);
            all_idle &= m[16] == 1;
        }
        if grow {
            let op = shared.op.clone().lock_owned().await;
            shared.check()?;
            let (tx, rx) = oneshot::channel();
            let sh = shared.clone();
            let new_len = len.max(cap);
            let spawned = std::thread::Builder::new()
                .name(format!("dcp-mpi-win-{}", shared.rank))
                .spawn(move || {
                    let g = lock();
                    let r = if finalizing() {
                        Err(Error::invalid("MPI is finalized"))
                    } else {
                        let node = sh.node.as_ref().expect("checked");
                        let old = sh.window().take();
                        if let Some(old) = old {
                            match Arc::try_unwrap(old) {
                                Ok(w) if all_idle => w.free(&g),
                                // Some process still lends its segment out:
                                // every process leaves the old window mapped.
                                Ok(w) => std::mem::forget(w),
                                Err(a) => std::mem::forget(a),
                            }
                        }
                        let comm = node.comm.get(&g);
                        Window::allocate(comm, node.me, node.ranks.len(), new_len, &g).map(|w| {
                            *sh.window() = Some(Arc::new(w));
                        })
                    };
                    drop(g);
                    drop(op);
                    // Let go of the group before answering (see `Exchange`'s drop).
                    drop(sh);
                    let _ = tx.send(r);
                });
            if let Err(e) = spawned {
                let why = format!("cannot start a thread for the shared-memory window: {e}");
                shared.break_with(&why);
                return Err(Error::new(ErrorKind::Collective, why).with_rank(shared.rank));
            }
            match rx.await {
                Ok(r) => r.map_err(|e| e.with_rank(shared.rank))?,
                Err(_) => {
                    let why = "the shared-memory window's thread ended without an answer";
                    shared.break_with(why);
                    return Err(Error::new(ErrorKind::Collective, why).with_rank(shared.rank));
                }
            }
        }
        Ok(Arc::new(Segments {
            window: shared.window().clone(),
            ranks: node.ranks.clone(),
            copied: node.copied.clone(),
        }))
    }
}

impl Drop for Shared {
    /// Free the window kept between loads: a collective over the node, as
    /// every process drops its group. Left mapped instead after a missed
    /// deadline (a peer may never come) or once MPI is finalizing.
    fn drop(&mut self) {
        let broken = self.state().broken.is_some();
        let Some(node) = &mut self.node else { return };
        let Some(w) = node
            .window
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let g = lock();
        match Arc::try_unwrap(w) {
            Ok(w) if !broken && !finalizing() => w.free(&g),
            Ok(w) => std::mem::forget(w),
            Err(a) => std::mem::forget(a),
        }
    }
}

impl MpiGroup {
    /// One exchange of `send[peer]` (each a list of buffers) with every
    /// peer, on a thread of its own, against the deadline.
    async fn exchange(&self, send: Vec<Vec<Bytes>>) -> Result<Vec<Vec<Bytes>>> {
        let shared = &self.shared;
        shared.check()?;
        let guard = shared.op.clone().lock_owned().await;
        shared.check()?;
        {
            let _g = lock();
            if finalizing() {
                return Err(Error::invalid("MPI is finalized").with_rank(shared.rank));
            }
        }
        let op = {
            let mut st = shared.state();
            st.op += 1;
            st.op
        };
        let (tx, rx) = oneshot::channel();
        let run = Exchange {
            shared: Some(shared.clone()),
            op,
            deadline: Instant::now() + shared.options.timeout,
            guard: Some(guard),
            reply: Some(tx),
            outcome: None,
        };
        if let Err(e) = std::thread::Builder::new()
            .name(format!("dcp-mpi-{}", shared.rank))
            .spawn(move || run.run(send))
        {
            let why = format!("cannot start a thread for MPI operation #{op}: {e}");
            shared.break_with(&why);
            return Err(Error::new(ErrorKind::Collective, why).with_rank(shared.rank));
        }
        match rx.await {
            Ok(r) => r.map_err(|e| e.with_rank(shared.rank)),
            Err(_) => {
                let why = format!("the thread of MPI operation #{op} ended without an answer");
                shared.break_with(&why);
                Err(Error::new(ErrorKind::Collective, why).with_rank(shared.rank))
            }
        }
    }
}

/// Which way a pending request moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Send,
    Recv,
}

/// A request in flight and the peer it is with.
struct Pending<'a, 'b> {
    peer: usize,
    dir: Dir,
    req: Request<'a, [u8], &'b LocalScope<'a>>,
}

/// One operation, run on its own thread.
struct Exchange {
    /// The group, let go of before the caller hears back (see the `Drop`).
    shared: Option<Arc<Shared>>,
    op: u64,
    deadline: Instant,
    /// The group's operation lock, released once this operation is over
    /// (or has failed).
    guard: Option<OwnedMutexGuard<()>>,
    reply: Option<oneshot::Sender<Result<Vec<Vec<Bytes>>>>>,
    /// The outcome, sent to the caller when the operation is dropped.
    outcome: Option<Result<Vec<Vec<Bytes>>>>,
}

impl Drop for Exchange {
    /// Answer the caller only after this thread has let go of the group: a
    /// caller that drops its group right after the answer then holds the
    /// last reference, so the group's end (freeing the shared-memory window,
    /// a collective over the node) runs on the caller's thread, in program
    /// order, and never on this thread after the caller has gone on to
    /// finalize MPI (which would leave the node's other processes waiting).
    fn drop(&mut self) {
        self.shared.take();
        self.guard.take();
        if let (Some(tx), Some(r)) = (self.reply.take(), self.outcome.take()) {
            let _ = tx.send(r);
        }
    }
}

impl Exchange {
    fn sh(&self) -> &Arc<Shared> {
        self.shared
            .as_ref()
            .expect("held until the operation is dropped")
    }

    /// Settle the operation: a success is sent when this thread lets go
    /// of the group (see the `Drop`); a failure at once, since this thread
    /// may stay behind with requests a late peer never completes (the
    /// group is then broken, and its end frees nothing collectively).
    fn answer(&mut self, r: Result<Vec<Vec<Bytes>>>) {
        self.guard.take();
        match r {
            Ok(v) => self.outcome = Some(Ok(v)),
            Err(e) => {
                if let Some(tx) = self.reply.take() {
                    let _ = tx.send(Err(e));
                }
            }
        }
    }

    /// Fail the operation and break the group (the peers' view of it can no
    /// longer be trusted), then let the caller go.
    fn fail(&mut self, e: Error) {
        tracing::warn!(
            rank = self.sh().rank,
            op = self.op,
            "MPI operation failed: {e}"
        );
        self.sh().break_with(e.message());
        self.answer(Err(e));
    }

    /// The deadline passed with `pending` requests outstanding in `phase`.
    fn missed(&mut self, pending: &[(usize, Dir)], phase: Phase) {
        let peers = |dir: Dir| {
            let mut v: Vec<usize> = pending.iter().filter(|p| p.1 == dir).map(|p| p.0).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        // The ranks whose messages did not come; failing that, those that
        // did not take ours.
        let mut missing = peers(Dir::Recv);
        if missing.is_empty() {
            missing = peers(Dir::Send);
        }
        let what = match phase {
            Phase::Headers => "they did not arrive",
            Phase::Data => "their messages did not finish arriving",
        };
        let msg = format!(
            "collective deadline of {:?} passed waiting for rank(s) {missing:?} ({what}; MPI operation #{}); the MPI group is unusable from now on: end the job (MpiGroup::abort)",
            self.sh().options.timeout, self.op
        );
        self.fail(Error::new(ErrorKind::Collective, msg));
    }

    fn run(mut self, send: Vec<Vec<Bytes>>) {
        let shared = self.sh().clone();
        let (me, n) = (shared.rank, shared.size);
        let piece = shared.options.piece_size;

        // What goes on the wire to each peer: its buffers, or one frame of
        // them when there are more than a header lists.
        let mut framed = vec![false; n];
        let wire: Vec<Vec<Bytes>> = send
            .iter()
            .enumerate()
            .map(|(peer, bufs)| {
                if peer == me {
                    Vec::new()
                } else if bufs.len() > MAX_SEGMENTS {
                    framed[peer] = true;
                    vec![frame(bufs)]
                } else {
                    bufs.clone()
                }
            })
            .collect();

        // Phase 1: headers.
        let out_headers: Vec<Vec<u8>> = wire
            .iter()
            .zip(&framed)
            .map(|(bufs, &framed)| {
                let segments: Vec<u64> = bufs.iter().map(|b| b.len() as u64).collect();
                Header {
                    op: self.op,
                    len: segments.iter().sum(),
                    piece: piece as u64,
                    framed,
                    segments,
                }
                .encode()
            })
            .collect();
        let mut in_headers = vec![[0u8; HEADER_LEN]; n];
        let on_time = mpi::request::scope(|scope| {
            let mut reqs = Vec::with_capacity(2 * n);
            {
                let g = lock();
                let comm = shared.comm.get(&g);
                for (peer, buf) in in_headers.iter_mut().enumerate() {
                    if peer != me {
                        let req = comm
                            .process_at_rank(peer as i32)
                            .immediate_receive_into_with_tag(scope, &mut buf[..], TAG_HEADER);
                        reqs.push(Pending {
                            peer,
                            dir: Dir::Recv,
                            req,
                        });
                    }
                }
                for (peer, buf) in out_headers.iter().enumerate() {
                    if peer != me {
                        let req = comm.process_at_rank(peer as i32).immediate_send_with_tag(
                            scope,
                            &buf[..],
                            TAG_HEADER,
                        );
                        reqs.push(Pending {
                            peer,
                            dir: Dir::Send,
                            req,
                        });
                    }
                }
            }
            settle(reqs, self.deadline, |p| self.missed(p, Phase::Headers))
        });
        if !on_time {
            return;
        }
        let mut headers: Vec<Option<Header>> = Vec::with_capacity(n);
        for (peer, b) in in_headers.iter().enumerate() {
            if peer == me {
                headers.push(None);
                continue;
            }
            match Header::decode(b, peer, self.op) {
                Ok(h) => headers.push(Some(h)),
                Err(e) => return self.fail(e),
            }
        }

        // Phase 2: every buffer in pieces, each received in place.
        let mut recv: Vec<Vec<u8>> = Vec::with_capacity(n);
        for (peer, h) in headers.iter().enumerate() {
            let len = h.as_ref().map_or(0, Header::len);
            match zeroed(len) {
                Ok(buf) => recv.push(buf),
                Err(e) => {
                    return self.fail(Error::new(
                        ErrorKind::Collective,
                        format!(
                            "cannot allocate {len} bytes for the message from rank {peer}: {e}"
                        ),
                    ))
                }
            }
        }
        let pieces: usize = headers
            .iter()
            .flatten()
            .flat_map(|h| {
                h.segments
                    .iter()
                    .map(|&s| piece_count(s as usize, h.piece()))
            })
            .sum::<usize>()
            + wire
                .iter()
                .flatten()
                .map(|m| piece_count(m.len(), piece))
                .sum::<usize>();
        let on_time = mpi::request::scope(|scope| {
            let mut reqs = Vec::with_capacity(pieces);
            {
                let g = lock();
                let comm = shared.comm.get(&g);
                for (peer, buf) in recv.iter_mut().enumerate() {
                    let Some(h) = &headers[peer] else { continue };
                    let from = comm.process_at_rank(peer as i32);
                    let mut rest: &mut [u8] = buf;
                    for &seg in &h.segments {
                        let (this, next) = std::mem::take(&mut rest).split_at_mut(seg as usize);
                        rest = next;
                        for chunk in this.chunks_mut(h.piece()) {
                            let req = from.immediate_receive_into_with_tag(scope, chunk, TAG_DATA);
                            reqs.push(Pending {
                                peer,
                                dir: Dir::Recv,
                                req,
                            });
                        }
                    }
                }
                for (peer, bufs) in wire.iter().enumerate() {
                    let to = comm.process_at_rank(peer as i32);
                    for chunk in bufs.iter().flat_map(|b| b.chunks(piece)) {
                        let req = to.immediate_send_with_tag(scope, chunk, TAG_DATA);
                        reqs.push(Pending {
                            peer,
                            dir: Dir::Send,
                            req,
                        });
                    }
                }
            }
            settle(reqs, self.deadline, |p| self.missed(p, Phase::Data))
        });
        if !on_time {
            return;
        }
        let mut out = Vec::with_capacity(n);
        let mut send = send;
        for (peer, buf) in recv.into_iter().enumerate() {
            let Some(h) = &headers[peer] else {
                out.push(std::mem::take(&mut send[me]));
                continue;
            };
            let whole = Bytes::from(buf);
            let mut at = 0usize;
            let mut bufs = Vec::with_capacity(h.segments.len());
            for &seg in &h.segments {
                bufs.push(whole.slice(at..at + seg as usize));
                at += seg as usize;
            }
            if h.framed {
                match unframe(&bufs[0], peer) {
                    Ok(v) => bufs = v,
                    Err(e) => return self.fail(e),
                }
            }
            out.push(bufs);
        }
        self.answer(Ok(out));
    }
}

/// A zero-filled buffer of `len` bytes, or why it cannot be allocated.
/// Large ones come from the allocator's zeroed pages (`calloc`: pages fresh
/// from the kernel are zero already), so a received message is not written
/// twice, once with zeros and once by MPI.
fn zeroed(len: usize) -> std::result::Result<Vec<u8>, String> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(len).map_err(|e| e.to_string())?;
    // SAFETY: `layout` has a non-zero size (`len > 0` above), as
    // `alloc_zeroed` requires.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return Err("out of memory".into());
    }
    // SAFETY: `ptr` is non-null and was allocated by the global allocator
    // with `layout`: size `len`, alignment 1, which is exactly the layout a
    // `Vec<u8>` of capacity `len` frees with; all `len` bytes are
    // initialized (zeroed), so length `len` is valid. Tested by
    // `tests::zeroed_buffers`.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

#[derive(Clone, Copy)]
enum Phase {
    Headers,
    Data,
}

/// Poll `reqs` until every one completes. When `deadline` passes first,
/// call `missed` once with what is still pending, then keep polling, slowly,
/// until they complete (MPI may still write into their buffers, which must
/// live until then); once MPI is finalizing, stop calling it and park this
/// thread for good, holding the buffers. Returns whether everything
/// completed before the deadline.
fn settle(
    mut reqs: Vec<Pending<'_, '_>>,
    deadline: Instant,
    mut missed: impl FnMut(&[(usize, Dir)]),
) -> bool {
    let mut late = false;
    let mut idle_polls = 0u32;
    loop {
        {
            let g = lock();
            if late && finalizing() {
                drop(g);
                // The requests are never dropped (that would abort): their
                // buffers stay valid for as long as the process lives.
                let _keep = reqs;
                loop {
                    std::thread::park();
                }
            }
            let before = reqs.len();
            reqs = reqs
                .into_iter()
                .filter_map(|p| match p.req.test() {
                    Ok(_) => None,
                    Err(req) => Some(Pending { req, ..p }),
                })
                .collect();
            if reqs.is_empty() {
                return !late;
            }
            if reqs.len() < before {
                idle_polls = 0;
            }
        }
        if !late && Instant::now() >= deadline {
            late = true;
            let pending: Vec<(usize, Dir)> = reqs.iter().map(|p| (p.peer, p.dir)).collect();
            missed(&pending);
        }
        idle_polls = idle_polls.saturating_add(1);
        pause(idle_polls, late);
    }
}

/// Wait before the next poll: yield at first (answers usually come within
/// microseconds), then sleep longer and longer, up to half a millisecond;
/// 10 ms once the operation has failed.
fn pause(idle_polls: u32, late: bool) {
    if late {
        std::thread::sleep(Duration::from_millis(10));
    } else if idle_polls < 50 {
        std::thread::yield_now();
    } else {
        let us = (10 * u64::from(idle_polls - 49)).min(500);
        std::thread::sleep(Duration::from_micros(us));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_buffers() {
        assert!(zeroed(0).unwrap().is_empty());
        for len in [1usize, 7, 4096, 3 << 20] {
            let mut v = zeroed(len).unwrap();
            assert_eq!(v.len(), len);
            assert!(v.capacity() >= len);
            assert!(v.iter().all(|&b| b == 0));
            // Writable, growable and freed like any Vec.
            v[len - 1] = 9;
            v.push(1);
            assert_eq!(v[len - 1..], [9, 1]);
        }
        let e = zeroed(usize::MAX / 2).unwrap_err();
        assert!(!e.is_empty());
    }
}

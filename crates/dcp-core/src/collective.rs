//! Collectives: how ranks exchange plans, results and outcomes.
//!
//! The one required operation is [`Collective::all_to_all`]; gather, scatter,
//! broadcast, all-gather and barrier have default implementations on top of
//! it, which an engine with native versions (MPI) overrides. Every operation
//! has a deadline: a rank that stalls, panics or leaves makes every other
//! rank fail with an error naming it, never hang.

use crate::error::{Error, ErrorKind, Result};
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Default deadline of one collective operation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// A value handed between ranks of one process, shared rather than copied;
/// see [`Collective::all_gather_local`].
pub type LocalValue = Arc<dyn std::any::Any + Send + Sync>;

/// A group of ranks exchanging byte messages.
///
/// Contract: an operation completes on every rank or fails on every rank
/// (an implementation agrees on failure, as [`LocalGroup`] does by breaking
/// the whole group). The save protocol relies on it: a rank whose gather of
/// write results failed knows the coordinator cannot have committed, and
/// removes its data files.
#[async_trait]
pub trait Collective: Send + Sync {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// Every rank sends `send[j]` to rank `j` and receives `recv[i]` from
    /// rank `i`. `send.len()` must equal `world_size()`.
    async fn all_to_all(&self, send: Vec<Bytes>) -> Result<Vec<Bytes>>;

    /// True when every rank lives in this process's address space, so a
    /// message can be a shared buffer rather than a copy. Loads then have
    /// ranks lend each other their destination buffers through
    /// [`Collective::all_gather_local`], which such a collective must
    /// implement (a load through one that returns true but refuses it fails
    /// with `Unsupported`).
    fn shares_memory(&self) -> bool {
        false
    }

    /// For ranks in one address space: every rank receives every rank's
    /// `value`, in rank order, shared (an `Arc` clone), never serialized.
    /// Loads use it to lend each other their destination buffers, so a
    /// saved chunk several ranks need is read once, straight into all of
    /// them. The default refuses with [`ErrorKind::Unsupported`] (ranks in
    /// different processes cannot share values); loads then exchange bytes
    /// instead. An implementation must refuse on every rank or on none.
    async fn all_gather_local(&self, value: LocalValue) -> Result<Vec<LocalValue>> {
        let _ = value;
        Err(Error::unsupported(
            "this collective cannot share in-process values between ranks",
        ))
    }

    /// The ranks of this group that share memory with this one through
    /// [`Collective::node_window`]: those on this rank's node, itself
    /// included, ascending. `None` (the default) when the collective has no
    /// such memory. A resharded load whose ranks all answer `Some` (and
    /// none shares an address space, [`Collective::shares_memory`]) moves
    /// the slices one rank read for another rank of its node through the
    /// window instead of as messages; ranks on other nodes still get
    /// messages.
    fn node_ranks(&self) -> Option<Vec<usize>> {
        None
    }

    /// Collective over the whole group: a window of memory shared with the
    /// ranks of this rank's node ([`Collective::node_ranks`]), in which
    /// this rank's segment holds at least `len` bytes. Every rank calls it
    /// when every rank's `node_ranks` is `Some`, each with its own length
    /// (0 is fine). The window may be one kept from an earlier call. The
    /// default refuses with [`ErrorKind::Unsupported`]; an implementation
    /// must fail on every rank or on none, and within its deadline.
    async fn node_window(&self, len: usize) -> Result<Arc<dyn NodeWindow>> {
        let _ = len;
        Err(Error::unsupported(
            "this collective has no memory shared between processes",
        ))
    }

    /// Like [`Collective::all_to_all`], with any number of buffers per
    /// destination. The default frames them into one message each
    /// (length-prefixed, one copy); an in-process group passes them as they
    /// are.
    async fn all_to_all_v(&self, send: Vec<Vec<Bytes>>) -> Result<Vec<Vec<Bytes>>> {
        let framed = send
            .into_iter()
            .map(|bufs| {
                let total: usize = bufs.iter().map(|b| b.len() + 8).sum::<usize>() + 8;
                let mut out = Vec::with_capacity(total);
                out.extend_from_slice(&(bufs.len() as u64).to_le_bytes());
                for b in &bufs {
                    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
                    out.extend_from_slice(b);
                }
                Bytes::from(out)
            })
            .collect();
        let recv = self.all_to_all(framed).await?;
        recv.into_iter().map(unframe).collect()
    }

    /// Rank `root` receives every rank's `msg` (in rank order); others get `None`.
    async fn gather(&self, msg: Bytes, root: usize) -> Result<Option<Vec<Bytes>>> {
        let n = self.world_size();
        let mut send = vec![Bytes::new(); n];
        send[root] = msg;
        let recv = self.all_to_all(send).await?;
        Ok((self.rank() == root).then_some(recv))
    }

    /// Rank `root` sends `msgs[j]` to rank `j`; every rank returns its own.
    async fn scatter(&self, msgs: Option<Vec<Bytes>>, root: usize) -> Result<Bytes> {
        let n = self.world_size();
        let send = if self.rank() == root {
            let msgs = msgs.ok_or_else(|| Error::invalid("scatter root must provide messages"))?;
            if msgs.len() != n {
                return Err(Error::invalid("scatter needs one message per rank"));
            }
            msgs
        } else {
            vec![Bytes::new(); n]
        };
        let mut recv = self.all_to_all(send).await?;
        Ok(std::mem::take(&mut recv[root]))
    }

    /// Rank `root`'s `msg` reaches every rank.
    async fn broadcast(&self, msg: Option<Bytes>, root: usize) -> Result<Bytes> {
        let n = self.world_size();
        let send = if self.rank() == root {
            let m = msg.ok_or_else(|| Error::invalid("broadcast root must provide a message"))?;
            vec![m; n]
        } else {
            vec![Bytes::new(); n]
        };
        let mut recv = self.all_to_all(send).await?;
        Ok(std::mem::take(&mut recv[root]))
    }

    /// Every rank receives every rank's `msg`, in rank order.
    async fn all_gather(&self, msg: Bytes) -> Result<Vec<Bytes>> {
        let n = self.world_size();
        self.all_to_all(vec![msg; n]).await
    }

    /// Wait until every rank arrives.
    async fn barrier(&self) -> Result<()> {
        let n = self.world_size();
        self.all_to_all(vec![Bytes::new(); n]).await.map(|_| ())
    }
}

/// Memory shared by the ranks of one node, from
/// [`Collective::node_window`]: every rank has a segment of its own, which
/// it fills and the other ranks of its node read.
///
/// Protocol (what a load follows): a rank writes only into its own
/// segment, through the buffers of [`NodeWindow::carve`]; then
/// [`NodeWindow::sync`], a collective operation every rank of the node
/// takes part in, [`NodeWindow::sync`] again; then the others read with
/// [`NodeWindow::copy_out`]; and another collective operation before the
/// segment is written again. Breaking it cannot corrupt this process's
/// memory (peers are only ever read by copying), but yields wrong bytes.
pub trait NodeWindow: Send + Sync {
    /// The group ranks whose segments this rank can read: its node, itself
    /// included, ascending.
    fn node_ranks(&self) -> &[usize];

    /// Length in bytes of `rank`'s segment (0 for a rank off this node).
    fn segment_len(&self, rank: usize) -> usize;

    /// This rank's segment as disjoint buffers of `lens` bytes each,
    /// consecutive from the segment's start, for a load to fill in place.
    /// Refuses with [`ErrorKind::InvalidInput`] more bytes than the segment
    /// holds, and with [`ErrorKind::Collective`] while buffers of an
    /// earlier call are still alive.
    fn carve(&self, lens: &[usize]) -> Result<Vec<Box<dyn crate::model::TensorBuffer>>>;

    /// Copy runs out of `rank`'s segment into `dst`: for each
    /// `(from, to, len)`, the `len` bytes at `from` in the segment to `to`
    /// in `dst`. Refuses with [`ErrorKind::InvalidInput`], copying nothing,
    /// a rank off this node and a run outside the segment or `dst`.
    fn copy_out(&self, rank: usize, runs: &[(usize, usize, usize)], dst: &mut [u8]) -> Result<()>;

    /// Order memory: this process's writes into its segment become visible
    /// to the node, and the others' to this process (`MPI_Win_sync`). Call
    /// it before and after the collective operation that separates writing
    /// from reading.
    fn sync(&self);
}

/// Split a message framed as the default [`Collective::all_to_all_v`]
/// frames each rank's buffers (their count, then each one's length and
/// bytes, lengths as little-endian `u64`), for collectives that carry the
/// same framing over their own transport. Refuses, with
/// [`ErrorKind::Collective`], a message whose counts or lengths run past its
/// end or that has bytes left over.
pub fn unframe(msg: Bytes) -> Result<Vec<Bytes>> {
    let bad = || {
        Error::new(
            ErrorKind::Collective,
            "malformed multi-buffer message between ranks",
        )
    };
    let word = |at: usize| -> Result<usize> {
        let b = msg.get(at..at + 8).ok_or_else(bad)?;
        usize::try_from(u64::from_le_bytes(b.try_into().expect("8 bytes"))).map_err(|_| bad())
    };
    let count = word(0)?;
    let mut out = Vec::with_capacity(count.min(msg.len() / 8));
    let mut at = 8;
    for _ in 0..count {
        let len = word(at)?;
        at += 8;
        let end = at
            .checked_add(len)
            .filter(|&e| e <= msg.len())
            .ok_or_else(bad)?;
        out.push(msg.slice(at..end));
        at = end;
    }
    if at != msg.len() {
        return Err(bad());
    }
    Ok(out)
}

/// The trivial group of one rank.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

#[async_trait]
impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    async fn all_to_all(&self, send: Vec<Bytes>) -> Result<Vec<Bytes>> {
        if send.len() != 1 {
            return Err(Error::invalid("all_to_all needs one message per rank"));
        }
        Ok(send)
    }
}

/// What one rank sends another in one round of a [`LocalGroup`].
#[derive(Clone)]
enum Parcel {
    Bufs(Vec<Bytes>),
    Value(LocalValue),
}

struct GroupState {
    /// Messages deposited in the current round, per sender, per destination.
    deposits: Vec<Option<Vec<Parcel>>>,
    arrived: usize,
    /// Completed round results, per receiver, with the round number.
    inbox: Vec<Option<(u64, Vec<Parcel>)>>,
    /// Round number each rank is in.
    round: Vec<u64>,
    /// Set once the group is broken; every later operation fails with it.
    failure: Option<String>,
}

struct GroupShared {
    size: usize,
    timeout: Duration,
    state: Mutex<GroupState>,
    notify: Notify,
}

/// N ranks as tasks or threads in one process, exchanging `Bytes` without
/// copying. For tests, simulation and single-machine multi-rank jobs.
///
/// Dropping a member (its task ended or panicked) breaks the group for any
/// operation still waiting or started later: it fails naming that rank
/// instead of waiting for the deadline.
pub struct LocalGroup {
    rank: usize,
    shared: Arc<GroupShared>,
}

impl std::fmt::Debug for LocalGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalGroup")
            .field("rank", &self.rank)
            .field("size", &self.shared.size)
            .finish()
    }
}

impl LocalGroup {
    /// Create `size` members with the default deadline.
    pub fn new(size: usize) -> Vec<LocalGroup> {
        Self::with_timeout(size, DEFAULT_TIMEOUT)
    }

    /// Create `size` members whose operations fail after `timeout`.
    pub fn with_timeout(size: usize, timeout: Duration) -> Vec<LocalGroup> {
        assert!(size > 0, "a group needs at least one rank");
        let shared = Arc::new(GroupShared {
            size,
            timeout,
            state: Mutex::new(GroupState {
                deposits: vec![None; size],
                arrived: 0,
                inbox: vec![None; size],
                round: vec![0; size],
                failure: None,
            }),
            notify: Notify::new(),
        });
        (0..size)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        // A poisoned lock means a rank panicked while holding it; the state is
        // still consistent (we never panic mid-update), so keep going.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        let mut st = self.lock();
        if st.failure.is_none() {
            st.failure = Some(format!(
                "rank {} left the group (its task ended or panicked)",
                self.rank
            ));
        }
        drop(st);
        self.shared.notify.notify_waiters();
    }
}

#[async_trait]
impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.size
    }

    fn shares_memory(&self) -> bool {
        true
    }

    async fn all_to_all(&self, send: Vec<Bytes>) -> Result<Vec<Bytes>> {
        let recv = self
            .all_to_all_v(send.into_iter().map(|b| vec![b]).collect())
            .await?;
        Ok(recv
            .into_iter()
            .map(|mut v| v.pop().unwrap_or_default())
            .collect())
    }

    async fn all_to_all_v(&self, send: Vec<Vec<Bytes>>) -> Result<Vec<Vec<Bytes>>> {
        let recv = self
            .exchange(send.into_iter().map(Parcel::Bufs).collect())
            .await?;
        recv.into_iter()
            .map(|p| match p {
                Parcel::Bufs(b) => Ok(b),
                Parcel::Value(_) => Err(self.mismatch()),
            })
            .collect()
    }

    async fn all_gather_local(&self, value: LocalValue) -> Result<Vec<LocalValue>> {
        let n = self.shared.size;
        let recv = self.exchange(vec![Parcel::Value(value); n]).await?;
        recv.into_iter()
            .map(|p| match p {
                Parcel::Value(v) => Ok(v),
                Parcel::Bufs(_) => Err(self.mismatch()),
            })
            .collect()
    }
}

impl LocalGroup {
    fn mismatch(&self) -> Error {
        Error::new(
            ErrorKind::Collective,
            "ranks called different collective operations in the same round",
        )
        .with_rank(self.rank)
    }

    /// One round: deposit a parcel for every rank, wait for every rank's.
    async fn exchange(&self, send: Vec<Parcel>) -> Result<Vec<Parcel>> {
        let n = self.shared.size;
        if send.len() != n {
            return Err(Error::invalid(format!(
                "all_to_all needs {n} messages, got {}",
                send.len()
            )));
        }
        let my_round;
        {
            let mut st = self.lock();
            if let Some(f) = &st.failure {
                return Err(Error::new(ErrorKind::Collective, f.clone()).with_rank(self.rank));
            }
            my_round = st.round[self.rank];
            st.deposits[self.rank] = Some(send);
            st.arrived += 1;
            if st.arrived == n {
                // Last to arrive: route every message and open the next round.
                let deposits: Vec<Vec<Parcel>> = st
                    .deposits
                    .iter_mut()
                    .map(|d| d.take().unwrap_or_default())
                    .collect();
                let mut recv: Vec<Vec<Parcel>> = vec![Vec::with_capacity(n); n];
                for from in deposits {
                    for (to, msg) in from.into_iter().enumerate() {
                        recv[to].push(msg);
                    }
                }
                for (to, r) in recv.into_iter().enumerate() {
                    st.inbox[to] = Some((my_round, r));
                    st.round[to] = my_round + 1;
                }
                st.arrived = 0;
                drop(st);
                self.shared.notify.notify_waiters();
            }
        }
        let deadline = tokio::time::Instant::now() + self.shared.timeout;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if let Some((r, _)) = &st.inbox[self.rank] {
                    if *r == my_round {
                        let (_, msgs) = st.inbox[self.rank].take().expect("checked");
                        return Ok(msgs);
                    }
                }
                if let Some(f) = &st.failure {
                    return Err(Error::new(ErrorKind::Collective, f.clone()).with_rank(self.rank));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let mut st = self.lock();
                if let Some((r, _)) = &st.inbox[self.rank] {
                    if *r == my_round {
                        let (_, msgs) = st.inbox[self.rank].take().expect("checked");
                        return Ok(msgs);
                    }
                }
                let missing: Vec<usize> = (0..n).filter(|&i| st.deposits[i].is_none()).collect();
                let msg = format!(
                    "collective deadline of {:?} passed waiting for rank(s) {missing:?}",
                    self.shared.timeout
                );
                if st.failure.is_none() {
                    st.failure = Some(msg.clone());
                }
                drop(st);
                self.shared.notify.notify_waiters();
                return Err(Error::new(ErrorKind::Collective, msg).with_rank(self.rank));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run_group<F, Fut, T>(n: usize, timeout: Duration, f: F) -> Vec<Result<T>>
    where
        F: Fn(LocalGroup) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let handles: Vec<_> = LocalGroup::with_timeout(n, timeout)
            .into_iter()
            .map(|g| tokio::spawn(f(g)))
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(
                h.await
                    .unwrap_or_else(|e| Err(Error::invalid(format!("join: {e}")))),
            );
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn all_to_all_routes_messages() {
        let res = run_group(4, Duration::from_secs(10), |g| async move {
            let mut last = Vec::new();
            for round in 0..20u8 {
                let send = (0..4)
                    .map(|to| Bytes::from(vec![g.rank() as u8, to as u8, round]))
                    .collect();
                last = g.all_to_all(send).await?;
                for (from, m) in last.iter().enumerate() {
                    assert_eq!(&m[..], &[from as u8, g.rank() as u8, round]);
                }
            }
            let all = g.all_gather(Bytes::from(vec![g.rank() as u8])).await?;
            assert_eq!(
                all.iter().map(|b| b[0]).collect::<Vec<_>>(),
                vec![0, 1, 2, 3]
            );
            let b = g
                .broadcast((g.rank() == 2).then(|| Bytes::from_static(b"hi")), 2)
                .await?;
            assert_eq!(&b[..], b"hi");
            let gathered = g.gather(Bytes::from(vec![g.rank() as u8 * 2]), 1).await?;
            assert_eq!(gathered.is_some(), g.rank() == 1);
            g.barrier().await?;
            Ok(last.len())
        })
        .await;
        for r in res {
            assert_eq!(r.unwrap(), 4);
        }
    }

    /// A collective that only implements `all_to_all` (as a byte transport
    /// would), to exercise the default framing of `all_to_all_v`.
    struct Framed(LocalGroup);

    #[async_trait]
    impl Collective for Framed {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world_size(&self) -> usize {
            self.0.world_size()
        }
        async fn all_to_all(&self, send: Vec<Bytes>) -> Result<Vec<Bytes>> {
            self.0.all_to_all(send).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn all_to_all_v_native_and_framed_agree() {
        let res = run_group(3, Duration::from_secs(10), |g| async move {
            let me = g.rank() as u8;
            let send = |_: ()| -> Vec<Vec<Bytes>> {
                (0..3u8)
                    .map(|to| {
                        (0..to + 1)
                            .map(|k| Bytes::from([me, to, k].repeat(k as usize + 1)))
                            .collect()
                    })
                    .collect()
            };
            let native = g.all_to_all_v(send(())).await?;
            assert!(g.shares_memory());
            let framed = Framed(g);
            assert!(!framed.shares_memory());
            let via_frames = framed.all_to_all_v(send(())).await?;
            assert_eq!(native, via_frames);
            for (from, bufs) in native.iter().enumerate() {
                assert_eq!(bufs.len(), me as usize + 1);
                for (k, b) in bufs.iter().enumerate() {
                    assert_eq!(&b[..], &[from as u8, me, k as u8].repeat(k + 1)[..]);
                }
            }
            Ok(())
        })
        .await;
        for r in res {
            r.unwrap();
        }
        assert!(unframe(Bytes::from_static(&[1, 0, 0, 0, 0, 0, 0, 0, 9])).is_err());
        // No buffers, then a stray byte: refused rather than dropped.
        let e = unframe(Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 0, 9])).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Collective);
        assert!(e.message().contains("malformed"), "{e}");
        assert_eq!(
            unframe(Bytes::from_static(&[
                1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7
            ]))
            .unwrap(),
            vec![Bytes::from_static(&[7])]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_rank_is_named_within_deadline() {
        let start = std::time::Instant::now();
        let res = run_group(3, Duration::from_millis(300), |g| async move {
            if g.rank() == 1 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                return Ok(());
            }
            let r = g.barrier().await;
            r
        })
        .await;
        assert!(start.elapsed() < Duration::from_secs(5));
        for (rank, r) in res.into_iter().enumerate() {
            if rank == 1 {
                continue;
            }
            let e = r.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Collective);
            assert!(e.message().contains("[1]"), "{e}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_rank_breaks_group() {
        let res = run_group(3, Duration::from_secs(30), |g| async move {
            if g.rank() == 2 {
                drop(g);
                return Ok(());
            }
            g.barrier().await?;
            Ok(())
        })
        .await;
        let e = res[0].as_ref().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Collective);
        assert!(e.message().contains("rank 2 left"), "{e}");
    }

    /// In-process values arrive in rank order, shared (the same allocation
    /// on every rank); a rank calling a byte collective in the same round is
    /// a `Collective` error on every rank, never a hang or a mix-up; a
    /// collective without in-process values refuses with `Unsupported`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn all_gather_local_shares_values_in_rank_order() {
        let res = run_group(3, Duration::from_secs(30), |g| async move {
            let v: LocalValue = Arc::new(g.rank() * 10);
            let all = g.all_gather_local(v.clone()).await?;
            let got: Vec<usize> = all
                .iter()
                .map(|x| *x.downcast_ref::<usize>().expect("usize"))
                .collect();
            assert_eq!(got, vec![0, 10, 20]);
            assert!(Arc::ptr_eq(&all[g.rank()], &v));
            // Mismatched calls in one round.
            let r = if g.rank() == 1 {
                g.all_gather(Bytes::from_static(b"x")).await.map(|_| ())
            } else {
                g.all_gather_local(v).await.map(|_| ())
            };
            Ok(r)
        })
        .await;
        for r in res {
            let e = r.unwrap().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Collective);
            assert!(
                e.message().contains("different collective operations"),
                "{e}"
            );
        }
        let e = Single.all_gather_local(Arc::new(0u8)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }
}

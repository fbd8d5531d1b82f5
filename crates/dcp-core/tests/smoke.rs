//! End-to-end smoke test of the core over the in-memory file system: 4 ranks
//! save a row-sharded tensor, 3 ranks load it column-sharded.

use bytes::Bytes;
use dcp_core::local::run_ranks;
use dcp_core::mem::MemoryFs;
use dcp_core::*;
use std::sync::Arc;
use std::time::Duration;

const R: u64 = 37;
const C: u64 = 23;

fn value(r: u64, c: u64) -> [u8; 2] {
    ((r * 1000 + c) as u16).to_le_bytes()
}

fn rows(lo: u64, hi: u64) -> Vec<u8> {
    let mut v = Vec::new();
    for r in lo..hi {
        for c in 0..C {
            v.extend_from_slice(&value(r, c));
        }
    }
    v
}

/// A collective that exposes only `all_to_all`, as a byte transport between
/// processes would: shared reads then send compacted slices. With
/// `claims_shared_memory` it says its ranks share one address space but
/// still cannot share in-process values.
struct BytesOnly {
    g: LocalGroup,
    claims_shared_memory: bool,
}

impl BytesOnly {
    fn new(g: LocalGroup) -> Self {
        BytesOnly {
            g,
            claims_shared_memory: false,
        }
    }
}

#[async_trait::async_trait]
impl Collective for BytesOnly {
    fn rank(&self) -> usize {
        self.g.rank()
    }
    fn world_size(&self) -> usize {
        self.g.world_size()
    }
    fn shares_memory(&self) -> bool {
        self.claims_shared_memory
    }
    async fn all_to_all(&self, send: Vec<Bytes>) -> Result<Vec<Bytes>> {
        self.g.all_to_all(send).await
    }
}

/// A collective claiming one address space without in-process values: a
/// load that would lend buffers through it refuses, on every rank, naming
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lending_through_a_collective_without_local_values_is_refused() {
    let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://refuse"));
    save_rows(fs.clone()).await;
    let res = run_ranks(2, Duration::from_secs(20), move |g| {
        let fs = fs.clone();
        async move {
            let rank = g.rank() as u64;
            let mut dest = DestStateDict::new();
            dest.want_tensor(
                "w",
                DType::BF16,
                vec![R, C],
                vec![ChunkBox::new(
                    vec![0, rank * 11],
                    vec![R, if rank == 0 { 11 } else { C - 11 }],
                )?],
            )?;
            let r = FileSystemReader::new(fs, ReaderOptions::default());
            load(
                dest,
                &r,
                &BytesOnly {
                    g,
                    claims_shared_memory: true,
                },
            )
            .await
        }
    })
    .await;
    for r in res {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.message().contains("in-process values"), "{e}");
    }
}

/// Ranks of one process share rank 0's decoded metadata (one decode per
/// process); ranks reaching each other by bytes each decode their own copy.
/// Either way every rank holds the checkpoint's metadata as saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_of_one_process_decode_the_metadata_once() {
    let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://decode-once"));
    let saved = save_rows(fs.clone()).await[0].metadata.clone();
    for bytes_only in [false, true] {
        let fs = fs.clone();
        let res = run_ranks(3, Duration::from_secs(20), move |g| {
            let fs = fs.clone();
            async move {
                let mut dest = DestStateDict::new();
                dest.want_bytes("step")?;
                let r = FileSystemReader::new(fs, ReaderOptions::default());
                let out = if bytes_only {
                    load(dest, &r, &BytesOnly::new(g)).await?
                } else {
                    load(dest, &r, &g).await?
                };
                assert_eq!(out.state_dict.bytes("step"), Some(&b"42"[..]));
                Ok(out.metadata)
            }
        })
        .await;
        let mds: Vec<Arc<Metadata>> = res.into_iter().map(|r| r.unwrap()).collect();
        for md in &mds {
            assert_eq!(**md, *saved);
        }
        let shared = mds.iter().all(|m| Arc::ptr_eq(m, &mds[0]));
        assert_eq!(shared, !bytes_only, "bytes_only: {bytes_only}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_rows_to_columns() {
    reshard(Mode::Lend, ReaderOptions::default().small_record).await;
}

/// Every record, however small, read with one scattered read straight into
/// the three ranks' buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_rows_to_columns_scattered() {
    reshard(Mode::Lend, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_rows_to_columns_over_a_byte_transport() {
    reshard(Mode::Bytes, 0).await;
}

/// Ranks in "separate processes" whose collective has node windows: ranks
/// 0 and 1 share one node, rank 2 is alone on another. Slices between 0
/// and 1 go through the window, to and from 2 as messages; bit-exact,
/// every saved byte read once, and bytes really crossed the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_rows_to_columns_through_node_windows() {
    for small in [0, ReaderOptions::default().small_record] {
        let copied = reshard(Mode::Nodes(&[&[0, 1], &[2]]), small).await;
        assert!(copied > 0, "nothing crossed the window");
        // One node: every slice through the window.
        let one = reshard(Mode::Nodes(&[&[0, 1, 2]]), small).await;
        assert!(one > copied, "{one} <= {copied}");
        // Every rank alone on its node: messages only.
        assert_eq!(reshard(Mode::Nodes(&[&[0], &[1], &[2]]), small).await, 0);
    }
}

/// A rank whose storage fails while the others serve through the window:
/// every rank fails with its error, naming it, within the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rank_fails_a_windowed_load_everywhere() {
    let mem = MemoryFs::new("memory://smoke-window-fail");
    let fs: Arc<dyn FileSystem> = Arc::new(mem.clone());
    save_rows(fs.clone()).await;
    let nodes = FakeNodes::new(3, &[&[0, 1, 2]]);
    let started = std::time::Instant::now();
    let res = run_ranks(3, Duration::from_secs(20), move |g| {
        let fs = fs.clone();
        let nodes = nodes.clone();
        async move {
            let rank = g.rank();
            let (lo, hi) = (C * rank as u64 / 3, C * (rank as u64 + 1) / 3);
            let mut dest = DestStateDict::new();
            dest.want_tensor(
                "w",
                DType::BF16,
                vec![R, C],
                vec![ChunkBox::new(vec![0, lo], vec![R, hi - lo])?],
            )?;
            let fs: Arc<dyn FileSystem> = if rank == 1 { Arc::new(Failing(fs)) } else { fs };
            let r = FileSystemReader::new(fs, ReaderOptions::default());
            load_with(dest, &r, &nodes.member(g), &LoadOptions::default()).await
        }
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(20));
    for r in res {
        let e = r.unwrap_err();
        assert!(e.message().contains("injected read failure"), "{e}");
        assert_eq!(e.rank(), Some(1), "{e}");
    }
}

/// A file system whose reads of data files fail.
#[derive(Debug)]
struct Failing(Arc<dyn FileSystem>);

impl dcp_core::layer::FileSystemLayer for Failing {
    fn inner(&self) -> &dyn FileSystem {
        &*self.0
    }
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        if name.starts_with('.') {
            return self.0.read_into(name, offset, buf);
        }
        Err(Error::new(
            ErrorKind::Io,
            format!("injected read failure of {name}"),
        ))
    }
    fn read_scattered(
        &self,
        name: &str,
        _offset: u64,
        _bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        Err(Error::new(
            ErrorKind::Io,
            format!("injected read failure of {name}"),
        ))
    }
    fn read_if_cached(&self, _name: &str, _offset: u64, _buf: &mut [u8]) -> Result<bool> {
        Ok(false)
    }
}

/// In-process stand-ins for the shared memory of MPI's nodes
/// ([`Collective::node_window`]): each rank's segment a `Vec<u8>` behind a
/// lock; carved pieces are buffers of their own, written back into the
/// segment when dropped (as the load drops them before its exchange).
#[derive(Clone)]
struct FakeNodes {
    nodes: Vec<Vec<usize>>,
    segments: Arc<Vec<std::sync::Mutex<Vec<u8>>>>,
    copied: Arc<std::sync::atomic::AtomicU64>,
}

impl FakeNodes {
    fn new(world: usize, nodes: &[&[usize]]) -> FakeNodes {
        FakeNodes {
            nodes: nodes.iter().map(|n| n.to_vec()).collect(),
            segments: Arc::new((0..world).map(|_| Default::default()).collect()),
            copied: Default::default(),
        }
    }
    fn member(&self, g: LocalGroup) -> NodeMember {
        let node = self
            .nodes
            .iter()
            .find(|n| n.contains(&g.rank()))
            .cloned()
            .expect("every rank on a node");
        NodeMember {
            g,
            node,
            nodes: self.clone(),
        }
    }
}

/// A [`LocalGroup`] member that does not share its address space (as
/// ranks in separate processes), with a node window.
struct NodeMember {
    g: LocalGroup,
    node: Vec<usize>,
    nodes: FakeNodes,
}

#[async_trait::async_trait]
impl Collective for NodeMember {
    fn rank(&self) -> usize {
        self.g.rank()
    }
    fn world_size(&self) -> usize {
        self.g.world_size()
    }
    async fn all_to_all(&self, send: Vec<Bytes>) -> Result<Vec<Bytes>> {
        self.g.all_to_all(send).await
    }
    async fn all_to_all_v(&self, send: Vec<Vec<Bytes>>) -> Result<Vec<Vec<Bytes>>> {
        self.g.all_to_all_v(send).await
    }
    fn node_ranks(&self) -> Option<Vec<usize>> {
        Some(self.node.clone())
    }
    async fn node_window(&self, len: usize) -> Result<Arc<dyn NodeWindow>> {
        {
            let mut seg = self.nodes.segments[self.rank()].lock().unwrap();
            if seg.len() < len {
                seg.resize(len, 0);
            }
        }
        self.g.barrier().await?;
        Ok(Arc::new(FakeWindow {
            rank: self.rank(),
            node: self.node.clone(),
            nodes: self.nodes.clone(),
        }))
    }
}

struct FakeWindow {
    rank: usize,
    node: Vec<usize>,
    nodes: FakeNodes,
}

struct FakePiece {
    nodes: FakeNodes,
    rank: usize,
    at: usize,
    buf: Vec<u8>,
}

impl TensorBuffer for FakePiece {
    fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
    fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for FakePiece {
    fn drop(&mut self) {
        let mut seg = self.nodes.segments[self.rank].lock().unwrap();
        seg[self.at..self.at + self.buf.len()].copy_from_slice(&self.buf);
    }
}

impl NodeWindow for FakeWindow {
    fn node_ranks(&self) -> &[usize] {
        &self.node
    }
    fn segment_len(&self, rank: usize) -> usize {
        self.nodes.segments[rank].lock().unwrap().len()
    }
    fn carve(&self, lens: &[usize]) -> Result<Vec<Box<dyn TensorBuffer>>> {
        let total: usize = lens.iter().sum();
        if total > self.segment_len(self.rank) {
            return Err(Error::invalid("segment too small"));
        }
        let mut at = 0;
        Ok(lens
            .iter()
            .map(|&len| {
                at += len;
                Box::new(FakePiece {
                    nodes: self.nodes.clone(),
                    rank: self.rank,
                    at: at - len,
                    buf: vec![0; len],
                }) as Box<dyn TensorBuffer>
            })
            .collect())
    }
    fn copy_out(&self, rank: usize, runs: &[(usize, usize, usize)], dst: &mut [u8]) -> Result<()> {
        assert!(self.node.contains(&rank), "rank {rank} is off this node");
        let seg = self.nodes.segments[rank].lock().unwrap();
        for &(from, to, len) in runs {
            dst[to..to + len].copy_from_slice(&seg[from..from + len]);
            self.nodes
                .copied
                .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
    fn sync(&self) {}
}

/// How the ranks of a resharded load reach each other.
#[derive(Clone, Copy)]
enum Mode {
    /// `LocalGroup`: one address space, buffers lent.
    Lend,
    /// Bytes through `all_to_all` only.
    Bytes,
    /// Separate "processes" on these nodes, with node windows.
    Nodes(&'static [&'static [usize]]),
}

/// 4 ranks save `w` split by rows, and a replicated bytes item `step`.
async fn save_rows(fs: Arc<dyn FileSystem>) -> Vec<SaveResult> {
    let res = run_ranks(4, Duration::from_secs(20), move |g| {
        let fs = fs.clone();
        async move {
            let rank = g.rank() as u64;
            let (lo, hi) = (R * rank / 4, R * (rank + 1) / 4);
            let mut sd = StateDict::new();
            sd.insert_tensor(
                "w",
                DType::BF16,
                vec![R, C],
                vec![TensorChunk {
                    region: ChunkBox::new(vec![lo, 0], vec![hi - lo, C])?,
                    data: Bytes::from(rows(lo, hi)).into(),
                }],
                false,
            )?;
            sd.insert_bytes("step", b"42".to_vec(), true)?;
            let opts = WriterOptions::default().thread_count(2);
            let w = FileSystemWriter::new(fs, opts)?;
            save(&sd, &w, &g).await
        }
    })
    .await;
    res.into_iter().map(|r| r.unwrap()).collect()
}

/// Save rows with 4 ranks, load columns with 3 reaching each other as
/// `mode` says, check every byte; returns the bytes copied out of node
/// windows.
async fn reshard(mode: Mode, small_record: u64) -> u64 {
    let mem = MemoryFs::new("memory://smoke");
    let fs: Arc<dyn FileSystem> = Arc::new(mem.clone());
    let res = save_rows(fs.clone()).await;
    let md = &res[0].metadata;
    assert_eq!(md.world_size, 4);
    assert!(mem.get(".metadata").is_some());

    let fs3 = fs.clone();
    let nodes = match mode {
        Mode::Nodes(n) => FakeNodes::new(3, n),
        _ => FakeNodes::new(3, &[]),
    };
    let copied = nodes.copied.clone();
    let res = run_ranks(3, Duration::from_secs(20), move |g| {
        let fs = fs3.clone();
        let nodes = nodes.clone();
        async move {
            let rank = g.rank() as u64;
            let (lo, hi) = (C * rank / 3, C * (rank + 1) / 3);
            let mut dest = DestStateDict::new();
            dest.want_tensor(
                "w",
                DType::BF16,
                vec![R, C],
                vec![ChunkBox::new(vec![0, lo], vec![R, hi - lo])?],
            )?;
            dest.want_bytes("step")?;
            let r = FileSystemReader::new(fs, ReaderOptions::default().small_record(small_record));
            // A small exchange budget forces several rounds.
            let opts = LoadOptions::default().exchange_budget(2048);
            let out = match mode {
                Mode::Bytes => load_with(dest, &r, &BytesOnly::new(g), &opts).await?,
                Mode::Lend => load_with(dest, &r, &g, &opts).await?,
                Mode::Nodes(_) => load_with(dest, &r, &nodes.member(g), &opts).await?,
            };
            assert!(out.stats.bytes_read > 0);
            let t = out.state_dict.tensor("w").unwrap();
            let mut expect = Vec::new();
            for r in 0..R {
                for c in lo..hi {
                    expect.extend_from_slice(&value(r, c));
                }
            }
            assert_eq!(t.chunks[0].data, expect);
            assert_eq!(out.state_dict.bytes("step"), Some(&b"42"[..]));
            Ok(out.stats)
        }
    })
    .await;
    let total: u64 = res.into_iter().map(|r| r.unwrap().bytes_read).sum();
    // Shared reads: every saved byte is read once across the 3 ranks, not
    // once per rank (the bytes item is read by each rank).
    let saved = R * C * 2;
    assert!(
        total >= saved && total <= saved + 3 * 64,
        "read {total} bytes for a {saved}-byte tensor"
    );
    copied.load(std::sync::atomic::Ordering::Relaxed)
}

//! Shared test support: a moto S3 server on 127.0.0.1, a sharded state dict
//! with a reference, and save/load helpers over N ranks.
#![allow(dead_code)]

use bytes::Bytes;
use dcp_core::local::run_ranks;
use dcp_core::*;
use dcp_fsspec::{OpendalFs, OpendalOptions};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A moto S3 server child process, killed (by its PID) on drop.
pub struct Moto {
    child: Mutex<Option<Child>>,
    pub port: u16,
}

impl Moto {
    /// Start a private server. `None` (after printing why) when
    /// `moto_server` is not installed and `CI` is unset; panics under `CI`.
    pub fn start() -> Option<Moto> {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if std::env::var_os("CI").is_some() {
                    panic!(
                        "moto_server is not installed (pip install 'moto[server]'), and CI is set"
                    );
                }
                eprintln!("SKIPPED: moto_server is not installed (pip install 'moto[server]')");
                return None;
            }
            Err(e) => panic!("cannot start moto_server: {e}"),
        };
        let moto = Moto {
            child: Mutex::new(Some(child)),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http(port, "GET", "/", &[]).is_ok() {
                return Some(moto);
            }
            if let Some(c) = moto.child.lock().unwrap().as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("moto_server exited early: {status}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A server shared by the tests of this binary that run at the same
    /// time (each uses its own bucket); stopped when the last one is done.
    pub fn shared() -> Option<Arc<Moto>> {
        static SHARED: Mutex<Option<Weak<Moto>>> = Mutex::new(None);
        let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = slot.as_ref().and_then(Weak::upgrade) {
            return Some(m);
        }
        let m = Arc::new(Moto::start()?);
        *slot = Some(Arc::downgrade(&m));
        Some(m)
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create `bucket` with a plain HTTP PUT.
    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = http(self.port, "PUT", &format!("/{bucket}"), &[]).unwrap();
        assert_eq!(status, 200, "create bucket {bucket}: {body}");
    }

    /// Multipart uploads still in progress in `bucket`.
    pub fn pending_uploads(&self, bucket: &str) -> usize {
        let (status, body) = http(self.port, "GET", &format!("/{bucket}?uploads"), &[]).unwrap();
        assert_eq!(status, 200, "{body}");
        body.matches("<Upload>").count()
    }

    /// Storage options for this server.
    pub fn options(&self) -> HashMap<String, String> {
        [
            ("endpoint", self.endpoint()),
            ("region", "us-east-1".to_string()),
            ("access_key_id", "testing".to_string()),
            ("secret_access_key", "testing".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Kill the server now.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP/1.1 request; returns the status and body.
pub fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(2),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((status, body))
}

/// A unique name for buckets and memory stores.
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Options for fast tests: short retry delays, bounded timeouts.
pub fn fast_options() -> OpendalOptions {
    OpendalOptions {
        part_size: 5 << 20,
        read_chunk: 1 << 20,
        max_retries: 3,
        retry_min_delay: Duration::from_millis(10),
        retry_max_delay: Duration::from_millis(100),
        timeout: Duration::from_secs(20),
        io_timeout: Duration::from_secs(20),
        ..OpendalOptions::default()
    }
}

/// The shape of the test checkpoint: `w` is [ROWS, COLS] bf16, saved in
/// row blocks, loaded in column blocks; `big` is [4, BIG_COLS] f32, one row
/// per saving rank (each row one record of BIG_COLS*4 bytes).
pub const ROWS: u64 = 41;
pub const COLS: u64 = 29;

/// The value of element `i` of a tensor, as bytes, varied by `seed`.
pub fn elem(seed: u32, i: u64, width: usize) -> Vec<u8> {
    let v = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
    v.to_le_bytes()[..width].to_vec()
}

fn fill(seed: u32, idx: impl Iterator<Item = u64>, width: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in idx {
        out.extend_from_slice(&elem(seed, i, width));
    }
    out
}

/// What rank `rank` of `n` saves: a row block of `w`, its row of `big`
/// (when `big_cols > 0`), a replicated `emb`, and a bytes item.
pub fn state_dict(seed: u32, rank: u64, n: u64, big_cols: u64) -> Result<StateDict> {
    let mut sd = StateDict::new();
    let (lo, hi) = (ROWS * rank / n, ROWS * (rank + 1) / n);
    sd.insert_tensor(
        "w",
        DType::BF16,
        vec![ROWS, COLS],
        vec![TensorChunk {
            region: ChunkBox::new(vec![lo, 0], vec![hi - lo, COLS])?,
            data: Bytes::from(fill(seed, lo * COLS..hi * COLS, 2)),
        }],
        false,
    )?;
    if big_cols > 0 {
        sd.insert_tensor(
            "big",
            DType::F32,
            vec![n, big_cols],
            vec![TensorChunk {
                region: ChunkBox::new(vec![rank, 0], vec![1, big_cols])?,
                data: Bytes::from(fill(seed, rank * big_cols..(rank + 1) * big_cols, 4)),
            }],
            false,
        )?;
    }
    sd.insert_tensor(
        "emb",
        DType::F32,
        vec![7],
        vec![TensorChunk {
            region: ChunkBox::full(&[7]),
            data: Bytes::from(fill(seed, 0..7, 4)),
        }],
        true,
    )?;
    sd.insert_bytes("step", format!("step-{seed}").into_bytes(), true)?;
    Ok(sd)
}

/// Save with `n` ranks; every rank's result.
pub async fn save_ranks(
    fs: Arc<dyn FileSystem>,
    n: usize,
    seed: u32,
    big_cols: u64,
    opts: WriterOptions,
    timeout: Duration,
) -> Vec<Result<SaveResult>> {
    run_ranks(n, timeout, move |g| {
        let fs = fs.clone();
        let opts = opts.clone();
        async move {
            let sd = state_dict(seed, g.rank() as u64, n as u64, big_cols)?;
            let w = FileSystemWriter::new(fs, opts)?;
            save(&sd, &w, &g).await
        }
    })
    .await
}

/// Load with `m` ranks, column blocks of `w` and of `big` (saved by
/// `saved_ranks` ranks), and compare every byte with the reference of
/// `seed`. Returns each rank's result.
pub async fn load_and_check(
    fs: Arc<dyn FileSystem>,
    m: usize,
    seed: u32,
    saved_ranks: u64,
    big_cols: u64,
    timeout: Duration,
) -> Vec<Result<ReadStats>> {
    run_ranks(m, timeout, move |g| {
        let fs = fs.clone();
        async move {
            let rank = g.rank() as u64;
            let m = m as u64;
            let (lo, hi) = (COLS * rank / m, COLS * (rank + 1) / m);
            let mut dest = DestStateDict::new();
            dest.want_tensor(
                "w",
                DType::BF16,
                vec![ROWS, COLS],
                vec![ChunkBox::new(vec![0, lo], vec![ROWS, hi - lo])?],
            )?;
            let (blo, bhi) = (big_cols * rank / m, big_cols * (rank + 1) / m);
            if big_cols > 0 {
                dest.want_tensor(
                    "big",
                    DType::F32,
                    vec![saved_ranks, big_cols],
                    vec![ChunkBox::new(vec![0, blo], vec![saved_ranks, bhi - blo])?],
                )?;
            }
            dest.want_tensor("emb", DType::F32, vec![7], vec![ChunkBox::full(&[7])])?;
            dest.want_bytes("step")?;
            let r = FileSystemReader::new(fs, ReaderOptions::default());
            let out = load(dest, &r, &g).await?;
            let sd = &out.state_dict;
            let expect_w = fill(
                seed,
                (0..ROWS).flat_map(|r| (lo..hi).map(move |c| r * COLS + c)),
                2,
            );
            assert!(
                sd.tensor("w").unwrap().chunks[0].data == expect_w,
                "w differs on rank {rank}"
            );
            if big_cols > 0 {
                let expect_big = fill(
                    seed,
                    (0..saved_ranks).flat_map(|r| (blo..bhi).map(move |c| r * big_cols + c)),
                    4,
                );
                assert!(
                    sd.tensor("big").unwrap().chunks[0].data == expect_big,
                    "big differs on rank {rank}"
                );
            }
            assert_eq!(
                sd.tensor("emb").unwrap().chunks[0].data,
                fill(seed, 0..7, 4)
            );
            assert_eq!(sd.bytes("step"), Some(format!("step-{seed}").as_bytes()));
            Ok(out.stats)
        }
    })
    .await
}

/// Assert that every result is `Ok`.
pub fn all_ok<T: std::fmt::Debug>(rs: &[Result<T>]) {
    for (i, r) in rs.iter().enumerate() {
        if let Err(e) = r {
            panic!("rank {i} failed: {e} ({e:?})");
        }
    }
}

/// The data files listed in `fs`, and whether they are exactly those the
/// committed metadata references (no stale objects).
pub fn assert_only_referenced(fs: &dyn FileSystem, md: &Metadata) {
    let listed: Vec<String> = fs
        .list()
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .filter(|n| n != ".metadata")
        .collect();
    let mut referenced: Vec<String> = md.files.iter().map(|f| f.name.clone()).collect();
    referenced.sort();
    assert_eq!(
        listed, referenced,
        "objects under the prefix differ from the metadata's files"
    );
    for f in &md.files {
        let len = fs.file_len(&f.name).unwrap().unwrap();
        assert_eq!(len, f.length, "{} length", f.name);
    }
}

/// Open an S3 file system on `moto` at `bucket/prefix`.
pub fn s3_fs(moto: &Moto, bucket: &str, prefix: &str, opts: OpendalOptions) -> OpendalFs {
    OpendalFs::from_url_with(&format!("s3://{bucket}/{prefix}"), &moto.options(), opts).unwrap()
}

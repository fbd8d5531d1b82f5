//! Save and load throughput to an S3 server, beside a raw OpenDAL upload and
//! download of the same bytes in the same run.
//!
//! ```text
//! cargo run --release -p dcp-fsspec --example s3_bench -- \
//!     --endpoint http://127.0.0.1:PORT --bucket B [--mib 256] [--reps 3] \
//!     [--tensor-mib 16] [--threads 1,4] [--part-mib N] [--write-concurrency N] \
//!     [--read-chunk-mib N] [--read-concurrency N]
//! ```
//! The last four override [`OpendalOptions`]' defaults (which is what is
//! measured without them).
//! Without `--endpoint` it starts `moto_server` on a free port on 127.0.0.1
//! itself (and stops it at the end). For 1 and 4 writer threads it prints
//! the median of `--reps` runs of: a dcp save (`dcp_fsspec::writer`, one rank), a
//! raw OpenDAL upload of the same bytes as the same number of objects (same
//! part size and part concurrency), a dcp load of everything, and a raw
//! concurrent ranged download; `ratio` is raw seconds / dcp seconds (1.0
//! means dcp adds nothing over the bare client).

use bytes::Bytes;
use dcp_core::{
    load, save, ChunkBox, DType, DestStateDict, ReaderOptions, Single, StateDict, WriterOptions,
};
use dcp_fsspec::{OpendalFs, OpendalOptions};
use futures::StreamExt;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    endpoint: Option<String>,
    bucket: String,
    mib: usize,
    reps: usize,
    tensor_mib: usize,
    threads: Vec<usize>,
    dal: OpendalOptions,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        endpoint: None,
        bucket: "dcp-bench".into(),
        mib: 256,
        reps: 3,
        tensor_mib: 16,
        threads: vec![1, 4],
        dal: OpendalOptions::default(),
    };
    let num = |k: &str, v: String| v.parse::<usize>().map_err(|e| format!("{k}: {e}"));
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--endpoint" => a.endpoint = Some(v()?),
            "--bucket" => a.bucket = v()?,
            "--mib" => a.mib = v()?.parse().map_err(|e| format!("--mib: {e}"))?,
            "--reps" => a.reps = v()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--tensor-mib" => a.tensor_mib = num(&k, v()?)?,
            "--threads" => {
                a.threads = v()?
                    .split(',')
                    .map(|t| num("--threads", t.to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--part-mib" => a.dal.part_size = num(&k, v()?)? << 20,
            "--write-concurrency" => a.dal.write_concurrency = num(&k, v()?)?,
            "--read-chunk-mib" => a.dal.read_chunk = num(&k, v()?)? << 20,
            "--read-concurrency" => a.dal.read_concurrency = num(&k, v()?)?,
            "-h" | "--help" => {
                return Err(
                    "usage: s3_bench [--endpoint URL --bucket B] [--mib 256] [--reps 3]".into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.reps == 0 || a.tensor_mib == 0 || a.mib < a.tensor_mib || a.threads.contains(&0) {
        return Err(
            "--reps, --tensor-mib and --threads must be at least 1, --mib at least --tensor-mib"
                .into(),
        );
    }
    Ok(a)
}

/// A moto server started by the benchmark, killed on drop.
struct Moto(Child);
impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad HTTP response"))
}

fn start_moto() -> Result<(Moto, String), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start moto_server (pip install 'moto[server]'): {e}"))?;
    let moto = Moto(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(port, "GET", "/").is_err() {
        if Instant::now() > deadline {
            return Err("moto_server did not answer within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((moto, format!("http://127.0.0.1:{port}")))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn state_dict(mib: usize, tensor_mib: usize) -> StateDict {
    let mut sd = StateDict::new();
    let elems = tensor_mib << 18; // f32
    for t in 0..mib / tensor_mib {
        let data: Vec<u8> = (0..elems as u32)
            .flat_map(|i| (i.wrapping_mul(2_654_435_761) ^ t as u32).to_le_bytes())
            .collect();
        sd.insert_full_tensor(
            format!("layers.{t}.weight"),
            DType::F32,
            vec![elems as u64],
            Bytes::from(data),
        )
        .expect("valid tensor");
    }
    sd
}

fn dest(mib: usize, tensor_mib: usize) -> DestStateDict {
    let mut d = DestStateDict::new();
    let elems = (tensor_mib << 18) as u64;
    for t in 0..mib / tensor_mib {
        d.want_tensor(
            format!("layers.{t}.weight"),
            DType::F32,
            vec![elems],
            vec![ChunkBox::full(&[elems])],
        )
        .expect("valid destination");
    }
    d
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("s3_bench: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let args = parse_args()?;
    let (_moto, endpoint) = match &args.endpoint {
        Some(e) => (None, e.clone()),
        None => {
            let (m, e) = tokio::task::spawn_blocking(start_moto)
                .await
                .map_err(|e| e.to_string())??;
            (Some(m), e)
        }
    };
    let port: Option<u16> = endpoint
        .strip_prefix("http://127.0.0.1:")
        .and_then(|p| p.trim_end_matches('/').parse().ok());
    if let Some(port) = port {
        // Create the bucket (200, or 409 when it exists).
        let b = format!("/{}", args.bucket);
        let status = tokio::task::spawn_blocking(move || http(port, "PUT", &b))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("create bucket: {e}"))?;
        if status != 200 && status != 409 {
            return Err(format!("create bucket: HTTP {status}"));
        }
    }
    let so: HashMap<String, String> = [
        ("endpoint", endpoint.clone()),
        ("region", "us-east-1".into()),
        ("access_key_id", "testing".into()),
        ("secret_access_key", "testing".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let dal = args.dal.clone();
    let tensor_mib = args.tensor_mib;
    let sd = state_dict(args.mib, tensor_mib);
    let total = (args.mib / tensor_mib * tensor_mib) as f64 * 1048576.0;
    let raw_fs = OpendalFs::from_url_with(&format!("s3://{}/raw", args.bucket), &so, dal.clone())
        .map_err(|e| e.to_string())?;
    let op = raw_fs.operator().clone();
    println!(
        "dcp-fsspec s3_bench: {:.0} MiB in {} tensors of {tensor_mib} MiB, endpoint {endpoint}, \
         part {} MiB x {} concurrent, read chunk {} MiB x {}, median of {} reps",
        total / 1048576.0,
        args.mib / tensor_mib,
        dal.part_size >> 20,
        dal.write_concurrency,
        dal.read_chunk >> 20,
        dal.read_concurrency,
        args.reps
    );
    println!(
        "{:>7} | {:>9} {:>9} {:>9} {:>6} | {:>9} {:>9} {:>9} {:>6}",
        "threads",
        "save s",
        "raw up s",
        "save MB/s",
        "ratio",
        "load s",
        "raw dn s",
        "load MB/s",
        "ratio"
    );
    for &threads in &args.threads {
        let url = format!("s3://{}/ckpt-t{threads}", args.bucket);
        let (mut save_s, mut up_s, mut load_s, mut down_s) = (vec![], vec![], vec![], vec![]);
        for _ in 0..args.reps {
            // dcp save
            let w = dcp_fsspec::writer_with(
                &url,
                &so,
                WriterOptions::default().thread_count(threads),
                dal.clone(),
            )
            .map_err(|e| e.to_string())?;
            let t = Instant::now();
            save(&sd, &w, &Single).await.map_err(|e| e.to_string())?;
            save_s.push(t.elapsed().as_secs_f64());

            // raw upload: the same bytes as `threads` objects, concurrently
            let tensors: Vec<Bytes> = sd
                .iter()
                .map(|(_, item)| match item {
                    dcp_core::Item::Tensor(t) => {
                        t.chunks[0].data.host().expect("host memory").clone()
                    }
                    dcp_core::Item::Bytes { data, .. } => data.clone(),
                })
                .collect();
            let groups: Vec<Vec<Bytes>> = (0..threads)
                .map(|g| tensors.iter().skip(g).step_by(threads).cloned().collect())
                .collect();
            let t = Instant::now();
            let ups = groups.into_iter().enumerate().map(|(g, bufs)| {
                let op = op.clone();
                let dal = dal.clone();
                tokio::spawn(async move {
                    let mut w = op
                        .writer_with(&format!("obj-{g}"))
                        .chunk(dal.part_size)
                        .concurrent(dal.write_concurrency)
                        .await?;
                    for b in bufs {
                        w.write(b).await?;
                    }
                    w.close().await.map(|m| m.content_length())
                })
            });
            for h in futures::future::join_all(ups).await {
                h.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            }
            up_s.push(t.elapsed().as_secs_f64());

            // dcp load
            let r = dcp_fsspec::reader_with(
                &url,
                &so,
                ReaderOptions::default().thread_count(threads),
                dal.clone(),
            )
            .map_err(|e| e.to_string())?;
            let t = Instant::now();
            let out = load(dest(args.mib, tensor_mib), &r, &Single)
                .await
                .map_err(|e| e.to_string())?;
            load_s.push(t.elapsed().as_secs_f64());
            drop(out);

            // raw download: every object, concurrent ranged reads
            let t = Instant::now();
            let downs = (0..threads).map(|g| {
                let op = op.clone();
                let dal = dal.clone();
                tokio::spawn(async move {
                    let path = format!("obj-{g}");
                    let len = op.stat(&path).await?.content_length();
                    let reader = op.reader(&path).await?;
                    let reader = &reader;
                    let chunk = dal.read_chunk as u64;
                    let n: usize = futures::stream::iter((0..len).step_by(chunk as usize))
                        .map(|a| async move {
                            #[allow(clippy::single_range_in_vec_init)]
                            reader.fetch(vec![a..(a + chunk).min(len)]).await.map(|v| {
                                // Copy out, as a load does.
                                let mut out = Vec::with_capacity(chunk as usize);
                                for b in v {
                                    for part in b {
                                        out.extend_from_slice(&part);
                                    }
                                }
                                out.len()
                            })
                        })
                        .buffer_unordered(dal.read_concurrency)
                        .fold(Ok(0usize), |acc, r| async move { Ok(acc? + r?) })
                        .await?;
                    Ok::<usize, opendal::Error>(n)
                })
            });
            let mut got = 0usize;
            for h in futures::future::join_all(downs).await {
                got += h.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            }
            if got as f64 != total {
                return Err(format!("raw download got {got} bytes, expected {total}"));
            }
            down_s.push(t.elapsed().as_secs_f64());
        }
        let (s, u, l, d) = (median(save_s), median(up_s), median(load_s), median(down_s));
        println!(
            "{threads:>7} | {s:>9.2} {u:>9.2} {:>9.0} {:>6.2} | {l:>9.2} {d:>9.2} {:>9.0} {:>6.2}",
            total / s / 1e6,
            u / s,
            total / l / 1e6,
            d / l
        );
    }
    Ok(())
}

//! One timed load of a torch DCP checkpoint, for `bench/torch_dcp_bench.py`:
//!
//!   load_bench DIR dcp [RANKS] [THREADS]   dcp loads every item whole (one
//!                                          rank) or split by rows (RANKS
//!                                          LocalGroup ranks), verifying the
//!                                          archives' CRC-32 of every tensor
//!   load_bench DIR dcp-nocrc [RANKS] [THREADS]   the same without the CRCs
//!                                          (as torch, which never checks them)
//!   load_bench DIR raw [THREADS]           the data files read whole into
//!                                          memory, one thread per file up to
//!                                          THREADS (the physical baseline)
//!
//! Prints one JSON line: `{"mode", "seconds", "bytes"}`. Destination and
//! baseline buffers are allocated and touched before the clock starts.
//! The caller controls the page cache (the script drops it for cold runs).

use dcp_core::local::run_ranks;
use dcp_core::metadata::ItemMeta;
use dcp_core::placement::{DeviceMesh, Placement};
use dcp_core::{ChunkBox, Collective, DestChunk, DestStateDict, FileSystemReader, ReaderOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, mode) = match (args.get(1), args.get(2)) {
        (Some(d), Some(m)) => (d.clone(), m.clone()),
        _ => {
            eprintln!(
                "usage: load_bench DIR dcp|dcp-nocrc [RANKS] [THREADS] | load_bench DIR raw [THREADS]"
            );
            std::process::exit(2);
        }
    };
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let fs: Arc<dyn dcp_core::FileSystem> = Arc::new(dcp_fs::LocalFs::new(&dir));
    let mut opts = ReaderOptions::default();
    dcp_torch::register(&mut opts);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    match mode.as_str() {
        "dcp" | "dcp-nocrc" => {
            let (ranks, threads) = (num(3, 1), num(4, 4));
            let opts = opts.thread_count(threads).verify_checksums(mode == "dcp");
            let reader = Arc::new(FileSystemReader::new(fs, opts));
            let md = Arc::new(
                rt.block_on(dcp_core::read_metadata(reader.as_ref()))
                    .expect("metadata"),
            );
            // Destinations built (and their buffers touched) before timing.
            let mut dests = Vec::new();
            for rank in 0..ranks {
                let mut d = DestStateDict::new();
                for (name, item) in &md.items {
                    match item {
                        ItemMeta::Tensor { dtype, shape, .. } => {
                            let boxes: Vec<ChunkBox> = if shape.is_empty() {
                                if rank == 0 {
                                    vec![ChunkBox::full(shape)]
                                } else {
                                    vec![]
                                }
                            } else {
                                DeviceMesh::new(vec![ranks])
                                    .unwrap()
                                    .local_box(shape, &[Placement::Shard(0)], rank)
                                    .unwrap()
                                    .into_iter()
                                    .collect()
                            };
                            // Buffers written before the clock starts (as
                            // the raw baseline's), so neither side times
                            // page faults.
                            let chunks = boxes
                                .into_iter()
                                .map(|b| {
                                    let n = b.numel() as usize * dtype.size();
                                    DestChunk::new(b, vec![0xa5; n])
                                })
                                .collect();
                            d.insert_tensor(name.clone(), *dtype, shape.to_vec(), chunks)
                                .unwrap();
                        }
                        ItemMeta::Bytes { .. } => d.want_bytes(name.clone()).unwrap(),
                    }
                }
                dests.push(std::sync::Mutex::new(Some(d)));
            }
            let dests = Arc::new(dests);
            let started = Instant::now();
            let results = rt.block_on(run_ranks(ranks, Duration::from_secs(3600), move |g| {
                let (reader, dests) = (reader.clone(), dests.clone());
                async move {
                    let d = dests[g.rank()].lock().unwrap().take().unwrap();
                    dcp_core::load(d, reader.as_ref(), &g).await
                }
            }));
            let secs = started.elapsed().as_secs_f64();
            let mut bytes = 0;
            for r in results {
                bytes += r.expect("load").stats.bytes_read;
            }
            println!(
                "{{\"mode\":\"{mode}\",\"ranks\":{ranks},\"seconds\":{secs},\"bytes\":{bytes}}}"
            );
        }
        "raw" => {
            let threads = num(3, 4);
            let mut files: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
                .expect("dir")
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "distcp"))
                .map(|p| {
                    let n = std::fs::metadata(&p).unwrap().len() as usize;
                    (p, vec![0xa5u8; n])
                })
                .collect();
            let bytes: u64 = files.iter().map(|f| f.1.len() as u64).sum();
            let started = Instant::now();
            let next = std::sync::atomic::AtomicUsize::new(0);
            let cells: Vec<std::sync::Mutex<&mut (std::path::PathBuf, Vec<u8>)>> =
                files.iter_mut().map(std::sync::Mutex::new).collect();
            std::thread::scope(|s| {
                for _ in 0..threads.max(1) {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(c) = cells.get(i) else { break };
                        let mut g = c.lock().unwrap();
                        let (p, buf) = &mut **g;
                        use std::io::Read;
                        std::fs::File::open(&*p).unwrap().read_exact(buf).unwrap();
                    });
                }
            });
            let secs = started.elapsed().as_secs_f64();
            println!("{{\"mode\":\"raw\",\"seconds\":{secs},\"bytes\":{bytes}}}");
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
}

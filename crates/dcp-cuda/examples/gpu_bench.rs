//! Device-to-host staging through dcp against a plain pinned copy of the
//! same bytes, and the way back (run by `cargo xtask gpu-check`).
//!
//! `cargo run --release -p dcp-cuda --example gpu_bench -- [--gib N]
//! [--chunk-mib N] [--threads N] [--probe]`
//!
//! Device tensors of `--gib` GiB in all (default 1), `--chunk-mib` MiB each
//! (default 64), measured three ways, each after a warm-up run:
//! - plain: `cuMemcpyDtoHAsync` of every tensor into one pinned buffer on
//!   one stream (the bandwidth a copy engine gives);
//! - staging: dcp's path, `ChunkSource::stage`/`wait` with `--threads` copy
//!   lanes (default 4), pieces of half the 64 MiB copy-ahead, one piece
//!   ahead, bytes dropped as soon as they are ready (no file write);
//! - save: a whole `save` through `FileSystemWriter` into memory
//!   (`MemoryFs`), `--threads` writer threads (informational: it adds the
//!   host copies of the in-memory store).
//!
//! It prints staging / plain and fails (exit 1) below 0.8. Load direction,
//! informational: `CudaStager::upload` (host to pinned to device, two
//! pieces in flight) and a whole `load_to_device` of the same bytes from
//! memory (`MemoryFs`, no checksums: pinned staging buffers, `--threads`
//! lanes, the 64 MiB copy-ahead), each against a plain pinned
//! `cuMemcpyHtoDAsync` of the same bytes. `--probe` only opens the device
//! and prints its name; no device is exit 2.

use dcp_core::mem::MemoryFs;
use dcp_core::{
    load_to_device, save, ChunkBox, ChunkSink, ChunkSource, DType, DeviceDest, DeviceLoadOptions,
    FileSystem, FileSystemReader, FileSystemWriter, ReaderOptions, Single, StateDict,
    WriterOptions,
};
use dcp_cuda::{CudaStager, StagedCopy};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

const TARGET: f64 = 0.8;
const COPY_AHEAD: usize = 64 << 20;

struct Args {
    gib: f64,
    chunk_mib: usize,
    threads: usize,
    probe: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        gib: 1.0,
        chunk_mib: 64,
        threads: 4,
        probe: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value"))
                .map(|v| v.to_string())
        };
        match x.as_str() {
            "--gib" => a.gib = val("--gib")?.parse().map_err(|e| format!("--gib: {e}"))?,
            "--chunk-mib" => {
                a.chunk_mib = val("--chunk-mib")?
                    .parse()
                    .map_err(|e| format!("--chunk-mib: {e}"))?
            }
            "--threads" => {
                a.threads = val("--threads")?
                    .parse()
                    .map_err(|e| format!("--threads: {e}"))?
            }
            "--probe" => a.probe = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.gib <= 0.0 || a.chunk_mib == 0 || a.threads == 0 {
        return Err("--gib, --chunk-mib and --threads must be positive".into());
    }
    Ok(a)
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() -> ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gpu_bench: {e}");
            return ExitCode::from(2);
        }
    };
    let stager = match CudaStager::new(0) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gpu_bench: NO GPU: cannot open CUDA device 0: {e}");
            return ExitCode::from(2);
        }
    };
    let name = stager.context().name().unwrap_or_else(|_| "?".into());
    println!("gpu_bench: device 0: {name} (dcp-cuda: cudarc 0.19, CUDA 12.8 driver API bindings)");
    if a.probe {
        return ExitCode::SUCCESS;
    }
    match run(&stager, &a) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("gpu_bench: FAILED: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(stager: &Arc<CudaStager>, a: &Args) -> dcp_core::Result<bool> {
    let chunk = a.chunk_mib << 20;
    let n = ((a.gib * (1u64 << 30) as f64) as usize)
        .div_ceil(chunk)
        .max(1);
    let total = (n * chunk) as u64;
    println!(
        "gpu_bench: {n} device tensors of {} MiB ({:.2} GiB), {} copy lanes / writer threads, \
         copy-ahead {} MiB",
        a.chunk_mib,
        total as f64 / (1u64 << 30) as f64,
        a.threads,
        COPY_AHEAD >> 20
    );
    let host: Vec<u8> = (0..chunk).map(|i| (i * 31 % 251) as u8).collect();
    let t = Instant::now();
    let tensors: Vec<_> = (0..n)
        .map(|i| stager.upload(i % a.threads, &host).map(Arc::new))
        .collect::<dcp_core::Result<_>>()?;
    let upload_first = t.elapsed().as_secs_f64();
    let ctx = stager.context().clone();
    let err = |what: &'static str| {
        move |e: cudarc::driver::DriverError| {
            dcp_core::Error::unsupported(format!("{what}: {:?}", e.0))
        }
    };

    // Plain pinned D2H: one stream, one pinned buffer (flags 0).
    let stream = ctx.new_stream().map_err(err("new stream"))?;
    // SAFETY: the buffer is uninitialized until the copies below fill it;
    // nothing reads it (it is only a copy destination, then dropped).
    let mut pinned =
        unsafe { ctx.alloc_pinned_with_flags::<u8>(chunk, 0) }.map_err(err("alloc pinned"))?;
    let mut plain = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        for d in &tensors {
            stream.memcpy_dtoh(&**d, &mut pinned).map_err(err("dtoh"))?;
        }
        stream.synchronize().map_err(err("sync"))?;
        plain = plain.min(t.elapsed().as_secs_f64());
    }

    // dcp staging: lanes, pieces of half the copy-ahead, one piece ahead.
    let sources: Vec<Arc<dyn ChunkSource>> = tensors
        .iter()
        .map(|d| stager.source(d.clone()))
        .collect::<dcp_core::Result<_>>()?;
    let piece = COPY_AHEAD / 2;
    let mut staging = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..a.threads)
                .map(|lane| {
                    let mine: Vec<_> = sources.iter().skip(lane).step_by(a.threads).collect();
                    s.spawn(move || -> dcp_core::Result<u64> {
                        let mut got = 0u64;
                        let mut ahead: Option<Box<dyn StagedCopy>> = None;
                        for src in mine {
                            let len = src.len() as usize;
                            for off in (0..len).step_by(piece) {
                                let next = src.stage(lane, off as u64, piece.min(len - off))?;
                                if let Some(prev) = ahead.replace(next) {
                                    got += prev.wait()?.len() as u64;
                                }
                            }
                        }
                        if let Some(prev) = ahead {
                            got += prev.wait()?.len() as u64;
                        }
                        Ok(got)
                    })
                })
                .collect();
            let mut got = 0;
            for h in handles {
                got += h.join().expect("a staging thread panicked")?;
            }
            assert_eq!(got, total, "staged bytes");
            Ok::<_, dcp_core::Error>(())
        })?;
        staging = staging.min(t.elapsed().as_secs_f64());
    }
    let pinned_allocs = stager.pinned_allocations();

    // A whole save into memory.
    let mut sd = StateDict::new();
    for (i, d) in tensors.iter().enumerate() {
        sd.insert_full_tensor(
            format!("t{i}"),
            DType::U8,
            vec![chunk as u64],
            stager.chunk(d.clone())?,
        )?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| dcp_core::Error::unsupported(format!("tokio: {e}")))?;
    let mut save_secs = f64::INFINITY;
    let mut peak = 0;
    for _ in 0..2 {
        let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://bench"));
        let o = WriterOptions::default()
            .thread_count(a.threads)
            .per_thread_copy_ahead(COPY_AHEAD)
            .sync_files(false);
        let w = FileSystemWriter::new(fs, o)?;
        let t = Instant::now();
        let r = rt.block_on(save(&sd, &w, &Single))?;
        save_secs = save_secs.min(t.elapsed().as_secs_f64());
        peak = r.staged_peak_bytes;
    }

    // Load direction: upload (through pinned pieces) vs plain pinned H2D.
    let t = Instant::now();
    for i in 0..n {
        drop(stager.upload(i % a.threads, &host)?);
    }
    let upload = t.elapsed().as_secs_f64();
    let mut dev = stream.alloc_zeros::<u8>(chunk).map_err(err("alloc"))?;
    let t = Instant::now();
    for _ in 0..n {
        stream.memcpy_htod(&pinned, &mut dev).map_err(err("htod"))?;
    }
    stream.synchronize().map_err(err("sync"))?;
    let plain_up = t.elapsed().as_secs_f64();

    // A whole device load from memory: the host bytes saved without
    // checksums, loaded into fresh device tensors.
    let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://bench-load"));
    let mut hsd = StateDict::new();
    let shared = bytes::Bytes::from(host.clone());
    for i in 0..n {
        hsd.insert_full_tensor(
            format!("t{i}"),
            DType::U8,
            vec![chunk as u64],
            shared.clone(),
        )?;
    }
    let o = WriterOptions::default()
        .extensions(vec![])
        .sync_files(false);
    rt.block_on(save(&hsd, &FileSystemWriter::new(fs.clone(), o)?, &Single))?;
    drop(hsd);
    let mut dest = DeviceDest::new();
    let mut sinks = Vec::new();
    for i in 0..n {
        let mem = stream.alloc_zeros::<u8>(chunk).map_err(err("alloc"))?;
        let sink = stager.sink(mem)?;
        sinks.push(sink.clone());
        dest.insert_tensor(
            format!("t{i}"),
            DType::U8,
            vec![chunk as u64],
            vec![(ChunkBox::full(&[chunk as u64]), sink as Arc<dyn ChunkSink>)],
        )?;
    }
    let reader = FileSystemReader::new(
        fs,
        ReaderOptions::default()
            .thread_count(a.threads)
            .verify_checksums(false),
    );
    let lo = DeviceLoadOptions::default()
        .thread_count(a.threads)
        .per_thread_copy_ahead(COPY_AHEAD);
    let mut load_secs = f64::INFINITY;
    let mut load_peak = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let r = rt.block_on(load_to_device(&dest, &reader, &Single, &lo))?;
        load_secs = load_secs.min(t.elapsed().as_secs_f64());
        load_peak = r.staged_peak_bytes;
    }
    drop(dest);
    let last = Arc::try_unwrap(sinks.pop().expect("n >= 1"))
        .map_err(|_| dcp_core::Error::invalid("a sink is still in use"))?
        .into_slice();
    let back = stream.clone_dtoh(&last).map_err(err("dtoh"))?;
    if back != host {
        return Err(dcp_core::Error::corrupt(
            "load_to_device: the device holds other bytes than were saved",
        ));
    }

    let ratio = plain / staging;
    println!(
        "gpu_bench: plain pinned D2H    {:7.2} GB/s ({:.3} s)",
        gbps(total, plain),
        plain
    );
    println!(
        "gpu_bench: dcp staging D2H     {:7.2} GB/s ({:.3} s), pinned buffers allocated: {pinned_allocs}",
        gbps(total, staging),
        staging
    );
    println!(
        "gpu_bench: dcp save to memory  {:7.2} GB/s ({:.3} s), staged peak {} MiB (bound {} MiB)",
        gbps(total, save_secs),
        save_secs,
        peak >> 20,
        (a.threads * COPY_AHEAD) >> 20
    );
    println!(
        "gpu_bench: plain pinned H2D    {:7.2} GB/s; dcp upload {:7.2} GB/s (first upload {:.2} GB/s)",
        gbps(total, plain_up),
        gbps(total, upload),
        gbps(total, upload_first)
    );
    println!(
        "gpu_bench: dcp load_to_device  {:7.2} GB/s ({:.3} s) = {:.3} of plain pinned H2D, \
         staged peak {} MiB (bound {} MiB)",
        gbps(total, load_secs),
        load_secs,
        plain_up / load_secs,
        load_peak >> 20,
        (a.threads * COPY_AHEAD) >> 20
    );
    let ok = ratio >= TARGET && peak <= (a.threads * COPY_AHEAD) as u64;
    println!(
        "gpu_bench: staging / plain pinned D2H = {ratio:.3} (target >= {TARGET}): {}",
        if ok { "MET" } else { "MISSED" }
    );
    Ok(ok)
}

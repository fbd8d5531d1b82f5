//! Would lending buffers through MPI shared memory pay, against the message
//! exchange a resharded load does over MPI? A measurement, not part of the
//! library.
//!
//! Every process of one machine serves one saved chunk (a band of rows of
//! a bf16 tensor, `MIB` MiB) and needs a band of columns of every chunk:
//! the 4 -> 3 rows-to-columns reshard in miniature. Timed from "the chunk
//! is in memory" to "every destination is filled", slowest process:
//!
//! * **messages** (what dcp does across processes): compact each other
//!   process's columns into one buffer, `MpiGroup::all_to_all_v`, copy what
//!   arrived into the destination;
//! * **window** (the best case for `MPI_Win_allocate_shared` on the node
//!   communicator from `split_shared`): the chunk already sits in the
//!   serving process's window (as if storage were read straight into it),
//!   a fence, every process copies its columns of every chunk straight
//!   from the other processes' windows into its destination, a fence.
//!
//! ```sh
//! cargo build --release -p dcp-mpi --example shm_exchange
//! mpirun -n 3 target/release/examples/shm_exchange 64 9   # MiB per chunk, reps
//! ```
//!
//! rsmpi 0.8 has no window API (neither `MPI_Win_allocate_shared` nor
//! `MPI_Win_shared_query`): the window side calls the C functions through
//! `mpi::ffi`, unsafely. This is the measurement that motivated the
//! library's own window path (`src/window.rs`, used by resharded loads
//! between processes of one node); it stays as the best case to compare
//! against.

use bytes::Bytes;
use dcp_core::Collective;
use dcp_mpi::mpi::ffi;
use dcp_mpi::mpi::raw::AsRaw;
use dcp_mpi::mpi::topology::Communicator;
use dcp_mpi::{Mpi, MpiGroup};
use std::time::{Duration, Instant};

/// Bytes per element (bf16).
const ELEM: usize = 2;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let reps: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(9);
    let mpi = Mpi::init().expect("MPI");
    let world = mpi.world();
    let node = world.split_shared(world.rank());
    let group = MpiGroup::new(&world, Duration::from_secs(120)).expect("group");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (me, n) = (group.rank(), group.world_size());
    assert_eq!(node.size() as usize, n, "run every process on one machine");
    let band = 1024; // columns each process needs of every chunk
    let cols = band * n;
    let rows = (mib << 20) / (cols * ELEM);
    let chunk_len = rows * cols * ELEM;
    let row_len = cols * ELEM;
    let run = band * ELEM;
    let value = |server: usize, i: usize| (server * 131 + i * 7 + i / 4099) as u8;
    let chunk: Vec<u8> = (0..chunk_len).map(|i| value(me, i)).collect();
    // The destination: this process's column band of every chunk.
    let mut dest: Vec<Vec<u8>> = (0..n).map(|_| vec![0xEEu8; rows * run]).collect();
    let check = |dest: &[Vec<u8>]| {
        for (s, d) in dest.iter().enumerate() {
            for r in (0..rows).step_by(97) {
                for c in [0, run - 1] {
                    let i = r * row_len + me * run + c;
                    assert_eq!(d[r * run + c], value(s, i), "server {s} row {r}");
                }
            }
        }
    };

    // Messages, as dcp's shared-read exchange over MPI.
    let mut t_msg = Vec::new();
    for _ in 0..reps {
        for d in &mut dest {
            d.fill(0xEE);
        }
        rt.block_on(group.barrier()).unwrap();
        let t = Instant::now();
        let mut msgs: Vec<Vec<Bytes>> = Vec::with_capacity(n);
        for p in 0..n {
            if p == me {
                for r in 0..rows {
                    let at = r * row_len + me * run;
                    dest[me][r * run..(r + 1) * run].copy_from_slice(&chunk[at..at + run]);
                }
                msgs.push(Vec::new());
                continue;
            }
            let mut c = Vec::with_capacity(rows * run);
            for r in 0..rows {
                let at = r * row_len + p * run;
                c.extend_from_slice(&chunk[at..at + run]);
            }
            msgs.push(vec![Bytes::from_static(&[0]), Bytes::from(c)]);
        }
        let recv = rt.block_on(group.all_to_all_v(msgs)).unwrap();
        for (s, m) in recv.iter().enumerate() {
            if s != me {
                dest[s].copy_from_slice(&m[1]);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        t_msg.push(slowest(&rt, &group, secs));
        check(&dest);
    }

    // Shared memory: one window on the node, `chunk_len` bytes per process.
    let mut base: *mut u8 = std::ptr::null_mut();
    // SAFETY: an MPI window handle is plain data; MPI writes it below.
    let mut win: ffi::MPI_Win = unsafe { std::mem::zeroed() };
    // SAFETY: collective on `node` (every process calls it with its own
    // size); `base` and `win` are valid out-pointers; RSMPI_INFO_NULL is
    // MPI_INFO_NULL. No dcp operation runs meanwhile (no other thread is
    // inside MPI).
    let rc = unsafe {
        ffi::MPI_Win_allocate_shared(
            chunk_len as ffi::MPI_Aint,
            1,
            ffi::RSMPI_INFO_NULL,
            node.as_raw(),
            &mut base as *mut *mut u8 as *mut std::ffi::c_void,
            &mut win,
        )
    };
    assert_eq!(rc, 0, "MPI_Win_allocate_shared");
    let mut peers: Vec<*const u8> = Vec::with_capacity(n);
    for p in 0..n {
        let mut size: ffi::MPI_Aint = 0;
        let mut unit: std::ffi::c_int = 0;
        let mut ptr: *mut u8 = std::ptr::null_mut();
        // SAFETY: `win` is the window allocated above; the out-pointers are
        // valid. (Node ranks equal world ranks: `split_shared` keyed by the
        // world rank, every process on one node, checked above.)
        let rc = unsafe {
            ffi::MPI_Win_shared_query(
                win,
                p as std::ffi::c_int,
                &mut size,
                &mut unit,
                &mut ptr as *mut *mut u8 as *mut std::ffi::c_void,
            )
        };
        assert!(
            rc == 0 && size as usize == chunk_len,
            "MPI_Win_shared_query"
        );
        peers.push(ptr);
    }
    // The chunk lands in this process's window (untimed: storage would be
    // read straight into it).
    // SAFETY: `base` points to this process's `chunk_len` bytes of the
    // window, which nobody else touches before the first fence.
    unsafe { std::slice::from_raw_parts_mut(base, chunk_len) }.copy_from_slice(&chunk);
    drop(chunk);
    let mut t_win = Vec::new();
    for _ in 0..reps {
        for d in &mut dest {
            d.fill(0xEE);
        }
        rt.block_on(group.barrier()).unwrap();
        let t = Instant::now();
        // SAFETY: `win` is valid; a fence orders the writes above before
        // every process's reads below.
        assert_eq!(unsafe { ffi::MPI_Win_fence(0, win) }, 0);
        for (s, &p) in peers.iter().enumerate() {
            // SAFETY: `p` is process `s`'s `chunk_len` bytes of the window,
            // only read between the two fences.
            let src = unsafe { std::slice::from_raw_parts(p, chunk_len) };
            for r in 0..rows {
                let at = r * row_len + me * run;
                dest[s][r * run..(r + 1) * run].copy_from_slice(&src[at..at + run]);
            }
        }
        // SAFETY: as above; after it, the windows may be written again.
        assert_eq!(unsafe { ffi::MPI_Win_fence(0, win) }, 0);
        let secs = t.elapsed().as_secs_f64();
        t_win.push(slowest(&rt, &group, secs));
        check(&dest);
    }
    // SAFETY: collective; nothing uses the window's memory any more.
    assert_eq!(unsafe { ffi::MPI_Win_free(&mut win) }, 0);

    if me == 0 {
        let exchanged = (n - 1) * n * rows * run; // bytes that cross processes
        let (m, w) = (median(&mut t_msg), median(&mut t_win));
        println!(
            "{n} processes, {mib} MiB chunk each, {:.1} MB crossing processes, medians of {reps}:",
            exchanged as f64 / 1e6
        );
        println!(
            "messages {:.4} s ({:.2} GB/s), window {:.4} s ({:.2} GB/s): window saves {:.4} s, {:.0}% of the exchange",
            m,
            exchanged as f64 / m / 1e9,
            w,
            exchanged as f64 / w / 1e9,
            m - w,
            100.0 * (m - w) / m
        );
        println!("messages every rep: {t_msg:.4?}\nwindow every rep:   {t_win:.4?}");
    }
    drop(group);
    drop(node);
    drop(mpi);
}

/// The slowest process's `secs`.
fn slowest(rt: &tokio::runtime::Runtime, g: &MpiGroup, secs: f64) -> f64 {
    let all = rt
        .block_on(g.all_gather(Bytes::copy_from_slice(&secs.to_le_bytes())))
        .unwrap();
    all.iter()
        .map(|b| f64::from_le_bytes(b[..8].try_into().unwrap()))
        .fold(0.0, f64::max)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

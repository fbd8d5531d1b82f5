//! Crash-test child: saves checkpoint generation `G` into `DIR` (over
//! whatever is there) with `world_of(G)` ranks of a `LocalGroup`,
//! `sync_files` on and the test checksum on every record, then exits 0.
//! `tests/crash.rs` kills it with SIGKILL at random moments, or at a chosen
//! step.
//!
//! Usage: `dcp-crash-child DIR G`
//!
//! Every storage operation of the save goes through a
//! `dcp_testkit::StepFs`, which numbers it. With `DCP_CRASH_STEPS` set, each
//! step is written to stderr before and after the call, as
//! `dcp-crash-child: step {seq} {op}:{nth}:{before|after} {file}`. With
//! `DCP_CRASH_PAUSE={op}:{nth}:{before|after}` (e.g. `WriteAtomic:0:after`,
//! `Remove:2:before`), the thread reaching that step writes
//! `dcp-crash-child: paused at step ...` and stops there, so the parent's
//! SIGKILL lands exactly at that step; if nobody kills it within 120 s it
//! exits with status 3. A step never reached changes nothing: the save
//! completes. With `DCP_CRASH_WAIT_STDIN` set, the child builds its state
//! dicts, then waits for a line on stdin before it starts saving.

#[path = "crash_common/mod.rs"]
mod crash_common;

use crash_common::{model, save_gen, world_of};
use dcp_core::FileSystem;
use dcp_testkit::StepFs;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: {} DIR GENERATION", args[0]);
        std::process::exit(2);
    }
    let dir = std::path::PathBuf::from(&args[1]);
    let g: u64 = args[2].parse().expect("generation is a number");
    let world = world_of(g);
    let sds = Arc::new(model(g).state_dicts(world));
    if std::env::var_os("DCP_CRASH_WAIT_STDIN").is_some() {
        // Ready (the state dicts built); start the save when told, so that
        // the parent can time it against another save to the millisecond.
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    let print = std::env::var_os("DCP_CRASH_STEPS").is_some();
    let pause = std::env::var("DCP_CRASH_PAUSE").ok();
    let local: Arc<dyn FileSystem> = Arc::new(dcp_fs::LocalFs::new(dir));
    let fs: Arc<dyn FileSystem> = Arc::new(StepFs::new(local, move |step| {
        let stderr = std::io::stderr();
        if print {
            let _ = writeln!(stderr.lock(), "dcp-crash-child: {step}");
        }
        if pause.as_deref() == Some(step.key().as_str()) {
            let _ = writeln!(stderr.lock(), "dcp-crash-child: paused at {step}");
            let _ = stderr.lock().flush();
            // Wait for the parent's SIGKILL; a deadline, not a delay: the
            // child must not outlive a parent that died.
            let until = Instant::now() + Duration::from_secs(120);
            while Instant::now() < until {
                std::thread::park_timeout(until - Instant::now());
            }
            let _ = writeln!(stderr.lock(), "dcp-crash-child: not killed within 120 s");
            std::process::exit(3);
        }
    }));
    for (rank, r) in save_gen(fs, sds, g).into_iter().enumerate() {
        if let Err(e) = r {
            eprintln!("rank {rank}: save of generation {g} failed: {e}");
            std::process::exit(1);
        }
    }
}

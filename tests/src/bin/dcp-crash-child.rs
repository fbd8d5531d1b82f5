//! Crash-test child: saves checkpoint generation `G` into `DIR` (over
//! whatever is there) with `world_of(G)` ranks of a `LocalGroup`,
//! `sync_files` on and the test checksum on every record, then exits 0.
//! `tests/crash.rs` kills it with SIGKILL at random moments.
//!
//! Usage: `dcp-crash-child DIR G`

#[path = "crash_common/mod.rs"]
mod crash_common;

use crash_common::{model, save_gen, world_of};
use dcp_core::FileSystem;
use std::sync::Arc;

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
    let fs: Arc<dyn FileSystem> = Arc::new(dcp_fs::LocalFs::new(dir));
    for (rank, r) in save_gen(fs, sds, g).into_iter().enumerate() {
        if let Err(e) = r {
            eprintln!("rank {rank}: save of generation {g} failed: {e}");
            std::process::exit(1);
        }
    }
}

//! Crash-test child: saves checkpoint generation `G` into `DIR` (over
//! whatever is there) with `world_of(G)` ranks of a `LocalGroup`,
//! `sync_files` on and the test checksum on every record, then exits 0.
//! `tests/crash.rs` kills it with SIGKILL at random moments.
//!
//! Usage: `dcp-crash-child DIR G`

#[path = "crash_common/mod.rs"]
mod crash_common;

use crash_common::{model, world_of, TestCrc, GEN_KEY};
use dcp_core::local::run_ranks;
use dcp_core::{save_with, Collective, SaveOptions, WriterOptions};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

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
    let writer = Arc::new(
        dcp_fs::writer(
            &dir,
            WriterOptions {
                sync_files: true,
                thread_count: 2,
                extensions: vec![Arc::new(TestCrc)],
                ..Default::default()
            },
        )
        .expect("writer"),
    );
    let options = Arc::new(SaveOptions {
        user_metadata: BTreeMap::from([(GEN_KEY.to_string(), g.to_string())]),
        ..Default::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let results = rt.block_on(run_ranks(world, Duration::from_secs(60), move |grp| {
        let (sds, writer, options) = (sds.clone(), writer.clone(), options.clone());
        async move {
            let rank = grp.rank();
            save_with(&sds[rank], writer.as_ref(), &grp, &options).await
        }
    }));
    for (rank, r) in results.into_iter().enumerate() {
        if let Err(e) = r {
            eprintln!("rank {rank}: save of generation {g} failed: {e}");
            std::process::exit(1);
        }
    }
}

//! Plan caching across saves (`SavePlanCache`): a save with the layout of
//! the last one reuses its plan and metadata skeleton and commits the same
//! metadata an uncached save of the same state commits; any change of
//! layout (a shape, a new key, another sharding, another world size) is
//! detected and re-planned; replicated copies are still compared.

use dcp_core::{
    DType, ErrorKind, FileSystem, Metadata, PlanCacheStats, ReaderOptions, SaveOptions,
    SavePlanCache, SaveResult, StateDict,
};
use dcp_tests::*;
use std::sync::Arc;

const WORLD: usize = 4;

fn model(seed: u64) -> Model {
    Model {
        seed,
        ..Default::default()
    }
    .tensor("w", DType::F32, &[30, 8], Sharding::Rows)
    .tensor("g", DType::BF16, &[12, 12], Sharding::Grid)
    .tensor("r", DType::I32, &[7], Sharding::Replicated)
    .tensor("b", DType::U8, &[40, 3], Sharding::Blocks(2))
    .bytes("step", 8, false)
    .bytes("rng", 16, true)
}

/// Save `sds` from `sds.len()` ranks into `fs`, with `cache` (or none).
async fn save_all(
    fs: Arc<dyn FileSystem>,
    sds: Vec<StateDict>,
    cache: Option<SavePlanCache>,
) -> Vec<dcp_core::Result<SaveResult>> {
    let options = SaveOptions::default().plan_cache(cache);
    let opts = fast_writer().thread_count(2);
    save_ranks_options(fs, opts, sds, options, std::time::Duration::from_secs(60)).await
}

/// The committed metadata, the same on every rank.
fn committed(results: Vec<dcp_core::Result<SaveResult>>) -> Metadata {
    let out = all_ok(results, "save");
    for r in &out[1..] {
        assert_eq!(*r.metadata, *out[0].metadata);
    }
    (*out[0].metadata).clone()
}

/// `md` without what differs between any two saves of the same state: the
/// save id (also in data file names) and the generation.
fn normalized(md: &Metadata) -> Metadata {
    let mut m = md.clone();
    for f in &mut m.files {
        f.name = f.name.replace(&md.save_id, "ID");
    }
    m.save_id = String::new();
    m.generation = 0;
    m
}

/// What an uncached save of `sds` into a fresh location commits.
async fn reference(sds: Vec<StateDict>) -> Metadata {
    let store = Backend::Memory.make_fs("plan-cache-ref");
    committed(save_all(store.fs(), sds, None).await)
}

fn stats(planned: u64, cached: u64) -> PlanCacheStats {
    PlanCacheStats { planned, cached }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_saves_commit_what_uncached_saves_commit_and_load_back() {
    let cache = SavePlanCache::new();
    let cached = Backend::Memory.make_fs("plan-cache-a");
    let plain = Backend::Memory.make_fs("plan-cache-b");
    for step in 1..=3u64 {
        // New data every step (replicated items included), same layout.
        let m = model(step);
        let a = committed(save_all(cached.fs(), m.state_dicts(WORLD), Some(cache.clone())).await);
        let b = committed(save_all(plain.fs(), m.state_dicts(WORLD), None).await);
        assert_eq!(cache.stats(), stats(1, step - 1), "after save {step}");
        assert_eq!(a.generation, step);
        assert_eq!(normalized(&a), normalized(&b), "save {step}");
        // The checkpoint on storage is the one returned.
        assert_eq!(cached.metadata(), a);
        load_and_check(
            cached.fs(),
            &m,
            WORLD,
            3,
            ReaderOptions::default(),
            &other_sharding(&m, 1),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_layout_is_detected_and_replanned() {
    let cache = SavePlanCache::new();
    let store = Backend::Memory.make_fs("plan-cache-layout");
    let base = model(1);
    let shape = base
        .clone()
        .tensor("extra", DType::F16, &[9, 2], Sharding::Rows)
        .reseeded(2);
    let mut reshaped = base.clone();
    reshaped.tensors[0] = (
        TensorSpec::new("w", DType::F32, &[32, 8], reshaped.seed),
        Sharding::Rows,
    );
    let mut resharded = base.reseeded(3);
    resharded.tensors[0].1 = Sharding::Cols;
    let mut retyped = base.reseeded(4);
    retyped.tensors[1].0 = TensorSpec::new("g", DType::F16, &[12, 12], retyped.seed);
    // (model, world, whether the save reuses the last plan)
    let steps: Vec<(&str, Model, usize, bool)> = vec![
        ("first", base.clone(), WORLD, false),
        ("unchanged", base.reseeded(5), WORLD, true),
        ("new key", shape.clone(), WORLD, false),
        ("unchanged", shape.reseeded(6), WORLD, true),
        ("shape", reshaped.clone(), WORLD, false),
        ("sharding", resharded.clone(), WORLD, false),
        ("dtype", retyped.clone(), WORLD, false),
        ("world size", retyped.clone(), 3, false),
        ("unchanged", retyped.reseeded(7), 3, true),
        ("back to the first", base.clone(), WORLD, false),
    ];
    let mut want = PlanCacheStats::default();
    for (what, m, world, reuse) in steps {
        let md = committed(save_all(store.fs(), m.state_dicts(world), Some(cache.clone())).await);
        if reuse {
            want.cached += 1;
        } else {
            want.planned += 1;
        }
        assert_eq!(cache.stats(), want, "{what}");
        assert_eq!(
            normalized(&md),
            normalized(&reference(m.state_dicts(world)).await),
            "{what}"
        );
        load_and_check(
            store.fs(),
            &m,
            world,
            2,
            ReaderOptions::default(),
            &other_sharding(&m, 0),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_compared_on_cached_saves_and_a_failure_replans() {
    let cache = SavePlanCache::new();
    let store = Backend::Memory.make_fs("plan-cache-replicas");
    let m = model(1);
    committed(save_all(store.fs(), m.state_dicts(WORLD), Some(cache.clone())).await);
    // Rank 2's copy of the replicated `step` differs: same layout, so the
    // offers are digests, and the checksums sent with them disagree.
    let mut sds = m.state_dicts(WORLD);
    let mut without_step = m.clone();
    without_step.bytes.retain(|b| b.name != "step");
    sds[2] = without_step.state_dict(2, WORLD);
    sds[2].insert_bytes("step", vec![0xee; 8], true).unwrap();
    let errs = all_err(
        save_all(store.fs(), sds, Some(cache.clone())).await,
        "save with differing replicas",
    );
    for e in &errs {
        assert_error(
            e,
            ErrorKind::Plan,
            &["step: replicated copies differ between rank 0 and rank 2"],
        );
    }
    assert_eq!(cache.stats(), stats(1, 0));
    // The failed save left the coordinator without an entry: the next save
    // of the same layout plans again, then caches.
    let m2 = model(2);
    let md = committed(save_all(store.fs(), m2.state_dicts(WORLD), Some(cache.clone())).await);
    assert_eq!(cache.stats(), stats(2, 0));
    assert_eq!(
        normalized(&md),
        normalized(&reference(m2.state_dicts(WORLD)).await)
    );
    committed(save_all(store.fs(), m.state_dicts(WORLD), Some(cache.clone())).await);
    assert_eq!(cache.stats(), stats(2, 1));
    load_and_check(
        store.fs(),
        &m,
        WORLD,
        WORLD,
        ReaderOptions::default(),
        &other_sharding(&m, 2),
    )
    .await;
}

//! Property test: random shapes (1 to 3 dimensions, zero sizes included),
//! dtypes, save and load shardings, world sizes 1 to 5, formats and writer
//! options; every loaded byte equals the reference. Bounded to a few dozen
//! cases so it stays fast (64 on local backends, 16 on S3).

use dcp_core::metadata::FormatKind;
use dcp_core::{DType, ReaderOptions};
use dcp_tests::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    shape: Vec<u64>,
    dtype: DType,
    save: Sharding,
    load: Sharding,
    save_world: usize,
    load_world: usize,
    format: FormatKind,
    threads: usize,
    single_file_per_rank: bool,
    seed: u64,
}

fn sharding() -> impl Strategy<Value = Sharding> {
    prop_oneof![
        Just(Sharding::Full),
        Just(Sharding::Replicated),
        Just(Sharding::Rows),
        Just(Sharding::Cols),
        Just(Sharding::Grid),
        Just(Sharding::Uneven),
        (1u64..=3).prop_map(Sharding::Blocks),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(prop_oneof![1 => Just(0u64), 9 => 1u64..12], 1..=3),
        0..DType::ALL.len(),
        sharding(),
        sharding(),
        1usize..=5,
        1usize..=5,
        any::<bool>(),
        1usize..=3,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(shape, d, save, load, save_world, load_world, st, threads, single, seed)| Case {
                shape,
                dtype: DType::ALL[d],
                save,
                load,
                save_world,
                load_world,
                format: if st {
                    FormatKind::Safetensors
                } else {
                    FormatKind::Raw
                },
                threads,
                single_file_per_rank: single,
                seed,
            },
        )
}

async fn run(c: &Case, backend: Backend) {
    let m = Model {
        seed: c.seed,
        ..Default::default()
    }
    .tensor("t", c.dtype, &c.shape, c.save)
    // A second tensor with the same shape, sharded the other way round.
    .tensor("u", DType::U8, &c.shape, c.load)
    .bytes("b", (c.seed % 50) as usize, false);
    let store = backend.make_fs("prop");
    let opts = fast_writer()
        .serialization_format(dcp_core::format::builtin(&c.format).expect("dcp's own format"))
        .thread_count(c.threads)
        .single_file_per_rank(c.single_file_per_rank);
    save_model(store.fs(), &m, c.save_world, opts).await;
    // Half the cases read every record directly or scattered, however
    // small (one copy); the others coalesce small records into spans.
    let ropts = ReaderOptions::default()
        .thread_count(c.threads)
        .small_record(if c.seed.is_multiple_of(2) {
            0
        } else {
            ReaderOptions::default().small_record
        });
    let (load, save) = (c.load, c.save);
    load_and_check(
        store.fs(),
        &m,
        c.save_world,
        c.load_world,
        ropts,
        &move |spec| {
            if spec.name == "t" {
                load
            } else {
                save
            }
        },
    )
    .await;
}

/// A fresh runtime per case (proptest bodies are synchronous).
fn run_on(c: &Case, backends: &[Backend]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for &backend in backends {
        rt.block_on(run(c, backend));
    }
}

fn local_backends() -> Vec<Backend> {
    backends().into_iter().filter(|b| !b.is_remote()).collect()
}

fn remote_backends() -> Vec<Backend> {
    backends().into_iter().filter(|b| b.is_remote()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_reshards_match_the_reference(c in case()) {
        run_on(&c, &local_backends());
    }
}

proptest! {
    // Fewer cases on S3: each is a few dozen requests to moto, which is slow
    // per request.
    #![proptest_config(ProptestConfig {
        cases: 16,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_reshards_match_the_reference_on_s3(c in case()) {
        let remote = remote_backends();
        if !remote.is_empty() {
            run_on(&c, &remote);
        }
    }
}

//! Save planners beside the default one: ranks write their assignment as
//! sent when the planner does not keep the offered order
//! (`SavePlanner::assigns_offered_order` false), and "write what you
//! offered" is only taken for assignments that are the whole offer.

use dcp_core::plan::{DefaultSavePlanner, SavePlan, SavePlanner};
use dcp_core::{DType, FileSystem, Metadata, ReaderOptions, SaveOptions, SaveResult, StateDict};
use dcp_tests::*;
use std::sync::Arc;

const WORLD: usize = 4;

fn model() -> Model {
    Model {
        seed: 11,
        ..Default::default()
    }
    .tensor("w", DType::F32, &[30, 8], Sharding::Rows)
    .tensor("g", DType::BF16, &[12, 12], Sharding::Grid)
    .tensor("r", DType::I32, &[7], Sharding::Replicated)
    .bytes("step", 8, false)
    .bytes("rng", 16, true)
}

/// The default planner's decisions, each assignment in reverse order.
#[derive(Debug)]
struct Reversed(DefaultSavePlanner);

impl SavePlanner for Reversed {
    fn local_plan(&self, sd: &StateDict, rank: usize) -> dcp_core::Result<SavePlan> {
        self.0.local_plan(sd, rank)
    }

    fn global_plan(&self, plans: &[SavePlan]) -> dcp_core::Result<Vec<SavePlan>> {
        let mut g = self.0.global_plan(plans)?;
        for p in &mut g {
            p.items.reverse();
        }
        Ok(g)
    }
}

async fn save_all(
    fs: Arc<dyn FileSystem>,
    sds: Vec<StateDict>,
    planner: Arc<dyn SavePlanner>,
) -> Vec<dcp_core::Result<SaveResult>> {
    let options = SaveOptions::default().planner(planner);
    let opts = fast_writer().thread_count(1);
    save_ranks_options(fs, opts, sds, options, std::time::Duration::from_secs(60)).await
}

/// Every record of `md` as (item, chunk offsets, file index, offset).
fn placements(md: &Metadata) -> Vec<(String, Vec<u64>, u32, u64)> {
    let mut out = Vec::new();
    for (name, item) in &md.items {
        match item {
            dcp_core::metadata::ItemMeta::Tensor { chunks, .. } => {
                for c in chunks {
                    out.push((
                        name.clone(),
                        c.region.offsets.to_vec(),
                        c.storage.file,
                        c.storage.offset,
                    ));
                }
            }
            dcp_core::metadata::ItemMeta::Bytes { storage, .. } => {
                out.push((name.clone(), vec![], storage.file, storage.offset))
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_in_another_order_is_written_as_sent() {
    let m = model();
    let plain = Backend::Memory.make_fs("planners-default");
    let reversed = Backend::Memory.make_fs("planners-reversed");
    let a = all_ok(
        save_all(
            plain.fs(),
            m.state_dicts(WORLD),
            Arc::new(DefaultSavePlanner::default()),
        )
        .await,
        "default save",
    );
    let b = all_ok(
        save_all(
            reversed.fs(),
            m.state_dicts(WORLD),
            Arc::new(Reversed(DefaultSavePlanner::default())),
        )
        .await,
        "reversed save",
    );
    let (a, b) = (&a[0].metadata, &b[0].metadata);
    // The same records, each rank's written in the other order: a file
    // holding two or more records has them at other offsets.
    let key = |p: &(String, Vec<u64>, u32, u64)| (p.0.clone(), p.1.clone());
    let (pa, pb) = (placements(a), placements(b));
    assert_eq!(
        pa.iter().map(key).collect::<Vec<_>>(),
        pb.iter().map(key).collect::<Vec<_>>()
    );
    assert_ne!(pa, pb, "the reversed assignment was not written as sent");
    // Both load back bit-exact, resharded.
    for store in [&plain, &reversed] {
        load_and_check(
            store.fs(),
            &m,
            WORLD,
            3,
            ReaderOptions::default(),
            &other_sharding(&m, 1),
        )
        .await;
    }
}

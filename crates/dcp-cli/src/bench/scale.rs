//! `dcp bench --workload scale`: the save and load protocols at R simulated
//! ranks of C chunks each (an FSDP-like model: C tensors, each split by
//! rows across all ranks, 4-byte payloads so that the protocol, not the
//! disk, is measured). The coordinator does exactly the work of a real save
//! ([`dcp_core::checkpoint::simulate`]); ranks are played in turn by one
//! driver, and each rank phase reports its slowest rank.

use super::{sys, BenchArgs};
use crate::CliError;
use dcp_core::checkpoint::simulate::simulate_protocol_with;
use dcp_core::{ChunkBox, DType, DestStateDict, StateDict, TensorChunk};
use serde::Serialize;
use std::process::ExitCode;

/// The one JSON line of `dcp bench --workload scale --json`.
#[derive(Debug, Serialize)]
pub struct ScaleRecord {
    /// `scale`.
    pub workload: &'static str,
    /// Simulated ranks.
    pub ranks: usize,
    /// Chunks in the checkpoint (ranks x chunks per rank).
    pub chunks: u64,
    /// The save protocol through the encoded metadata: the slowest rank's
    /// planning and reporting plus the coordinator's work.
    pub save_plan_seconds: f64,
    /// The slowest rank's local plan and its encoding.
    pub rank_plan_seconds: f64,
    /// The coordinator: decode every plan, plan globally, encode the
    /// assignments.
    pub coordinator_plan_seconds: f64,
    /// The slowest rank's assignment decode and write-result encode.
    pub rank_results_seconds: f64,
    /// The coordinator: decode every write result, build and encode the
    /// metadata.
    pub coordinator_metadata_seconds: f64,
    /// A second save of the same layout with the plan cached: the
    /// coordinator's planning (decode and confirm every rank's digest,
    /// encode the assignments).
    pub cached_save_plan_seconds: f64,
    /// The cached save's slowest rank: local plan, digest, offer.
    pub cached_rank_plan_seconds: f64,
    /// The cached save's coordinator metadata: decode the compact write
    /// results, fill the cached skeleton, encode it.
    pub cached_coordinator_metadata_seconds: f64,
    /// The cached save's collective bytes: digests gathered, assignments
    /// scattered, compact write results gathered.
    pub cached_plan_gather_bytes: u64,
    /// See `cached_plan_gather_bytes`.
    pub cached_scatter_bytes: u64,
    /// See `cached_plan_gather_bytes`.
    pub cached_result_gather_bytes: u64,
    /// One rank's load planning: decode the metadata it receives (of
    /// sectioned metadata, the index and its sections), plan its reads.
    pub load_plan_seconds: f64,
    /// Bytes of `.metadata`.
    pub metadata_bytes: u64,
    /// `metadata_bytes / chunks`.
    pub metadata_bytes_per_chunk: f64,
    /// The metadata bytes the measured loading rank (rank 0 of as many
    /// loading ranks, its row of every tensor) receives: of sectioned
    /// metadata the header and index (broadcast) and the sections its
    /// destination overlaps (read by ranges); of one body, all of it. Every
    /// rank's destination is alike here, so this is the most.
    pub max_rank_metadata_bytes_received: u64,
    /// Bytes through the collectives: the plan gather, the scatter of
    /// assignments, the write-result gather.
    pub plan_gather_bytes: u64,
    /// See `plan_gather_bytes`.
    pub scatter_bytes: u64,
    /// See `plan_gather_bytes`.
    pub result_gather_bytes: u64,
    /// The process's peak resident set (VmHWM), bytes.
    pub peak_rss: u64,
}

/// Payload bytes per chunk.
const CHUNK_BYTES: u64 = 4;

/// Tensor `t`'s name: 10 tensors per layer, FSDP-like.
fn tensor_name(t: usize) -> String {
    const KINDS: [&str; 10] = [
        "attn.q.weight",
        "attn.k.weight",
        "attn.v.weight",
        "attn.o.weight",
        "mlp.up.weight",
        "mlp.gate.weight",
        "mlp.down.weight",
        "norm1.weight",
        "norm2.weight",
        "mlp.bias",
    ];
    format!(
        "model.layers.{}.{}",
        t / KINDS.len(),
        KINDS[t % KINDS.len()]
    )
}

/// Rank `rank`'s state dict: row `rank` of each of `tensors` tensors of
/// shape [ranks, 4] u8.
fn state_dict(rank: usize, ranks: usize, tensors: usize) -> dcp_core::Result<StateDict> {
    let mut sd = StateDict::new();
    for t in 0..tensors {
        let region = ChunkBox::new(vec![rank as u64, 0], vec![1, CHUNK_BYTES])?;
        sd.insert_tensor(
            tensor_name(t),
            DType::U8,
            vec![ranks as u64, CHUNK_BYTES],
            vec![TensorChunk::new(
                region,
                vec![(rank % 251) as u8; CHUNK_BYTES as usize],
            )],
            false,
        )?;
    }
    Ok(sd)
}

/// Run the scale workload and print its record.
pub fn run(args: &BenchArgs) -> Result<ExitCode, CliError> {
    let ranks = args.ranks.unwrap_or(1024) as usize;
    let tensors = args.chunks_per_rank as usize;
    sys::reset_peak_rss();
    let cost = simulate_protocol_with(
        ranks,
        |r| state_dict(r, ranks, tensors),
        |_| {
            // Rank 0 of as many loading ranks: its row of every tensor.
            let mut d = DestStateDict::new();
            for t in 0..tensors {
                d.want_tensor(
                    tensor_name(t),
                    DType::U8,
                    vec![ranks as u64, CHUNK_BYTES],
                    vec![ChunkBox::new(vec![0, 0], vec![1, CHUNK_BYTES])?],
                )?;
            }
            Ok(d)
        },
        true,
    )?;
    let rec = ScaleRecord {
        workload: "scale",
        ranks,
        chunks: cost.chunks,
        save_plan_seconds: cost.save_plan().as_secs_f64(),
        rank_plan_seconds: cost.rank_plan.as_secs_f64(),
        coordinator_plan_seconds: cost.coordinator_plan.as_secs_f64(),
        rank_results_seconds: cost.rank_results.as_secs_f64(),
        coordinator_metadata_seconds: cost.coordinator_metadata.as_secs_f64(),
        cached_save_plan_seconds: cost.cached_save_plan().as_secs_f64(),
        cached_rank_plan_seconds: cost.cached_rank_plan.as_secs_f64(),
        cached_coordinator_metadata_seconds: cost.cached_coordinator_metadata.as_secs_f64(),
        cached_plan_gather_bytes: cost.cached_plan_gather_bytes,
        cached_scatter_bytes: cost.cached_scatter_bytes,
        cached_result_gather_bytes: cost.cached_result_gather_bytes,
        load_plan_seconds: cost.load_plan.as_secs_f64(),
        metadata_bytes: cost.metadata_bytes,
        metadata_bytes_per_chunk: cost.metadata_bytes as f64 / cost.chunks.max(1) as f64,
        max_rank_metadata_bytes_received: cost.metadata_bytes_per_rank,
        plan_gather_bytes: cost.plan_gather_bytes,
        scatter_bytes: cost.scatter_bytes,
        result_gather_bytes: cost.result_gather_bytes,
        peak_rss: sys::status_bytes("VmHWM").unwrap_or(0),
    };
    if args.json {
        let line = serde_json::to_string(&rec)
            .map_err(|e| CliError::msg(format!("cannot encode the record: {e}")))?;
        crate::emit(&format!("{line}\n"))?;
    } else {
        crate::emit(&format!(
            "scale: {} ranks x {} chunks = {} chunks\n  save protocol {:.3} s (rank plan {:.3}, coordinator plan {:.3}, rank results {:.3}, coordinator metadata {:.3})\n  cached save: coordinator plan {:.3} s, metadata {:.3} s; rank plan {:.3} s; collectives {} / {} / {} B\n  load planning {:.3} s\n  metadata {} bytes ({:.1} B/chunk), each loading rank receives {}\n  collectives: gather {} B, scatter {} B, gather {} B; peak RSS {} B\n",
            rec.ranks,
            tensors,
            rec.chunks,
            rec.save_plan_seconds,
            rec.rank_plan_seconds,
            rec.coordinator_plan_seconds,
            rec.rank_results_seconds,
            rec.coordinator_metadata_seconds,
            rec.cached_save_plan_seconds,
            rec.cached_coordinator_metadata_seconds,
            rec.cached_rank_plan_seconds,
            rec.cached_plan_gather_bytes,
            rec.cached_scatter_bytes,
            rec.cached_result_gather_bytes,
            rec.load_plan_seconds,
            rec.metadata_bytes,
            rec.metadata_bytes_per_chunk,
            rec.max_rank_metadata_bytes_received,
            rec.plan_gather_bytes,
            rec.scatter_bytes,
            rec.result_gather_bytes,
            rec.peak_rss
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

//! `dcp convert SRC --to-dcp OUT [--ranks N]`: write a checkpoint out as a
//! dcp checkpoint; `dcp convert SRC --to-safetensors OUT [--max-shard-size
//! 5GB] [--keys GLOB]... [--rename FROM=TO]...`: as Hugging Face safetensors
//! ([`dcp::hf::export_safetensors`]). SRC is anything `dcp::reader` reads: a dcp checkpoint, or
//! one written by `torch.distributed.checkpoint` (its non-tensor values
//! become bytes items holding JSON). N simulated ranks (default 1) each load
//! their row shard (`Shard(0)`, torch's split) of every tensor, and save it:
//! the output holds every tensor split by rows into N records, under the
//! same flattened names (`model.layers.0.attn.q.weight`, `optim.hist.0`).

use crate::{human_bytes, location::open_location, CliError};
use bytes::Bytes;
use clap::Args;
use dcp_core::local::run_ranks;
use dcp_core::metadata::ItemMeta;
use dcp_core::placement::{DeviceMesh, Placement};
use dcp_core::{
    ChunkBox, Collective, DestItem, DestStateDict, Error, FileSystemReader, FileSystemWriter,
    StateDict, TensorChunk, WriterOptions,
};
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `dcp convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The checkpoint to convert: a path or a URL.
    pub src: String,
    /// Write it as a dcp checkpoint at this location (a path or a URL).
    #[arg(
        long = "to-dcp",
        value_name = "OUT",
        required_unless_present = "to_safetensors",
        conflicts_with = "to_safetensors"
    )]
    pub to_dcp: Option<String>,
    /// Ranks to write it as: each tensor is split over them (see --shard).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub ranks: u32,
    /// With --to-dcp from Hugging Face safetensors: split each tensor by
    /// rows (torch's Shard(0)) or columns (Shard(1)).
    #[arg(long, default_value = "row", value_parser = ["row", "col"])]
    pub shard: String,
    /// Write its tensors as Hugging Face safetensors: a path or URL
    /// (`s3://`, `gs://`, `azblob://`) ending in `.safetensors` (one file),
    /// or a directory (prefix) that receives `model.safetensors`, or shards
    /// and `model.safetensors.index.json`.
    #[arg(long = "to-safetensors", value_name = "OUT")]
    pub to_safetensors: Option<std::path::PathBuf>,
    /// With --to-safetensors: the largest shard (`5GB`, `500MB`, `10KiB`,
    /// bytes).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
    /// With --to-safetensors: only the tensors whose names match this glob
    /// (repeatable).
    #[arg(long = "keys", value_name = "GLOB")]
    pub keys: Vec<String>,
    /// With --to-safetensors: rename names starting with FROM to start with
    /// TO (repeatable; the first that matches applies).
    #[arg(long = "rename", value_name = "FROM=TO", value_parser = parse_rename)]
    pub renames: Vec<(String, String)>,
    /// With --to-safetensors: check every record's checksum while
    /// exporting (memory then grows to the largest record; `dcp verify`
    /// checks them in a separate pass).
    #[arg(long)]
    pub verify: bool,
}

/// `5GB`, `500MB`, `10KiB`, `1024`: bytes (SI and binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 5GB, 500MB)"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (B, KB, MB, GB, TB, KiB, MiB, GiB)"
            ))
        }
    };
    let v = n * mult;
    if !(v.is_finite() && v >= 1.0) {
        return Err(format!("{s:?} is not a positive size"));
    }
    Ok(v as u64)
}

/// `FROM=TO`.
fn parse_rename(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .filter(|(a, _)| !a.is_empty())
        .ok_or_else(|| format!("{s:?} is not FROM=TO"))
}

/// Whether `src` is Hugging Face safetensors: a `.safetensors` file, or a
/// directory without `.metadata` that holds `model.safetensors` or an index.
fn is_safetensors(src: &str) -> bool {
    let p = std::path::Path::new(src);
    if p.is_file() {
        return p.extension().is_some_and(|e| e == "safetensors");
    }
    p.is_dir()
        && !p.join(".metadata").exists()
        && (p.join("model.safetensors.index.json").exists() || p.join("model.safetensors").exists())
}

/// Hugging Face safetensors in an object store: `URL/NAME.safetensors` (the
/// store at URL and the file NAME), or a URL holding
/// `model.safetensors.index.json` or `model.safetensors` and no `.metadata`
/// (the store, no name). `None` for local paths and for anything else.
fn safetensors_in_store(src: &str) -> Result<Option<StoreSrc>, CliError> {
    let Ok(loc) = dcp::Location::parse(src) else {
        return Ok(None);
    };
    if matches!(loc.backend(), dcp::Backend::Local) {
        return Ok(None);
    }
    let trimmed = src.trim_end_matches('/');
    if let Some((dir, name)) = trimmed.rsplit_once('/') {
        if name.ends_with(".safetensors") && !dir.ends_with('/') && !dir.ends_with(':') {
            return Ok(Some((open_location(dir)?, Some(name.to_string()))));
        }
    }
    let fs = open_location(src)?;
    let has = |n: &str| fs.file_len(n).map(|l| l.is_some());
    let hf =
        !has(".metadata")? && (has("model.safetensors.index.json")? || has("model.safetensors")?);
    Ok(hf.then_some((fs, None)))
}

/// Safetensors in a store: the store, and the file name (or `None`: the
/// location is the directory).
type StoreSrc = (Arc<dyn dcp_core::FileSystem>, Option<String>);

/// `--to-dcp` from Hugging Face safetensors: a local file or directory, or
/// in `store` ([`safetensors_in_store`]).
fn from_safetensors(
    args: &ConvertArgs,
    to_dcp: &str,
    store: Option<StoreSrc>,
) -> Result<ExitCode, CliError> {
    let src = std::path::Path::new(&args.src);
    let failed = |e: Error| {
        CliError::failed(
            format!(
                "cannot convert {} to a dcp checkpoint at {to_dcp}",
                src.display()
            ),
            &e,
        )
    };
    let tensors = match &store {
        Some((fs, name)) => dcp::hf_import::read_safetensors_in(fs, name.as_deref()),
        None => dcp::hf_import::read_safetensors(src),
    }
    .map_err(failed)?;
    let out = open_location(to_dcp)?;
    let total: u64 = tensors
        .iter()
        .map(|t| t.shape.iter().product::<u64>() * t.dtype.size() as u64)
        .sum();
    tracing::info!(
        tensors = tensors.len(),
        bytes = total,
        ranks = args.ranks,
        "importing safetensors"
    );
    let bar = crate::progress::bar(total, "importing");
    // Four writer threads per rank: each reads its records' ranges from
    // the safetensors files and checksums them while the others write.
    let writer: Arc<dyn dcp_core::StorageWriter> = Arc::new(
        FileSystemWriter::new(
            crate::progress::Metered::wrap(out.clone(), &bar),
            WriterOptions::default().overwrite(false).thread_count(4),
        )
        .map_err(failed)?,
    );
    let shard = if args.shard == "col" {
        dcp::hf_import::ImportShard::Cols
    } else {
        dcp::hf_import::ImportShard::Rows
    };
    let n = tensors.len();
    let rt = crate::runtime()?;
    let started = Instant::now();
    let md = rt.block_on(dcp::hf_import::import_safetensors(
        tensors,
        writer,
        args.ranks as usize,
        shard,
    ));
    bar.finish_and_clear();
    let md = md.map_err(failed)?;
    crate::emit(&format!(
        "ok: {} ({n} tensors, {}) -> {}: dcp checkpoint of {} ranks split by {}s, save {}, in {:.2} s\n",
        src.display(),
        human_bytes(md.logical_bytes()),
        out.location(),
        args.ranks,
        args.shard,
        md.save_id,
        started.elapsed().as_secs_f64()
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `--to-safetensors`.
fn to_safetensors(args: &ConvertArgs, out: &std::path::Path) -> Result<ExitCode, CliError> {
    let src = open_location(&args.src)?;
    let reader = FileSystemReader::new(src.clone(), crate::reader_options());
    let started = Instant::now();
    tracing::info!(src = %src.location(), out = %out.display(), "exporting safetensors");
    let bar = crate::progress::bar(0, "exporting");
    let on_bar = bar.clone();
    let options = dcp::hf::ExportOptions::default()
        .max_shard_size(args.max_shard_size)
        .keys(args.keys.clone())
        .renames(args.renames.clone())
        .verify_checksums(args.verify)
        .on_progress(move |n, total| {
            on_bar.set_length(total);
            on_bar.inc(n);
        });
    // A path or a URL (S3 settings from the `AWS_*` environment, as every
    // location of this command).
    let report = match out.to_str() {
        Some(url) => dcp::hf::export_safetensors_at(&reader, url, &HashMap::new(), &options),
        None => dcp::hf::export_safetensors(&reader, out, &options),
    };
    bar.finish_and_clear();
    let report = report.map_err(|e| {
        CliError::failed(
            format!(
                "cannot convert {} to safetensors at {}",
                src.location(),
                out.display()
            ),
            &e,
        )
    })?;
    if !report.skipped_bytes_items.is_empty() {
        eprintln!(
            "note: {} bytes items not written (safetensors holds tensors only): {}",
            report.skipped_bytes_items.len(),
            report.skipped_bytes_items.join(", ")
        );
    }
    crate::emit(&format!(
        "ok: {} -> {}: {} tensors, {} in {} file(s), in {:.2} s\n",
        src.location(),
        out.display(),
        report.tensors,
        human_bytes(report.bytes),
        report.files.len(),
        started.elapsed().as_secs_f64()
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// The row shard of a tensor of `shape` that `rank` of `n` holds (torch's
/// `Shard(0)`); a scalar is held whole by rank 0.
fn row_box(shape: &[u64], n: usize, rank: usize) -> dcp_core::Result<Vec<ChunkBox>> {
    if shape.is_empty() {
        return Ok(if rank == 0 {
            vec![ChunkBox::full(shape)]
        } else {
            Vec::new()
        });
    }
    let mesh = DeviceMesh::new(vec![n])?;
    Ok(mesh
        .local_box(shape, &[Placement::Shard(0)], rank)?
        .into_iter()
        .collect())
}

/// Run `dcp convert`: one summary line and exit 0, or an error naming what
/// failed (the source's item, the output location).
pub fn run(args: ConvertArgs) -> Result<ExitCode, CliError> {
    if let Some(out) = &args.to_safetensors {
        return to_safetensors(&args, out);
    }
    let Some(to_dcp) = &args.to_dcp else {
        return Err(CliError::usage("give --to-dcp OUT or --to-safetensors OUT"));
    };
    if is_safetensors(&args.src) {
        return from_safetensors(&args, to_dcp, None);
    }
    if let Some(store) = safetensors_in_store(&args.src)? {
        return from_safetensors(&args, to_dcp, Some(store));
    }
    let src = open_location(&args.src)?;
    let out = open_location(to_dcp)?;
    let failed = |e: Error| {
        CliError::failed(
            format!(
                "cannot convert {} to a dcp checkpoint at {}",
                src.location(),
                out.location()
            ),
            &e,
        )
    };
    let reader = Arc::new(FileSystemReader::new(src.clone(), crate::reader_options()));
    let rt = crate::runtime()?;
    let md = Arc::new(
        rt.block_on(dcp_core::read_metadata(reader.as_ref()))
            .map_err(failed)?,
    );
    // The bar follows the bytes the ranks write.
    let bar = crate::progress::bar(md.logical_bytes(), "converting");
    let writer = Arc::new(
        FileSystemWriter::new(
            crate::progress::Metered::wrap(out.clone(), &bar),
            WriterOptions::default().overwrite(false),
        )
        .map_err(failed)?,
    );
    let n = args.ranks as usize;
    let started = Instant::now();
    let task_md = md.clone();
    let results = rt.block_on(run_ranks(n, Duration::from_secs(24 * 3600), move |g| {
        let (md, reader, writer) = (task_md.clone(), reader.clone(), writer.clone());
        async move {
            let rank = g.rank();
            let mut dest = DestStateDict::new();
            for (name, item) in &md.items {
                match item {
                    ItemMeta::Tensor { dtype, shape, .. } => dest.want_tensor(
                        name.clone(),
                        *dtype,
                        shape.to_vec(),
                        row_box(shape, n, rank)?,
                    )?,
                    ItemMeta::Bytes { .. } if rank == 0 => dest.want_bytes(name.clone())?,
                    ItemMeta::Bytes { .. } => {}
                }
            }
            let loaded = dcp_core::load(dest, reader.as_ref(), &g).await?;
            let mut sd = StateDict::new();
            for (name, item) in loaded.state_dict.iter() {
                match item {
                    DestItem::Tensor(t) => {
                        let chunks = t
                            .chunks
                            .iter()
                            .filter(|c| !c.region.is_empty())
                            .map(|c| TensorChunk {
                                region: c.region.clone(),
                                data: Bytes::copy_from_slice(c.data.as_slice()).into(),
                            })
                            .collect();
                        sd.insert_tensor(name.clone(), t.dtype, t.shape.clone(), chunks, false)?;
                    }
                    DestItem::Bytes(Some(b)) => sd.insert_bytes(name.clone(), b.clone(), false)?,
                    DestItem::Bytes(None) => {
                        return Err(Error::corrupt(format!("{name}: bytes item not loaded")))
                    }
                }
            }
            dcp_core::save(&sd, writer.as_ref(), &g).await
        }
    }));
    bar.finish_and_clear();
    let mut saved = None;
    for r in results {
        saved = Some(r.map_err(failed)?);
    }
    let saved = saved.ok_or_else(|| CliError::msg("no rank ran"))?;
    crate::emit(&format!(
        "ok: {} ({} items, {}) -> {}: dcp checkpoint of {n} ranks, save {}, in {:.2} s\n",
        src.location(),
        md.items.len(),
        human_bytes(md.logical_bytes()),
        out.location(),
        saved.metadata.save_id,
        started.elapsed().as_secs_f64()
    ))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_split_like_torch_and_scalars_go_to_rank_0() {
        let b: Vec<Vec<ChunkBox>> = (0..3).map(|r| row_box(&[5, 2], 3, r).unwrap()).collect();
        let rows: Vec<(u64, u64)> = b.iter().map(|v| (v[0].offsets[0], v[0].sizes[0])).collect();
        assert_eq!(rows, vec![(0, 2), (2, 2), (4, 1)]);
        assert_eq!(row_box(&[], 3, 0).unwrap().len(), 1);
        assert!(row_box(&[], 3, 1).unwrap().is_empty());
    }
}

//! `dcp inspect`: what a checkpoint holds and where, from its metadata alone
//! (no data file is read; a torch DCP checkpoint's non-tensor records are,
//! to learn the length of their JSON).

use crate::{human_bytes, location::open_location, CliError};
use clap::Args;
use dcp_core::metadata::{ItemMeta, StorageInfo};
use dcp_core::{FileSystemReader, Metadata};
use serde::Serialize;
use std::collections::BTreeMap;
use std::process::ExitCode;

/// Arguments of `dcp inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Checkpoint location: a path or a URL.
    pub path: String,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Only the items whose names match this glob (`*`, `?`, `[...]`;
    /// repeatable); the totals count those items.
    #[arg(long = "keys", value_name = "GLOB")]
    pub keys: Vec<String>,
}

/// The JSON form of a checkpoint's metadata.
#[derive(Debug, Serialize)]
pub struct InspectReport {
    /// Checkpoint location.
    pub location: String,
    /// Id of the save that wrote it.
    pub save_id: String,
    /// Ranks that saved it.
    pub world_size: u32,
    /// Data file layout (`raw`, `safetensors`).
    pub format: String,
    /// Transform descriptors used by any record.
    pub transforms: Vec<String>,
    /// User key/value metadata.
    pub user: BTreeMap<String, String>,
    /// Logical bytes of every item.
    pub bytes: u64,
    /// Bytes stored in data files (after transforms).
    pub stored_bytes: u64,
    /// `bytes / stored_bytes` (1.0 without compression).
    pub compression_ratio: f64,
    /// Items in name order.
    pub items: Vec<ItemReport>,
    /// Data files.
    pub files: Vec<FileReport>,
}

/// One item.
#[derive(Debug, Serialize)]
pub struct ItemReport {
    /// Fully qualified name.
    pub name: String,
    /// `tensor` or `bytes`.
    pub kind: &'static str,
    /// Element type of a tensor (`null` for bytes).
    pub dtype: Option<String>,
    /// Global shape of a tensor (`null` for bytes).
    pub shape: Option<Vec<u64>>,
    /// Logical bytes.
    pub bytes: u64,
    /// Bytes stored (after transforms).
    pub stored_bytes: u64,
    /// Distinct transforms applied to its records, in order of application.
    pub transforms: Vec<String>,
    /// Saved records: a tensor's chunks, or a bytes item's one record.
    pub chunks: Vec<ChunkReport>,
}

/// One saved record.
#[derive(Debug, Serialize)]
pub struct ChunkReport {
    /// Start of the chunk in global coordinates (`null` for bytes).
    pub offsets: Option<Vec<u64>>,
    /// Extent of the chunk (`null` for bytes).
    pub sizes: Option<Vec<u64>>,
    /// Data file holding it.
    pub file: String,
    /// Byte offset in the file.
    pub offset: u64,
    /// Stored length.
    pub length: u64,
    /// Transforms applied, in order.
    pub transforms: Vec<TransformReport>,
}

/// A transform applied to a record.
#[derive(Debug, Serialize)]
pub struct TransformReport {
    /// Descriptor (`name/version[:params]`).
    pub name: String,
    /// Recorded value (a checksum), hex.
    pub value: String,
    /// A codec's input length.
    pub input_len: Option<u64>,
}

/// One data file.
#[derive(Debug, Serialize)]
pub struct FileReport {
    /// Name inside the checkpoint.
    pub name: String,
    /// Length recorded at save time.
    pub length: u64,
}

/// Run `dcp inspect`.
pub fn run(args: InspectArgs) -> Result<ExitCode, CliError> {
    let fs = open_location(&args.path)?;
    let reader = FileSystemReader::new(fs.clone(), crate::reader_options());
    let mut md = crate::runtime()?.block_on(dcp_core::read_metadata(&reader))?;
    if !args.keys.is_empty() {
        let mut b = globset::GlobSetBuilder::new();
        for k in &args.keys {
            b.add(
                globset::Glob::new(k).map_err(|e| CliError::usage(format!("--keys {k:?}: {e}")))?,
            );
        }
        let globs = b.build().map_err(|e| CliError::usage(e.to_string()))?;
        md.items.retain(|(name, _)| globs.is_match(name));
    }
    let report = InspectReport::new(fs.location(), &md);
    if args.json {
        let out = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::msg(format!("cannot encode the report: {e}")))?;
        crate::emit(&format!("{out}\n"))?;
    } else {
        crate::emit(&tables(&report))?;
    }
    Ok(ExitCode::SUCCESS)
}

impl InspectReport {
    /// Describe `md`, found at `location`.
    pub fn new(location: String, md: &Metadata) -> Self {
        let chunk =
            |offsets: Option<Vec<u64>>, sizes: Option<Vec<u64>>, s: &StorageInfo| ChunkReport {
                offsets,
                sizes,
                file: md.files[s.file as usize].name.clone(),
                offset: s.offset,
                length: s.length,
                transforms: s
                    .transforms
                    .iter()
                    .map(|t| TransformReport {
                        name: md.transforms[t.descriptor as usize].clone(),
                        value: t.value.iter().map(|b| format!("{b:02x}")).collect(),
                        input_len: t.input_len,
                    })
                    .collect(),
            };
        let items = md
            .items
            .iter()
            .map(|(name, item)| match item {
                ItemMeta::Tensor {
                    dtype,
                    shape,
                    chunks,
                } => ItemReport {
                    name: name.clone(),
                    kind: "tensor",
                    dtype: Some(dtype.name().to_string()),
                    shape: Some(shape.to_vec()),
                    bytes: chunks
                        .iter()
                        .map(|c| c.region.numel() * dtype.size() as u64)
                        .sum(),
                    stored_bytes: chunks.iter().map(|c| c.storage.length).sum(),
                    transforms: transform_names(md, chunks.iter().map(|c| &c.storage)),
                    chunks: chunks
                        .iter()
                        .map(|c| {
                            chunk(
                                Some(c.region.offsets.to_vec()),
                                Some(c.region.sizes.to_vec()),
                                &c.storage,
                            )
                        })
                        .collect(),
                },
                ItemMeta::Bytes { length, storage } => ItemReport {
                    name: name.clone(),
                    kind: "bytes",
                    dtype: None,
                    shape: None,
                    bytes: *length,
                    stored_bytes: storage.length,
                    transforms: transform_names(md, std::iter::once(storage)),
                    chunks: vec![chunk(None, None, storage)],
                },
            })
            .collect();
        InspectReport {
            location,
            save_id: md.save_id.clone(),
            world_size: md.world_size,
            format: md.format.name().to_string(),
            transforms: md.transforms.clone(),
            user: md.user.clone(),
            bytes: md.logical_bytes(),
            stored_bytes: md.stored_bytes(),
            compression_ratio: ratio(md.logical_bytes(), md.stored_bytes()),
            items,
            files: md
                .files
                .iter()
                .map(|f| FileReport {
                    name: f.name.clone(),
                    length: f.length,
                })
                .collect(),
        }
    }
}

/// `logical / stored`, 1.0 for an empty checkpoint.
fn ratio(logical: u64, stored: u64) -> f64 {
    if stored == 0 {
        1.0
    } else {
        logical as f64 / stored as f64
    }
}

/// The distinct transform descriptors of some records, in first-seen order.
fn transform_names<'a>(
    md: &Metadata,
    records: impl Iterator<Item = &'a StorageInfo>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in records {
        for t in &s.transforms {
            let d = &md.transforms[t.descriptor as usize];
            if !out.contains(d) {
                out.push(d.clone());
            }
        }
    }
    out
}

fn tables(r: &InspectReport) -> String {
    let mut out = String::new();
    let records: usize = r.items.iter().map(|i| i.chunks.len()).sum();
    let file_bytes: u64 = r.files.iter().map(|f| f.length).sum();
    outln!(out, "checkpoint  {}", r.location);
    outln!(out, "save id     {}", r.save_id);
    outln!(out, "world size  {}", r.world_size);
    outln!(out, "format      {}", r.format);
    outln!(
        out,
        "transforms  {}",
        if r.transforms.is_empty() {
            "(none)".to_string()
        } else {
            r.transforms.join(", ")
        }
    );
    if r.user.is_empty() {
        outln!(out, "user        (none)");
    } else {
        for (i, (k, v)) in r.user.iter().enumerate() {
            outln!(out, "{:<12}{k} = {v}", if i == 0 { "user" } else { "" });
        }
    }
    outln!(
        out,
        "items       {} ({} in {records} records)",
        r.items.len(),
        human_bytes(r.bytes)
    );
    outln!(
        out,
        "stored      {} (compression ratio {:.2}x)",
        human_bytes(r.stored_bytes),
        r.compression_ratio
    );
    outln!(
        out,
        "files       {} ({})",
        r.files.len(),
        human_bytes(file_bytes)
    );
    outln!(out);

    let rows: Vec<[String; 9]> = r
        .items
        .iter()
        .map(|i| {
            [
                i.name.clone(),
                i.kind.to_string(),
                i.dtype.clone().unwrap_or_else(|| "-".into()),
                i.shape
                    .as_ref()
                    .map(|s| format!("{s:?}"))
                    .unwrap_or_else(|| "-".into()),
                i.chunks.len().to_string(),
                i.bytes.to_string(),
                i.stored_bytes.to_string(),
                format!("{:.2}", ratio(i.bytes, i.stored_bytes)),
                if i.transforms.is_empty() {
                    "-".to_string()
                } else {
                    i.transforms.join(" > ")
                },
            ]
        })
        .collect();
    table(
        &mut out,
        [
            "ITEM",
            "KIND",
            "DTYPE",
            "SHAPE",
            "CHUNKS",
            "BYTES",
            "STORED",
            "RATIO",
            "TRANSFORMS",
        ],
        &rows,
    );
    outln!(out);
    let rows: Vec<[String; 2]> = r
        .files
        .iter()
        .map(|f| [f.name.clone(), f.length.to_string()])
        .collect();
    table(&mut out, ["FILE", "BYTES"], &rows);
    out
}

/// Append left-aligned columns; the last column (a number) right-aligned.
fn table<const N: usize>(out: &mut String, header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut line = |cells: [&str; N]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                s.push_str(&format!("{cell:>w$}"));
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        outln!(out, "{}", s.trim_end());
    };
    line(header);
    for row in rows {
        line(std::array::from_fn(|i| row[i].as_str()));
    }
}

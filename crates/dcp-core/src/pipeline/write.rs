//! Writing records into data files.
//!
//! One worker per data file at a time, at most `thread_count` per rank. With
//! no transform that changes bytes, a record's host `Bytes` go to the file
//! sink as they are (no serialization copy); codecs run over pieces of at
//! most `per_thread_copy_ahead` bytes. A record whose bytes live in a
//! [`ChunkSource`] (device memory) is staged in pieces of half the worker's
//! `per_thread_copy_ahead` on the worker's copy lane, the next piece copying
//! while the last is written, and never more than `per_thread_copy_ahead`
//! bytes staged and not yet written per worker ([`Budget`]).

use crate::error::Result;
use crate::format::{padding, RecordLayout, SerializationFormat};
use crate::metadata::{AppliedTransform, DataFile, StorageInfo, TransformValue};
use crate::plan::WriteIndex;
use crate::stage::budget::{Budget, Permit};
use crate::stage::{ChunkData, ChunkSource, StagedCopy};
use crate::storage::{FileSink, FileSystem};
use crate::transform::{StreamTransformExtension, TransformKind};
use crate::DType;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;

/// Zeros for alignment padding, written in slices of at most this size.
static ZEROS: [u8; 4096] = [0; 4096];

/// One record to write.
#[derive(Clone, Debug)]
pub(crate) struct RecordJob {
    pub name: String,
    pub index: WriteIndex,
    pub dtype: Option<DType>,
    pub whole: bool,
    pub data: ChunkData,
}

/// A writer thread's copy lane: its index (the lane its stagings run on)
/// and its copy-ahead budget.
pub(crate) struct Lane {
    pub index: usize,
    pub budget: Arc<Budget>,
}

/// One data file to write.
#[derive(Clone, Debug)]
pub(crate) struct FileJob {
    pub file_name: String,
    pub records: Vec<RecordJob>,
}

/// Where a record went (file index local to the job list).
#[derive(Clone, Debug)]
pub(crate) struct RecordResult {
    pub name: String,
    pub index: WriteIndex,
    pub storage: StorageInfo,
}

/// Settings shared by the workers of one save.
pub(crate) struct WriteConfig {
    pub format: Arc<dyn SerializationFormat>,
    pub sync: bool,
    pub piece: usize,
    pub save_id: String,
    /// Transforms in order of application, with their descriptor index in
    /// the save's transform table.
    pub transforms: Vec<(u32, Arc<dyn StreamTransformExtension>)>,
}

impl WriteConfig {
    fn has_codec(&self) -> bool {
        self.transforms
            .iter()
            .any(|(_, t)| t.kind() == TransformKind::Codec)
    }
}

/// Write one data file; on any error the partial file is removed.
pub(crate) fn write_file(
    fs: &dyn FileSystem,
    job: &FileJob,
    file_index: u32,
    cfg: &WriteConfig,
    lane: &Lane,
) -> Result<(DataFile, Vec<RecordResult>)> {
    let _span =
        tracing::debug_span!("write_file", file = %job.file_name, records = job.records.len())
            .entered();
    let mut sink = fs.create(&job.file_name)?;
    match write_records(sink.as_mut(), job, file_index, cfg, lane) {
        Ok(results) => {
            let length = sink
                .finish(cfg.sync)
                .map_err(|e| e.context(format!("finish {}", job.file_name)))?;
            Ok((
                DataFile {
                    name: job.file_name.clone(),
                    length,
                },
                results,
            ))
        }
        Err(e) => {
            sink.abort();
            Err(e)
        }
    }
}

fn write_records(
    sink: &mut dyn FileSink,
    job: &FileJob,
    file_index: u32,
    cfg: &WriteConfig,
    lane: &Lane,
) -> Result<Vec<RecordResult>> {
    let layouts: Vec<RecordLayout<'_>> = job
        .records
        .iter()
        .map(|r| RecordLayout {
            name: &r.name,
            index: &r.index,
            dtype: r.dtype,
            whole: r.whole,
            length: r.data.len(),
        })
        .collect();
    let header = cfg
        .format
        .header(&layouts, &cfg.save_id)
        .map_err(|e| e.context(format!("header of {}", job.file_name)))?;
    let mut pos = header.len() as u64;
    // Record bytes, header, and each record's prefix and padding (bounded
    // by the alignment); the footer is small.
    let align = cfg.format.record_alignment();
    let expected = layouts.iter().fold(pos, |n, l| {
        n.saturating_add(l.length)
            .saturating_add(align.saturating_add(64))
    });
    sink.expect_len(expected);
    if !header.is_empty() {
        sink.write(Bytes::from(header))?;
    }
    let mut results = Vec::with_capacity(job.records.len());
    for (rec, layout) in job.records.iter().zip(&layouts) {
        let prefix = cfg.format.record_prefix(layout)?;
        let mut pad = padding(pos + prefix.len() as u64, align);
        while pad > 0 {
            let n = pad.min(ZEROS.len() as u64);
            sink.write(Bytes::from_static(&ZEROS[..n as usize]))?;
            pos += n;
            pad -= n;
        }
        if !prefix.is_empty() {
            pos += prefix.len() as u64;
            sink.write(Bytes::from(prefix))?;
        }
        let start = pos;
        let mut pieces = Pieces::new(&rec.data, cfg, lane, sink.keeps_bytes());
        let transforms = if cfg.transforms.is_empty() {
            while let Some(p) = pieces
                .next()
                .map_err(|e| e.context(format!("{} in {}", rec.name, job.file_name)))?
            {
                pos += p.len() as u64;
                sink.write(p)?;
            }
            Vec::new()
        } else {
            let (written, applied) = encode_record(sink, &mut pieces, cfg)
                .map_err(|e| e.context(format!("{} in {}", rec.name, job.file_name)))?;
            pos += written;
            applied
        };
        results.push(RecordResult {
            name: rec.name.clone(),
            index: rec.index.clone(),
            storage: StorageInfo {
                file: file_index,
                offset: start,
                length: pos - start,
                transforms: transforms.into(),
            },
        });
    }
    let placed: Vec<StorageInfo> = results.iter().map(|r| r.storage.clone()).collect();
    let footer = cfg
        .format
        .footer(&layouts, &placed)
        .map_err(|e| e.context(format!("footer of {}", job.file_name)))?;
    if !footer.is_empty() {
        sink.write(Bytes::from(footer))?;
    }
    Ok(results)
}

/// A record's bytes, piece by piece: slices of host bytes, or pieces staged
/// from a [`ChunkSource`] on the worker's lane, a piece ahead.
enum Pieces<'a> {
    Host {
        data: &'a Bytes,
        piece: usize,
        at: usize,
    },
    Staged(Staging<'a>),
}

impl<'a> Pieces<'a> {
    /// `copy_out`: staged pieces leave as heap copies, their budget given
    /// back at once (for a sink that keeps the bytes it is given,
    /// [`FileSink::keeps_bytes`]).
    fn new(data: &'a ChunkData, cfg: &WriteConfig, lane: &'a Lane, copy_out: bool) -> Pieces<'a> {
        match data {
            ChunkData::Host(data) => Pieces::Host {
                data,
                // Codecs run over pieces; otherwise the record goes whole.
                piece: if cfg.has_codec() {
                    cfg.piece.max(64 * 1024)
                } else {
                    data.len().max(1)
                },
                at: 0,
            },
            ChunkData::Source(src) => Pieces::Staged(Staging {
                src: src.as_ref(),
                lane,
                piece: lane.budget.piece(),
                next: 0,
                len: src.len(),
                inflight: VecDeque::new(),
                copy_out,
            }),
        }
    }

    /// The next piece, `None` after the last.
    fn next(&mut self) -> Result<Option<Bytes>> {
        match self {
            Pieces::Host { data, piece, at } => {
                if *at >= data.len() {
                    return Ok(None);
                }
                let end = (*at + *piece).min(data.len());
                let p = data.slice(*at..end);
                *at = end;
                Ok(Some(p))
            }
            Pieces::Staged(s) => s.next(),
        }
    }
}

/// Staging one source: copies started in order on the lane, as many ahead
/// as the budget allows (at least one), each piece holding its share of the
/// budget until its bytes are dropped (written), or, with `copy_out`, until
/// they are copied to the heap for a sink that keeps what it is given (a
/// sink holding the last pieces until the next one arrives would otherwise
/// leave the budget waiting on itself).
struct Staging<'a> {
    src: &'a dyn ChunkSource,
    lane: &'a Lane,
    piece: u64,
    next: u64,
    len: u64,
    inflight: VecDeque<(Box<dyn StagedCopy>, Permit, u64)>,
    copy_out: bool,
}

impl Staging<'_> {
    fn next(&mut self) -> Result<Option<Bytes>> {
        while self.next < self.len {
            let n = self.piece.min(self.len - self.next);
            let permit = if self.inflight.is_empty() {
                self.lane.budget.acquire(n)
            } else {
                match self.lane.budget.try_acquire(n) {
                    Some(p) => p,
                    None => break,
                }
            };
            let copy = self.src.stage(self.lane.index, self.next, n as usize)?;
            self.inflight.push_back((copy, permit, n));
            self.next += n;
        }
        let Some((copy, permit, n)) = self.inflight.pop_front() else {
            return Ok(None);
        };
        let bytes = copy.wait()?;
        if bytes.len() as u64 != n {
            return Err(crate::error::Error::corrupt(format!(
                "a staged copy of {n} bytes returned {}",
                bytes.len()
            )));
        }
        if self.copy_out {
            let owned = Bytes::copy_from_slice(&bytes);
            drop(bytes);
            drop(permit);
            return Ok(Some(owned));
        }
        Ok(Some(permit.attach(bytes)))
    }
}

/// Run one record through the transform chain into the sink. Returns the
/// stored length and the applied transforms with their values.
fn encode_record(
    sink: &mut dyn FileSink,
    pieces: &mut Pieces<'_>,
    cfg: &WriteConfig,
) -> Result<(u64, Vec<AppliedTransform>)> {
    let mut encoders = Vec::with_capacity(cfg.transforms.len());
    for (idx, t) in &cfg.transforms {
        encoders.push((*idx, t.kind(), t.encoder()?, 0u64));
    }
    let mut written = 0u64;
    let mut ignore = Vec::new();
    while let Some(data) = pieces.next()? {
        let mut cur: Option<Vec<u8>> = None;
        for (_, kind, enc, input_len) in encoders.iter_mut() {
            let input: &[u8] = cur.as_deref().unwrap_or(&data);
            *input_len += input.len() as u64;
            match kind {
                TransformKind::Checksum => {
                    enc.update(input, &mut ignore)?;
                    debug_assert!(ignore.is_empty(), "checksum encoders must not emit bytes");
                }
                TransformKind::Codec => {
                    let mut out = Vec::new();
                    enc.update(input, &mut out)?;
                    cur = Some(out);
                }
            }
        }
        match cur {
            None => {
                written += data.len() as u64;
                sink.write(data)?;
            }
            Some(out) if !out.is_empty() => {
                written += out.len() as u64;
                sink.write(Bytes::from(out))?;
            }
            Some(_) => {}
        }
    }
    // Finish stage by stage: what a stage emits on finish passes through the
    // stages after it.
    let mut pending: Vec<u8> = Vec::new();
    let mut applied = Vec::with_capacity(encoders.len());
    for (idx, kind, mut enc, mut input_len) in encoders {
        let mut out = Vec::new();
        if !pending.is_empty() {
            input_len += pending.len() as u64;
            match kind {
                TransformKind::Checksum => {
                    enc.update(&pending, &mut ignore)?;
                    out = std::mem::take(&mut pending);
                }
                TransformKind::Codec => enc.update(&pending, &mut out)?,
            }
        }
        let value = enc.finish(&mut out)?;
        pending = out;
        applied.push(AppliedTransform {
            descriptor: idx,
            value: TransformValue::from_slice(&value),
            input_len: (kind == TransformKind::Codec).then_some(input_len),
        });
    }
    if !pending.is_empty() {
        written += pending.len() as u64;
        sink.write(Bytes::from(pending))?;
    }
    Ok((written, applied))
}

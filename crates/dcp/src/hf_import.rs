//! Hugging Face safetensors into a dcp checkpoint: one `.safetensors` file,
//! or a directory with `model.safetensors.index.json` and its shards.
//!
//! Every tensor becomes [`ChunkData::Source`] chunks that read their bytes
//! straight from the file ranges they occupy, piece by piece, when the save
//! writes them: memory is bounded by the writer's `per_thread_copy_ahead`
//! per writer thread, not by the tensors. With `ranks > 1` each simulated
//! rank saves its row or column shard (torch's `Shard(0)` / `Shard(1)`
//! split), so the checkpoint is pre-sharded for that many ranks.

use dcp_core::local::run_ranks;
use dcp_core::placement::{DeviceMesh, Placement};
use dcp_core::stage::{ChunkSource, StagedCopy};
use dcp_core::{
    ChunkBox, ChunkData, Collective, DType, Error, ErrorKind, FileSystem, Metadata, Result,
    StateDict, StorageWriter, TensorChunk,
};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The largest safetensors header read (Hugging Face's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// One tensor of a safetensors file: where its bytes are.
#[derive(Clone, Debug)]
pub struct SafetensorsTensor {
    /// Its name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// The file holding it: a local path, or a file name in [`Self::store`].
    pub file: PathBuf,
    /// Byte offset of its data in the file.
    pub offset: u64,
    /// The storage holding [`Self::file`] (an object store, say); `None`:
    /// the local file system.
    pub store: Option<Arc<dyn FileSystem>>,
}

/// A safetensors file to read: a local path, or a name in a store.
struct Src<'a> {
    store: Option<&'a Arc<dyn FileSystem>>,
    file: PathBuf,
}

impl Src<'_> {
    fn show(&self) -> String {
        match self.store {
            Some(fs) => format!("{}/{}", fs.location(), self.file.display()),
            None => self.file.display().to_string(),
        }
    }

    fn name(&self) -> Result<&str> {
        self.file
            .to_str()
            .ok_or_else(|| Error::invalid(format!("{}: not a UTF-8 name", self.show())))
    }

    /// The file's length; a missing file is an error naming it.
    fn len(&self) -> Result<u64> {
        match self.store {
            Some(fs) => fs.file_len(self.name()?)?.ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("{}: no such file", self.show()),
                )
            }),
            None => std::fs::metadata(&self.file)
                .map(|m| m.len())
                .map_err(|e| Error::io("stat", &self.show(), e)),
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> Result<()> {
        match self.store {
            Some(fs) => fs.read_into(self.name()?, at, buf),
            None => {
                let f = std::fs::File::open(&self.file)
                    .map_err(|e| Error::io("open", &self.show(), e))?;
                f.read_exact_at(buf, at)
                    .map_err(|e| Error::io("read", &self.show(), e))
            }
        }
    }
}

/// The tensors of a safetensors file, refused unless the header is sound:
/// known dtypes, lengths equal to shape x dtype size, data ranges that tile
/// the data section exactly (no overlap, no gap, nothing past the end).
pub fn read_safetensors_header(path: &Path) -> Result<Vec<SafetensorsTensor>> {
    header_of(&Src {
        store: None,
        file: path.to_path_buf(),
    })
}

/// [`read_safetensors_header`] of a file read through a [`FileSystem`].
fn header_of(src: &Src<'_>) -> Result<Vec<SafetensorsTensor>> {
    let show = src.show();
    let path = &src.file;
    let file_len = src.len()?;
    let bad = |m: String| Error::corrupt(format!("{show}: {m}"));
    let mut n = [0u8; 8];
    if file_len < 8 {
        return Err(bad(format!(
            "{file_len} bytes, shorter than the 8-byte header length"
        )));
    }
    src.read_exact_at(&mut n, 0)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n.saturating_add(8) > file_len {
        return Err(bad(format!(
            "header of {n} bytes does not fit the {file_len}-byte file"
        )));
    }
    let mut head = vec![0u8; n as usize];
    src.read_exact_at(&mut head, 8)?;
    let json: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&head)
        .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let data_start = 8 + n;
    let mut out = Vec::new();
    let mut ranges = Vec::new();
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        let field = |k: &str| v.get(k).ok_or_else(|| bad(format!("{name}: no {k:?}")));
        let dtype_s = field("dtype")?
            .as_str()
            .ok_or_else(|| bad(format!("{name}: dtype is not a string")))?;
        let dtype = DType::from_safetensors_name(dtype_s)
            .map_err(|_| bad(format!("{name}: unknown dtype {dtype_s:?}")))?;
        let shape: Vec<u64> = serde_json::from_value(field("shape")?.clone())
            .map_err(|e| bad(format!("{name}: shape: {e}")))?;
        let offs: [u64; 2] = serde_json::from_value(field("data_offsets")?.clone())
            .map_err(|e| bad(format!("{name}: data_offsets: {e}")))?;
        let want = shape
            .iter()
            .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("{name}: shape {shape:?} overflows")))?;
        if offs[1] < offs[0] || offs[1] - offs[0] != want {
            return Err(bad(format!(
                "{name}: data_offsets {offs:?} hold {} bytes, a {dtype_s} tensor of shape {shape:?} needs {want}",
                offs[1].wrapping_sub(offs[0])
            )));
        }
        ranges.push((offs[0], offs[1], name.clone()));
        out.push(SafetensorsTensor {
            name,
            dtype,
            shape,
            file: path.to_path_buf(),
            offset: data_start + offs[0],
            store: src.store.cloned(),
        });
    }
    ranges.sort();
    let mut at = 0;
    for (b, e, name) in &ranges {
        if *b != at {
            return Err(bad(format!(
                "{name}: starts at data offset {b}, expected {at} ({})",
                if *b < at {
                    "it overlaps the tensor before"
                } else {
                    "a gap before it"
                }
            )));
        }
        at = *e;
    }
    if data_start + at != file_len {
        return Err(bad(format!(
            "the tensors end at byte {}, the file has {file_len}",
            data_start + at
        )));
    }
    Ok(out)
}

/// The tensors of `path`: a `.safetensors` file, or a directory holding
/// `model.safetensors.index.json` (every shard it names; a tensor named
/// twice, or one not where the index says, refused) or a single
/// `model.safetensors`.
pub fn read_safetensors(path: &Path) -> Result<Vec<SafetensorsTensor>> {
    if !path.is_dir() {
        return read_safetensors_header(path);
    }
    read_dir(None, path)
}

/// [`read_safetensors`] of files in `store` (an object store, say): the
/// file `name`, or with `None` the location as a directory (its index and
/// shards, or its `model.safetensors`). Tensors are then read from the
/// store when imported.
pub fn read_safetensors_in(
    store: &Arc<dyn FileSystem>,
    name: Option<&str>,
) -> Result<Vec<SafetensorsTensor>> {
    match name {
        Some(n) => header_of(&Src {
            store: Some(store),
            file: PathBuf::from(n),
        }),
        None => read_dir(Some(store), Path::new("")),
    }
}

/// A directory of safetensors: its index and shards, or `model.safetensors`.
fn read_dir(store: Option<&Arc<dyn FileSystem>>, path: &Path) -> Result<Vec<SafetensorsTensor>> {
    let src = |name: &str| Src {
        store,
        file: path.join(name),
    };
    let index = src("model.safetensors.index.json");
    let exists = match store {
        Some(fs) => fs.file_len("model.safetensors.index.json")?.is_some(),
        None => index.file.exists(),
    };
    if !exists {
        return header_of(&src("model.safetensors"));
    }
    let show = index.show();
    let text = {
        let len = index.len()?;
        if len > MAX_HEADER {
            return Err(Error::corrupt(format!(
                "{show}: {len} bytes, too large for an index"
            )));
        }
        let mut buf = vec![0u8; len as usize];
        index.read_exact_at(&mut buf, 0)?;
        buf
    };
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| Error::corrupt(format!("{show}: {e}")))?;
    let map: BTreeMap<String, String> = serde_json::from_value(json["weight_map"].clone())
        .map_err(|e| Error::corrupt(format!("{show}: weight_map: {e}")))?;
    let mut files: Vec<&String> = map.values().collect();
    files.sort();
    files.dedup();
    let mut out = Vec::new();
    let mut seen = BTreeMap::new();
    for f in files {
        if f.contains('/') || f.contains("..") {
            return Err(Error::corrupt(format!(
                "{show}: shard {f:?} is not a file name"
            )));
        }
        for t in header_of(&src(f))? {
            if let Some(other) = seen.insert(t.name.clone(), f.clone()) {
                return Err(Error::corrupt(format!(
                    "{}: in both {other} and {f}",
                    t.name
                )));
            }
            if map.get(&t.name) != Some(f) {
                return Err(Error::corrupt(format!(
                    "{show}: {} is in {f}, the index says {:?}",
                    t.name,
                    map.get(&t.name)
                )));
            }
            out.push(t);
        }
    }
    for (name, f) in &map {
        if !seen.contains_key(name) {
            return Err(Error::corrupt(format!("{show}: {name} is not in {f}")));
        }
    }
    Ok(out)
}

/// How an import splits each tensor over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportShard {
    /// By rows (dimension 0), torch's `Shard(0)`.
    Rows,
    /// By columns (dimension 1, or rows for 1-D tensors), torch's `Shard(1)`.
    Cols,
}

/// Save the tensors of `tensors` through `writer` as a checkpoint of
/// `ranks` simulated ranks (each its `shard` of every tensor; scalars on
/// rank 0), reading each chunk's bytes from its file range while the save
/// writes it. Must be awaited inside a tokio runtime.
pub async fn import_safetensors(
    tensors: Vec<SafetensorsTensor>,
    writer: Arc<dyn StorageWriter>,
    ranks: usize,
    shard: ImportShard,
) -> Result<Arc<Metadata>> {
    if ranks == 0 {
        return Err(Error::invalid("ranks must be at least 1"));
    }
    let tensors = Arc::new(tensors);
    let results = run_ranks(ranks, Duration::from_secs(24 * 3600), move |g| {
        let (tensors, writer) = (tensors.clone(), writer.clone());
        async move {
            let rank = g.rank();
            let mut sd = StateDict::new();
            for t in tensors.iter() {
                let mut chunks = Vec::new();
                if let Some(region) = shard_box(&t.shape, shard, ranks, rank)? {
                    if !region.is_empty() || t.shape.is_empty() {
                        let src = BoxSource::new(t, region.clone());
                        chunks.push(TensorChunk::new(region, ChunkData::Source(Arc::new(src))));
                    }
                }
                sd.insert_tensor(t.name.clone(), t.dtype, t.shape.clone(), chunks, false)?;
            }
            dcp_core::save(&sd, writer.as_ref(), &g).await
        }
    })
    .await;
    let mut md = None;
    for r in results {
        md = Some(r?.metadata);
    }
    md.ok_or_else(|| Error::invalid("no rank ran"))
}

/// The box of `shape` rank `rank` of `ranks` holds.
fn shard_box(
    shape: &[u64],
    shard: ImportShard,
    ranks: usize,
    rank: usize,
) -> Result<Option<ChunkBox>> {
    if shape.is_empty() {
        return Ok((rank == 0).then(|| ChunkBox::full(shape)));
    }
    let dim = match shard {
        ImportShard::Cols if shape.len() > 1 => 1,
        _ => 0,
    };
    let mesh = DeviceMesh::new(vec![ranks])?;
    mesh.local_box(shape, &[Placement::Shard(dim)], rank)
}

/// A box of a row-major tensor stored at `base` in a file: its bytes in
/// row-major order of the box, read with positional reads.
#[derive(Debug)]
struct BoxSource {
    store: Option<Arc<dyn FileSystem>>,
    file: PathBuf,
    base: u64,
    shape: Vec<u64>,
    elem: u64,
    region: ChunkBox,
}

impl BoxSource {
    fn new(t: &SafetensorsTensor, region: ChunkBox) -> BoxSource {
        BoxSource {
            store: t.store.clone(),
            file: t.file.clone(),
            base: t.offset,
            shape: t.shape.clone(),
            elem: t.dtype.size() as u64,
            region,
        }
    }

    /// The file offset of box byte `at` and how many bytes from there are
    /// contiguous in the file (to the end of the box's innermost row).
    fn locate(&self, at: u64) -> (u64, u64) {
        let nd = self.shape.len();
        if nd == 0 {
            return (self.base + at, self.elem - at);
        }
        let row = self.region.sizes[nd - 1] * self.elem;
        let (mut idx, within) = (at / row.max(1), at % row.max(1));
        // Box row index -> global element index of its first element.
        let mut flat = 0u64;
        let mut coords = vec![0u64; nd];
        for d in (0..nd - 1).rev() {
            coords[d] = idx % self.region.sizes[d];
            idx /= self.region.sizes[d];
        }
        for (d, (&size, &c)) in self.shape.iter().zip(&coords).enumerate() {
            flat = flat * size + self.region.offsets[d] + c;
        }
        (self.base + flat * self.elem + within, row - within)
    }
}

impl ChunkSource for BoxSource {
    fn len(&self) -> u64 {
        self.region.numel() * self.elem
    }

    fn stage(&self, _lane: usize, offset: u64, len: usize) -> Result<Box<dyn StagedCopy>> {
        if offset.saturating_add(len as u64) > self.len() {
            return Err(Error::invalid(format!(
                "stage {len} bytes at {offset} of a {}-byte chunk of {}",
                self.len(),
                self.file.display()
            )));
        }
        let src = Src {
            store: self.store.as_ref(),
            file: self.file.clone(),
        };
        let show = src.show();
        let f = match self.store {
            Some(_) => None,
            None => Some(std::fs::File::open(&self.file).map_err(|e| Error::io("open", &show, e))?),
        };
        let mut buf = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let (pos, run) = self.locate(offset + done as u64);
            let n = (run as usize).min(len - done);
            let Some(f) = &f else {
                src.read_exact_at(&mut buf[done..done + n], pos)?;
                done += n;
                continue;
            };
            f.read_exact_at(&mut buf[done..done + n], pos)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        Error::new(
                            ErrorKind::Corrupt,
                            format!("{show}: shorter than its header says (read at {pos})"),
                        )
                    } else {
                        Error::io("read", &show, e)
                    }
                })?;
            done += n;
        }
        Ok(Box::new(Ready(buf)))
    }
}

/// A copy already done (a positional read).
struct Ready(Vec<u8>);

impl StagedCopy for Ready {
    fn wait(self: Box<Self>) -> Result<bytes::Bytes> {
        Ok(bytes::Bytes::from(self.0))
    }
}

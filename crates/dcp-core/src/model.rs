//! The data model: state dicts of tensor and bytes items, chunks as boxes in
//! global coordinates, and the destination state dicts that loads fill.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::stage::ChunkData;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Per-dimension values of a [`ChunkBox`]: inline for tensors of up to
/// four dimensions (no heap allocation), on the heap beyond. Derefs to
/// `[u64]`; serialized exactly as a `Vec<u64>` is.
pub type Dims = smallvec::SmallVec<[u64; 4]>;

/// An axis-aligned box of a tensor in global coordinates: `offsets[d]` is
/// where the box starts on dimension `d`, `sizes[d]` how far it extends.
#[derive(PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkBox {
    /// Start of the box on each dimension.
    #[serde(with = "inline_seq")]
    pub offsets: Dims,
    /// Extent of the box on each dimension (zero allowed).
    #[serde(with = "inline_seq")]
    pub sizes: Dims,
}

/// A [`SmallVec`](smallvec::SmallVec) as a sequence of its elements, the
/// encoding of a `Vec` (so the metadata format is the same as with `Vec`s).
/// Decoding reserves no more than the inline capacity up front, whatever
/// length the input claims: a hostile length fails at the end of the input
/// instead of allocating.
pub(crate) mod inline_seq {
    use serde::de::{Deserialize, SeqAccess, Visitor};
    use serde::{Deserializer, Serialize, Serializer};
    use smallvec::{Array, SmallVec};
    use std::marker::PhantomData;

    pub(crate) fn serialize<A, S>(d: &SmallVec<A>, s: S) -> Result<S::Ok, S::Error>
    where
        A: Array,
        A::Item: Serialize,
        S: Serializer,
    {
        s.collect_seq(d.iter())
    }

    pub(crate) fn deserialize<'de, A, D>(d: D) -> Result<SmallVec<A>, D::Error>
    where
        A: Array,
        A::Item: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        struct V<A>(PhantomData<A>);
        impl<'de, A: Array> Visitor<'de> for V<A>
        where
            A::Item: Deserialize<'de>,
        {
            type Value = SmallVec<A>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<SmallVec<A>, S::Error> {
                let mut out = SmallVec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// Copies the dimensions as slices (a `SmallVec`'s own `clone` goes
/// element by element through an iterator; boxes are cloned once or more
/// per planned read).
impl Clone for ChunkBox {
    fn clone(&self) -> ChunkBox {
        ChunkBox {
            offsets: Dims::from_slice(&self.offsets),
            sizes: Dims::from_slice(&self.sizes),
        }
    }
}

impl fmt::Debug for ChunkBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for ChunkBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "offsets {:?} sizes {:?}", self.offsets, self.sizes)
    }
}

impl ChunkBox {
    /// A box from offsets and sizes (a `Vec<u64>`, a slice or [`Dims`]);
    /// refuses differing ranks.
    pub fn new(offsets: impl Into<Dims>, sizes: impl Into<Dims>) -> Result<ChunkBox> {
        let (offsets, sizes) = (offsets.into(), sizes.into());
        if offsets.len() != sizes.len() {
            return Err(Error::invalid(format!(
                "chunk offsets {offsets:?} and sizes {sizes:?} differ in rank"
            )));
        }
        Ok(ChunkBox { offsets, sizes })
    }

    /// The box covering a whole tensor of `shape`.
    pub fn full(shape: &[u64]) -> ChunkBox {
        ChunkBox {
            offsets: smallvec::smallvec![0; shape.len()],
            sizes: Dims::from_slice(shape),
        }
    }

    /// Number of dimensions.
    pub fn ndim(&self) -> usize {
        self.sizes.len()
    }

    /// Number of elements, or `None` on overflow.
    pub fn checked_numel(&self) -> Option<u64> {
        self.sizes
            .iter()
            .try_fold(1u64, |acc, &s| acc.checked_mul(s))
    }

    /// Number of elements (saturating; validated boxes never overflow).
    pub fn numel(&self) -> u64 {
        self.checked_numel().unwrap_or(u64::MAX)
    }

    /// True when the box holds no element.
    pub fn is_empty(&self) -> bool {
        self.sizes.contains(&0)
    }

    /// Check that the box lies inside a tensor of `shape` (no overflow).
    pub fn check_within(&self, shape: &[u64]) -> Result<()> {
        if self.ndim() != shape.len() || self.offsets.len() != self.sizes.len() {
            return Err(Error::invalid(format!(
                "chunk ({self}) has a different rank than shape {shape:?}"
            )));
        }
        for d in 0..shape.len() {
            let end = self.offsets[d].checked_add(self.sizes[d]);
            if end.is_none_or(|e| e > shape[d]) {
                return Err(Error::invalid(format!(
                    "chunk ({self}) extends past shape {shape:?} on dimension {d}"
                )));
            }
        }
        if self.checked_numel().is_none() {
            return Err(Error::invalid(format!("chunk ({self}) is too large")));
        }
        Ok(())
    }

    /// The intersection with `other`, or `None` if they share no element.
    /// Empty boxes intersect nothing.
    pub fn intersect(&self, other: &ChunkBox) -> Option<ChunkBox> {
        if self.ndim() != other.ndim() {
            return None;
        }
        let mut offsets = Dims::with_capacity(self.ndim());
        let mut sizes = Dims::with_capacity(self.ndim());
        for d in 0..self.ndim() {
            let lo = self.offsets[d].max(other.offsets[d]);
            let hi = (self.offsets[d] + self.sizes[d]).min(other.offsets[d] + other.sizes[d]);
            if hi <= lo {
                return None;
            }
            offsets.push(lo);
            sizes.push(hi - lo);
        }
        Some(ChunkBox { offsets, sizes })
    }

    /// True when the boxes share at least one element (no allocation).
    pub fn overlaps(&self, other: &ChunkBox) -> bool {
        self.ndim() == other.ndim()
            && !self.is_empty()
            && !other.is_empty()
            && (0..self.ndim()).all(|d| {
                self.offsets[d] < other.offsets[d].saturating_add(other.sizes[d])
                    && other.offsets[d] < self.offsets[d].saturating_add(self.sizes[d])
            })
    }

    /// True when `other` lies wholly inside `self`.
    pub fn contains(&self, other: &ChunkBox) -> bool {
        self.ndim() == other.ndim()
            && (0..self.ndim()).all(|d| {
                other.offsets[d] >= self.offsets[d]
                    && other.offsets[d] + other.sizes[d] <= self.offsets[d] + self.sizes[d]
            })
    }
}

/// One locally held piece of a tensor: its box and its bytes, row-major and
/// contiguous, `box.numel() * dtype.size()` long.
#[derive(Clone, Debug)]
pub struct TensorChunk {
    /// Where the chunk sits in the global tensor.
    pub region: ChunkBox,
    /// The chunk's bytes: host memory shared without copying, or a source
    /// (device memory) a save copies them out of while it writes.
    pub data: ChunkData,
}

impl TensorChunk {
    /// A chunk of `region` holding `data` (host bytes, a `Vec<u8>`, or a
    /// [`ChunkData::Source`]).
    pub fn new(region: ChunkBox, data: impl Into<ChunkData>) -> TensorChunk {
        TensorChunk {
            region,
            data: data.into(),
        }
    }
}

/// A tensor as one rank holds it: dtype, global shape, and local chunks.
#[derive(Clone, Debug)]
pub struct TensorItem {
    /// Element type.
    pub dtype: DType,
    /// Global shape.
    pub shape: Vec<u64>,
    /// The chunks this rank holds (possibly none).
    pub chunks: Vec<TensorChunk>,
    /// True when the same chunks (same boxes, same bytes) are present on
    /// several ranks and should be written once.
    pub replicated: bool,
}

/// One entry of a [`StateDict`].
#[derive(Clone, Debug)]
pub enum Item {
    /// A (sharded) tensor.
    Tensor(TensorItem),
    /// Opaque bytes: data-loader state, RNG state, configuration.
    Bytes {
        /// The bytes.
        data: Bytes,
        /// True when every rank holding this key holds the same bytes.
        replicated: bool,
    },
}

/// What one rank saves: fully qualified names mapped to items, in name order.
#[derive(Clone, Debug, Default)]
pub struct StateDict {
    items: BTreeMap<String, Item>,
}

impl StateDict {
    /// An empty state dict.
    pub fn new() -> Self {
        Self::default()
    }

    /// Insert a tensor of which this rank holds `chunks`. Refuses chunks
    /// outside `shape` or whose byte length does not match their box.
    pub fn insert_tensor(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<u64>,
        chunks: Vec<TensorChunk>,
        replicated: bool,
    ) -> Result<()> {
        let name = name.into();
        check_name(&name)?;
        for c in &chunks {
            c.region
                .check_within(&shape)
                .map_err(|e| e.context(&name))?;
            let want = c.region.numel() as u128 * dtype.size() as u128;
            if u128::from(c.data.len()) != want {
                return Err(Error::invalid(format!(
                    "{name}: chunk ({}) has {} bytes, expected {want} for {dtype}",
                    c.region,
                    c.data.len()
                )));
            }
        }
        let item = Item::Tensor(TensorItem {
            dtype,
            shape,
            chunks,
            replicated,
        });
        self.items.insert(name, item);
        Ok(())
    }

    /// Insert a whole (unsharded) tensor held by this rank alone.
    pub fn insert_full_tensor(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<u64>,
        data: impl Into<ChunkData>,
    ) -> Result<()> {
        let region = ChunkBox::full(&shape);
        self.insert_tensor(
            name,
            dtype,
            shape,
            vec![TensorChunk::new(region, data)],
            false,
        )
    }

    /// Insert a bytes item.
    pub fn insert_bytes(
        &mut self,
        name: impl Into<String>,
        data: impl Into<Bytes>,
        replicated: bool,
    ) -> Result<()> {
        let name = name.into();
        check_name(&name)?;
        self.items.insert(
            name,
            Item::Bytes {
                data: data.into(),
                replicated,
            },
        );
        Ok(())
    }

    /// Look up an item.
    pub fn get(&self, name: &str) -> Option<&Item> {
        self.items.get(name)
    }

    /// Iterate over items in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Item)> {
        self.items.iter()
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when there is no item.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes held by this rank (every chunk and bytes item).
    pub fn local_bytes(&self) -> u64 {
        self.items
            .values()
            .map(|i| match i {
                Item::Tensor(t) => t.chunks.iter().map(|c| c.data.len()).sum(),
                Item::Bytes { data, .. } => data.len() as u64,
            })
            .sum()
    }
}

/// Item names must be non-empty valid strings without NUL; they are never
/// used as file names.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('\0') || name.len() > 64 * 1024 {
        return Err(Error::invalid(format!("invalid item name {name:?}")));
    }
    Ok(())
}

/// Memory a load fills in place: a framework's tensor storage, a pinned
/// buffer, a memory-mapped file. Implement it to load straight into memory
/// the caller owns, with no copy beyond the read itself.
///
/// Both methods must return the same memory, of the same length, every
/// time they are called: a load writes through
/// [`TensorBuffer::as_mut_bytes`] from a worker thread and hands the buffer
/// back when it is done.
pub trait TensorBuffer: Send + Sync + 'static {
    /// The bytes, for reading.
    fn as_bytes(&self) -> &[u8];
    /// The bytes, to fill.
    fn as_mut_bytes(&mut self) -> &mut [u8];
}

impl TensorBuffer for Vec<u8> {
    fn as_bytes(&self) -> &[u8] {
        self
    }
    fn as_mut_bytes(&mut self) -> &mut [u8] {
        self
    }
}

impl TensorBuffer for Box<[u8]> {
    fn as_bytes(&self) -> &[u8] {
        self
    }
    fn as_mut_bytes(&mut self) -> &mut [u8] {
        self
    }
}

impl TensorBuffer for bytes::BytesMut {
    fn as_bytes(&self) -> &[u8] {
        self
    }
    fn as_mut_bytes(&mut self) -> &mut [u8] {
        self
    }
}

/// The buffer of a destination chunk: one dcp allocated ([`DestData::Owned`],
/// the simple default), or memory the caller provided
/// ([`DestData::Provided`]), filled in place. It dereferences to its bytes.
pub enum DestData {
    /// A buffer owned as a `Vec`.
    Owned(Vec<u8>),
    /// Caller-provided memory, handed back filled.
    Provided(Box<dyn TensorBuffer>),
}

impl DestData {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self
    }

    /// Whether this is caller-provided memory.
    pub fn is_provided(&self) -> bool {
        matches!(self, DestData::Provided(_))
    }

    /// The bytes as a `Vec`: the owned buffer itself, or a copy of
    /// provided memory.
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            DestData::Owned(v) => v,
            DestData::Provided(b) => b.as_bytes().to_vec(),
        }
    }

    /// The caller's buffer, if it is one.
    pub fn into_provided(self) -> Option<Box<dyn TensorBuffer>> {
        match self {
            DestData::Provided(b) => Some(b),
            DestData::Owned(_) => None,
        }
    }
}

impl Default for DestData {
    fn default() -> Self {
        DestData::Owned(Vec::new())
    }
}

impl std::ops::Deref for DestData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            DestData::Owned(v) => v,
            DestData::Provided(b) => b.as_bytes(),
        }
    }
}

impl std::ops::DerefMut for DestData {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            DestData::Owned(v) => v,
            DestData::Provided(b) => b.as_mut_bytes(),
        }
    }
}

impl From<Vec<u8>> for DestData {
    fn from(v: Vec<u8>) -> Self {
        DestData::Owned(v)
    }
}

/// Cloning copies the bytes into an owned buffer (provided memory cannot be
/// duplicated).
impl Clone for DestData {
    fn clone(&self) -> Self {
        DestData::Owned(self.to_vec())
    }
}

impl fmt::Debug for DestData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DestData::Owned(v) => f.debug_tuple("Owned").field(v).finish(),
            DestData::Provided(b) => write!(f, "Provided({} bytes)", b.as_bytes().len()),
        }
    }
}

impl PartialEq for DestData {
    fn eq(&self, other: &DestData) -> bool {
        self[..] == other[..]
    }
}

impl PartialEq<Vec<u8>> for DestData {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self[..] == other[..]
    }
}

impl PartialEq<[u8]> for DestData {
    fn eq(&self, other: &[u8]) -> bool {
        &self[..] == other
    }
}

impl PartialEq<DestData> for Vec<u8> {
    fn eq(&self, other: &DestData) -> bool {
        self[..] == other[..]
    }
}

/// A destination chunk that a load fills: its box and a buffer of exactly
/// `box.numel() * dtype.size()` bytes, returned filled.
#[derive(Clone, Debug)]
pub struct DestChunk {
    /// Where the chunk sits in the global tensor.
    pub region: ChunkBox,
    /// The buffer to fill, row-major.
    pub data: DestData,
}

impl DestChunk {
    /// A chunk filling `data`, a buffer dcp owns from now on.
    pub fn new(region: ChunkBox, data: Vec<u8>) -> DestChunk {
        DestChunk {
            region,
            data: DestData::Owned(data),
        }
    }

    /// A chunk filling memory the caller owns, in place: no other buffer of
    /// its size is allocated by the load (except for records a codec must
    /// decode first). Get it back with [`DestData::into_provided`].
    pub fn provided(region: ChunkBox, buffer: impl TensorBuffer) -> DestChunk {
        DestChunk {
            region,
            data: DestData::Provided(Box::new(buffer)),
        }
    }
}

/// A tensor to load: expected dtype and global shape, and the chunks wanted.
#[derive(Clone, Debug)]
pub struct DestTensor {
    /// Expected dtype; a different saved dtype is an error.
    pub dtype: DType,
    /// Expected global shape; a different saved shape is an error.
    pub shape: Vec<u64>,
    /// The chunks to fill.
    pub chunks: Vec<DestChunk>,
}

/// One entry of a [`DestStateDict`].
#[derive(Clone, Debug)]
pub enum DestItem {
    /// A tensor to fill.
    Tensor(DestTensor),
    /// A bytes item; `None` before the load, the saved bytes after.
    Bytes(Option<Vec<u8>>),
}

/// What one rank loads: names mapped to destinations, filled in place.
#[derive(Clone, Debug, Default)]
pub struct DestStateDict {
    items: BTreeMap<String, DestItem>,
}

impl DestStateDict {
    /// An empty destination.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask for `regions` of a tensor, allocating zeroed buffers.
    pub fn want_tensor(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<u64>,
        regions: Vec<ChunkBox>,
    ) -> Result<()> {
        let mut chunks = Vec::with_capacity(regions.len());
        for region in regions {
            region.check_within(&shape)?;
            let len = usize::try_from(region.numel() as u128 * dtype.size() as u128)
                .map_err(|_| Error::invalid(format!("chunk ({region}) too large for memory")))?;
            chunks.push(DestChunk::new(region, vec![0u8; len]));
        }
        self.insert_tensor(name, dtype, shape, chunks)
    }

    /// Ask for a tensor into caller-provided buffers ([`DestChunk::new`] for
    /// a `Vec`, [`DestChunk::provided`] for any [`TensorBuffer`]), filled in
    /// place. Refuses buffers whose length does not match their box, and
    /// boxes outside `shape`.
    pub fn insert_tensor(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<u64>,
        chunks: Vec<DestChunk>,
    ) -> Result<()> {
        let name = name.into();
        check_name(&name)?;
        for c in &chunks {
            c.region
                .check_within(&shape)
                .map_err(|e| e.context(&name))?;
            let want = c.region.numel() as u128 * dtype.size() as u128;
            if c.data.len() as u128 != want {
                return Err(Error::invalid(format!(
                    "{name}: destination chunk ({}) has {} bytes, expected {want}",
                    c.region,
                    c.data.len()
                )));
            }
        }
        self.items.insert(
            name,
            DestItem::Tensor(DestTensor {
                dtype,
                shape,
                chunks,
            }),
        );
        Ok(())
    }

    /// Ask for a bytes item.
    pub fn want_bytes(&mut self, name: impl Into<String>) -> Result<()> {
        let name = name.into();
        check_name(&name)?;
        self.items.insert(name, DestItem::Bytes(None));
        Ok(())
    }

    /// Look up an item.
    pub fn get(&self, name: &str) -> Option<&DestItem> {
        self.items.get(name)
    }

    /// Take an item out (its buffers with it, no copy).
    pub fn remove(&mut self, name: &str) -> Option<DestItem> {
        self.items.remove(name)
    }

    /// The bytes of a loaded bytes item.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        match self.items.get(name) {
            Some(DestItem::Bytes(Some(b))) => Some(b),
            _ => None,
        }
    }

    /// The chunks of a loaded tensor.
    pub fn tensor(&self, name: &str) -> Option<&DestTensor> {
        match self.items.get(name) {
            Some(DestItem::Tensor(t)) => Some(t),
            _ => None,
        }
    }

    /// Iterate in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &DestItem)> {
        self.items.iter()
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when there is no item.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(crate) fn into_items(self) -> BTreeMap<String, DestItem> {
        self.items
    }

    pub(crate) fn from_items(items: BTreeMap<String, DestItem>) -> Self {
        DestStateDict { items }
    }

    /// Every item, mutably, in name order (buffers moved out and back in
    /// place while a load fills them, without rebuilding the map).
    pub(crate) fn items_mut(&mut self) -> impl Iterator<Item = &mut DestItem> {
        self.items.values_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A box encodes exactly as two `Vec<u64>` did (metadata written before
    /// `Dims` decodes unchanged), inline or spilled to the heap; a hostile
    /// length fails at the end of the input instead of allocating.
    #[test]
    fn dims_encode_as_vectors_and_refuse_hostile_lengths() {
        for n in [0usize, 1, 2, 4, 5, 9] {
            let o: Vec<u64> = (0..n as u64).map(|d| d * 300).collect();
            let s: Vec<u64> = (0..n as u64).map(|d| d + 1).collect();
            let bx = ChunkBox::new(o.clone(), s.clone()).unwrap();
            let bytes = postcard::to_allocvec(&bx).unwrap();
            assert_eq!(bytes, postcard::to_allocvec(&(o, s)).unwrap());
            assert_eq!(postcard::from_bytes::<ChunkBox>(&bytes).unwrap(), bx);
        }
        // Offsets claiming 2^62 elements, then three.
        let mut hostile = Vec::new();
        let mut v = 1u64 << 62;
        while v >= 0x80 {
            hostile.push((v as u8) | 0x80);
            v >>= 7;
        }
        hostile.push(v as u8);
        hostile.extend_from_slice(&[1, 2, 3]);
        assert!(postcard::from_bytes::<ChunkBox>(&hostile).is_err());
    }

    fn b(o: &[u64], s: &[u64]) -> ChunkBox {
        ChunkBox::new(o.to_vec(), s.to_vec()).unwrap()
    }

    #[test]
    fn intersect_boxes() {
        let a = b(&[0, 0], &[4, 4]);
        assert_eq!(a.intersect(&b(&[2, 3], &[4, 4])), Some(b(&[2, 3], &[2, 1])));
        assert_eq!(a.intersect(&b(&[4, 0], &[1, 4])), None);
        assert_eq!(a.intersect(&b(&[0, 0], &[0, 4])), None);
        assert!(a.contains(&b(&[1, 1], &[2, 3])));
        assert!(!a.contains(&b(&[1, 1], &[2, 4])));
        let scalar = b(&[], &[]);
        assert_eq!(scalar.numel(), 1);
        assert_eq!(scalar.intersect(&scalar), Some(scalar.clone()));
    }

    #[test]
    fn refuses_bad_chunks() {
        let mut sd = StateDict::new();
        let err = sd
            .insert_tensor(
                "w",
                DType::F32,
                vec![2, 2],
                vec![TensorChunk {
                    region: b(&[1, 0], &[2, 2]),
                    data: Bytes::from(vec![0u8; 16]).into(),
                }],
                false,
            )
            .unwrap_err();
        assert!(err.message().contains("extends past"), "{err}");
        let err = sd
            .insert_tensor(
                "w",
                DType::F32,
                vec![2, 2],
                vec![TensorChunk {
                    region: b(&[0, 0], &[2, 2]),
                    data: Bytes::from(vec![0u8; 15]).into(),
                }],
                false,
            )
            .unwrap_err();
        assert!(err.message().contains("15 bytes"), "{err}");
        assert!(b(&[u64::MAX], &[2]).check_within(&[u64::MAX]).is_err());
    }
}

//! The data model: state dicts of tensor and bytes items, chunks as boxes in
//! global coordinates, and the destination state dicts that loads fill
//! (in `model/dest.rs`).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::stage::ChunkData;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

mod dest;
pub use dest::{DestChunk, DestData, DestItem, DestStateDict, DestTensor, TensorBuffer};

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
            check_chunk(&name, &shape, dtype, &c.region, c.data.len(), "chunk")?;
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

/// Check that a chunk (`what`: "chunk", "destination chunk") of item
/// `name` lies within `shape` and that its buffer of `len` bytes holds its
/// box of `dtype` elements exactly.
pub(crate) fn check_chunk(
    name: &str,
    shape: &[u64],
    dtype: DType,
    region: &ChunkBox,
    len: u64,
    what: &str,
) -> Result<()> {
    region.check_within(shape).map_err(|e| e.context(name))?;
    let want = region.numel() as u128 * dtype.size() as u128;
    if u128::from(len) != want {
        return Err(Error::invalid(format!(
            "{name}: {what} ({region}) has {len} bytes, expected {want} for {dtype}"
        )));
    }
    Ok(())
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

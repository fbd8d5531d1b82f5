//! Destinations of a load: the state dict a rank fills ([`DestStateDict`]),
//! its items, chunks and their buffers ([`DestData`], [`TensorBuffer`]).

use super::{check_chunk, check_name, ChunkBox};
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fmt;

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
///
/// Kept as one vector sorted by name, which a load walks from end to end
/// several times (planning, moving buffers into read slots and back): a
/// destination built in name order, as most are, is appended to. A name
/// inserted before the last one goes to a side map instead (a module
/// order such as `layers.10` after `layers.9` costs no shifting), merged
/// into the vector, in one pass, when the load begins.
#[derive(Clone, Debug, Default)]
pub struct DestStateDict {
    /// Sorted by name, distinct.
    items: Vec<(String, DestItem)>,
    /// Names inserted out of order and not yet merged into `items`; no
    /// name is in both.
    late: BTreeMap<String, DestItem>,
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
    /// boxes outside `shape`. A name asked for again replaces what was
    /// asked before.
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
            check_chunk(
                &name,
                &shape,
                dtype,
                &c.region,
                c.data.len() as u64,
                "destination chunk",
            )?;
        }
        self.put(
            name,
            DestItem::Tensor(DestTensor {
                dtype,
                shape,
                chunks,
            }),
        );
        Ok(())
    }

    /// Ask for a bytes item (replacing what the name asked for before).
    pub fn want_bytes(&mut self, name: impl Into<String>) -> Result<()> {
        let name = name.into();
        check_name(&name)?;
        self.put(name, DestItem::Bytes(None));
        Ok(())
    }

    /// Insert or replace `name`: appended after the last name, replaced in
    /// place, or kept aside until [`DestStateDict::settle`].
    fn put(&mut self, name: String, item: DestItem) {
        if let Some(old) = self.late.get_mut(&name) {
            *old = item;
            return;
        }
        match self.items.last() {
            Some((last, _)) if *last >= name => match self.position(&name) {
                Ok(i) => self.items[i].1 = item,
                Err(_) => {
                    self.late.insert(name, item);
                }
            },
            _ => self.items.push((name, item)),
        }
    }

    /// Where `name` is, or would go, in the sorted vector.
    fn position(&self, name: &str) -> std::result::Result<usize, usize> {
        self.items.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    /// Look up an item.
    pub fn get(&self, name: &str) -> Option<&DestItem> {
        match self.position(name) {
            Ok(i) => Some(&self.items[i].1),
            Err(_) => self.late.get(name),
        }
    }

    /// Take an item out (its buffers with it, no copy). The items after it
    /// shift down: taking every item out one by one costs time quadratic
    /// in their number; iterate the state dict by value instead.
    pub fn remove(&mut self, name: &str) -> Option<DestItem> {
        match self.position(name) {
            Ok(i) => Some(self.items.remove(i).1),
            Err(_) => self.late.remove(name),
        }
    }

    /// The bytes of a loaded bytes item.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        match self.get(name) {
            Some(DestItem::Bytes(Some(b))) => Some(b),
            _ => None,
        }
    }

    /// The chunks of a loaded tensor.
    pub fn tensor(&self, name: &str) -> Option<&DestTensor> {
        match self.get(name) {
            Some(DestItem::Tensor(t)) => Some(t),
            _ => None,
        }
    }

    /// Iterate in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &DestItem)> {
        Merged {
            items: self.items.iter().map(|(n, i)| (n, i)).peekable(),
            late: self.late.iter().peekable(),
        }
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len() + self.late.len()
    }

    /// True when there is no item.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.late.is_empty()
    }

    /// Merge the names inserted out of order into the sorted vector (one
    /// pass; nothing to do for a destination built in name order).
    pub(crate) fn settle(&mut self) {
        if self.late.is_empty() {
            return;
        }
        let late = std::mem::take(&mut self.late);
        let items = std::mem::take(&mut self.items);
        let mut merged = Vec::with_capacity(items.len() + late.len());
        let mut late = late.into_iter().peekable();
        for (name, item) in items {
            while let Some(l) = late.next_if(|(l, _)| *l < name) {
                merged.push(l);
            }
            merged.push((name, item));
        }
        merged.extend(late);
        self.items = merged;
    }

    /// Every item in name order, by value.
    pub(crate) fn into_items(mut self) -> Vec<(String, DestItem)> {
        self.settle();
        self.items
    }

    /// The state dict of `items`, sorted by name and distinct (as
    /// [`DestStateDict::into_items`] returns them).
    pub(crate) fn from_items(items: Vec<(String, DestItem)>) -> Self {
        debug_assert!(items.windows(2).all(|w| w[0].0 < w[1].0));
        DestStateDict {
            items,
            late: BTreeMap::new(),
        }
    }

    /// Every item, mutably, in name order (buffers moved out and back in
    /// place while a load fills them, without rebuilding the state dict).
    pub(crate) fn items_mut(&mut self) -> &mut [(String, DestItem)] {
        self.settle();
        &mut self.items
    }
}

impl IntoIterator for DestStateDict {
    type Item = (String, DestItem);
    type IntoIter = std::vec::IntoIter<(String, DestItem)>;

    /// Every item by value, in name order.
    fn into_iter(self) -> Self::IntoIter {
        self.into_items().into_iter()
    }
}

/// Two name-sorted sequences with no name in both, walked as one.
struct Merged<'a, A: Iterator<Item = (&'a String, &'a DestItem)>> {
    items: std::iter::Peekable<A>,
    late: std::iter::Peekable<std::collections::btree_map::Iter<'a, String, DestItem>>,
}

impl<'a, A: Iterator<Item = (&'a String, &'a DestItem)>> Iterator for Merged<'a, A> {
    type Item = (&'a String, &'a DestItem);

    fn next(&mut self) -> Option<Self::Item> {
        match (self.items.peek(), self.late.peek()) {
            (Some(a), Some(b)) if b.0 < a.0 => self.late.next(),
            (Some(_), _) => self.items.next(),
            (None, _) => self.late.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(d: &DestStateDict) -> Vec<String> {
        d.iter().map(|(n, _)| n.clone()).collect()
    }

    fn want(d: &mut DestStateDict, name: &str, len: u64) {
        let b = ChunkBox::new(vec![0], vec![len]).unwrap();
        d.want_tensor(name, DType::U8, vec![len], vec![b]).unwrap();
    }

    fn len_of(d: &DestStateDict, name: &str) -> Option<usize> {
        d.tensor(name).map(|t| t.chunks[0].data.len())
    }

    /// Names in any order read back in name order, each once with what
    /// was asked for last, before and after the out-of-order ones are
    /// merged; lookups and removals find names on either side.
    #[test]
    fn any_insertion_order_reads_in_name_order() {
        // Module order: layers.10 and layers.11 come after layers.9.
        let order: Vec<String> = (0..12).map(|i| format!("layers.{i}")).collect();
        let mut d = DestStateDict::new();
        for (i, n) in order.iter().enumerate() {
            want(&mut d, n, i as u64 + 1);
        }
        d.want_bytes("extra").unwrap();
        // Asked for again: on the sorted side and on the late side.
        want(&mut d, "layers.3", 100);
        want(&mut d, "layers.10", 200);
        let mut sorted = order.clone();
        sorted.push("extra".into());
        sorted.sort();
        assert_eq!(d.len(), 13);
        assert_eq!(names(&d), sorted);
        assert_eq!(len_of(&d, "layers.3"), Some(100));
        assert_eq!(len_of(&d, "layers.10"), Some(200));
        assert_eq!(len_of(&d, "layers.11"), Some(12));
        assert!(matches!(d.get("extra"), Some(DestItem::Bytes(None))));
        assert!(d.get("layers.12").is_none());

        let mut settled = d.clone();
        settled.settle();
        assert!(settled.late.is_empty());
        assert_eq!(names(&settled), sorted);
        assert_eq!(len_of(&settled, "layers.10"), Some(200));

        // Removed from either side.
        assert!(d.remove("layers.11").is_some());
        assert!(d.remove("layers.2").is_some());
        assert!(d.remove("layers.2").is_none());
        sorted.retain(|n| n != "layers.11" && n != "layers.2");
        assert_eq!(names(&d), sorted);
        assert_eq!(d.len(), 11);
        let by_value: Vec<String> = d.into_iter().map(|(n, _)| n).collect();
        assert_eq!(by_value, sorted);
    }

    /// Reversed insertion keeps every name and merges in one pass.
    #[test]
    fn reversed_insertion_settles_sorted() {
        let mut d = DestStateDict::new();
        for i in (0..1000u64).rev() {
            want(&mut d, &format!("t{i:04}"), i + 1);
        }
        assert_eq!(d.late.len(), 999);
        let items = d.items_mut();
        assert_eq!(items.len(), 1000);
        assert!(items.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(len_of(&d, "t0500"), Some(501));
        assert!(d.late.is_empty());
    }
}

//! Decoding [`Metadata::items`](super::Metadata::items) into one allocation
//! of the exact size. serde's own `Vec` decoding reserves at most 1 MiB up
//! front, whatever count the input gives, and doubles from there: for
//! 100,000 items about 8 MB of copies and 15 MB of fresh pages to fault in,
//! a tenth of the whole decode. The encoded count is trusted only as far as
//! the input could hold that many items ([`ItemsBound`]), so a hostile count
//! cannot make a small `.metadata` reserve a large allocation.

use super::ItemMeta;
use serde::de::{Deserializer, SeqAccess, Visitor};
use std::cell::Cell;

/// The fewest bytes an encoded `(name, item)` takes: a name's length and
/// one byte, the variant, and three more (a tensor's dtype and two empty
/// lists).
pub(super) const MIN_ITEM_BYTES: usize = 6;

/// Without a bound (a decode not through [`ItemsBound`]), the most items
/// reserved up front.
const DEFAULT_BOUND: usize = 1 << 12;

thread_local! {
    static BOUND: Cell<usize> = const { Cell::new(DEFAULT_BOUND) };
}

/// While alive, items decoded on this thread reserve up to as many items
/// as `input_len` bytes could encode; the previous bound is restored on
/// drop (bounds nest).
pub(super) struct ItemsBound(usize);

impl ItemsBound {
    pub(super) fn new(input_len: usize) -> ItemsBound {
        ItemsBound(BOUND.with(|b| b.replace(input_len / MIN_ITEM_BYTES)))
    }
}

impl Drop for ItemsBound {
    fn drop(&mut self) {
        BOUND.with(|b| b.set(self.0));
    }
}

/// How many items to reserve for an encoded count of `hint`: the count, up
/// to this thread's bound.
fn reservation(hint: Option<usize>) -> usize {
    hint.unwrap_or(0).min(BOUND.with(Cell::get))
}

/// `deserialize_with` for the items list: the encoded count reserved up
/// front, up to the bound; a reservation the allocator refuses is skipped
/// (the list then grows as it decodes).
pub(super) fn deserialize<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<(String, ItemMeta)>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<(String, ItemMeta)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a sequence of named items")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let want = reservation(seq.size_hint());
            let mut out = Vec::new();
            let _ = out.try_reserve_exact(want);
            while let Some(item) = seq.next_element()? {
                out.push(item);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V)
}

#[cfg(test)]
mod tests {
    use super::super::tests::sample;
    use super::super::Metadata;
    use super::*;

    #[test]
    fn reserves_the_count_only_as_far_as_the_input_could_hold_it() {
        let md = sample();
        let n = md.items.len();
        let body = postcard::to_allocvec(&md).unwrap();
        // Within a bound that allows it: exactly the count, decoded as it was.
        {
            let _b = ItemsBound::new(body.len());
            let back: Metadata = postcard::from_bytes(&body).unwrap();
            assert_eq!(back, md);
            assert_eq!(back.items.capacity(), n);
        }
        // A bound below the count: that much reserved, the rest grown.
        {
            let _b = ItemsBound::new(MIN_ITEM_BYTES);
            let back: Metadata = postcard::from_bytes(&body).unwrap();
            assert_eq!(back, md);
        }
        // The default bound is back after both.
        assert_eq!(BOUND.with(Cell::get), DEFAULT_BOUND);
    }

    #[test]
    fn a_hostile_count_fails_without_a_large_reservation() {
        // Everything up to the items of a real body, then a count of 2^40
        // items and nothing more: the decode fails at the end of the
        // input, and the reservation for that count is what the input's
        // length allows.
        let md = Metadata {
            items: Vec::new(),
            user: Default::default(),
            generation: 0,
            ..sample()
        };
        let body = postcard::to_allocvec(&md).unwrap();
        let empty_items_at = body.len() - (1 + 1 + 1); // items len, user len, generation
        let mut hostile = body[..empty_items_at].to_vec();
        let mut v = 1u64 << 40;
        while v >= 0x80 {
            hostile.push((v as u8) | 0x80);
            v >>= 7;
        }
        hostile.push(v as u8);
        let _b = ItemsBound::new(hostile.len());
        assert_eq!(reservation(Some(1 << 40)), hostile.len() / MIN_ITEM_BYTES);
        assert!(hostile.len() < 200, "{}", hostile.len());
        assert!(postcard::from_bytes::<Metadata>(&hostile).is_err());
    }
}

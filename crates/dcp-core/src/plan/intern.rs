//! Names and shapes of decoded save plans, shared: the coordinator of a save
//! decodes every rank's plan, and under FSDP-like sharding each of R ranks
//! names the same tensors with the same shapes. Decoding inside
//! [`sharing`] gives every repeated name and shape the same `Arc` instead
//! of one heap block per record (at 16,384 ranks x 1,000 tensors, 16.4 M
//! strings and shape vectors become 1,000 of each). Outside [`sharing`]
//! each decoded name and shape gets its own `Arc`, as any other decode.
//!
//! The encoding is that of a `String` and a `Vec<u64>`: the wire format does
//! not change.

use rustc_hash::FxHashSet;
use serde::de::{SeqAccess, Visitor};
use serde::{Deserializer, Serializer};
use smallvec::SmallVec;
use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

#[derive(Default)]
struct Table {
    names: FxHashSet<Arc<str>>,
    shapes: FxHashSet<Arc<[u64]>>,
}

thread_local! {
    static TABLE: RefCell<Option<Table>> = const { RefCell::new(None) };
}

/// Run `f` (which decodes plans on this thread) with repeated names and
/// shapes shared. The table lives only as long as `f`; nested calls share
/// the outer table.
pub(crate) fn sharing<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            if self.0 {
                TABLE.with(|t| t.borrow_mut().take());
            }
        }
    }
    let outer = TABLE.with(|t| {
        let mut t = t.borrow_mut();
        let outer = t.is_none();
        if outer {
            *t = Some(Table::default());
        }
        outer
    });
    // Cleared on return and on unwind.
    let _reset = Reset(outer);
    f()
}

fn name_of(s: &str) -> Arc<str> {
    TABLE.with(|t| match t.borrow_mut().as_mut() {
        Some(t) => match t.names.get(s) {
            Some(a) => a.clone(),
            None => {
                let a: Arc<str> = Arc::from(s);
                t.names.insert(a.clone());
                a
            }
        },
        None => Arc::from(s),
    })
}

fn shape_of(s: &[u64]) -> Arc<[u64]> {
    TABLE.with(|t| match t.borrow_mut().as_mut() {
        Some(t) => match t.shapes.get(s) {
            Some(a) => a.clone(),
            None => {
                let a: Arc<[u64]> = Arc::from(s);
                t.shapes.insert(a.clone());
                a
            }
        },
        None => Arc::from(s),
    })
}

/// A name, encoded as a string.
pub(crate) mod name {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Arc<str>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Arc<str>, E> {
                Ok(name_of(v))
            }
        }
        d.deserialize_str(V)
    }
}

/// A shape, encoded as a sequence of `u64`. Decoding reserves nothing from
/// a claimed length (a hostile length fails at the end of the input).
pub(crate) mod shape {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(v: &Arc<[u64]>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[u64]>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Arc<[u64]>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence of u64")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Arc<[u64]>, A::Error> {
                let mut out: SmallVec<[u64; 8]> = SmallVec::new();
                while let Some(v) = seq.next_element::<u64>()? {
                    out.push(v);
                }
                Ok(shape_of(&out))
            }
        }
        d.deserialize_seq(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Rec {
        #[serde(with = "name")]
        name: Arc<str>,
        #[serde(with = "shape")]
        shape: Arc<[u64]>,
    }

    #[derive(Serialize)]
    struct Plain {
        name: String,
        shape: Vec<u64>,
    }

    #[test]
    fn repeated_names_and_shapes_share_one_allocation_only_inside_sharing() {
        let bytes = postcard::to_allocvec(&Plain {
            name: "layers.0.w".into(),
            shape: vec![4, 8],
        })
        .unwrap();
        let (a, b) = sharing(|| {
            let a: Rec = postcard::from_bytes(&bytes).unwrap();
            let b: Rec = postcard::from_bytes(&bytes).unwrap();
            (a, b)
        });
        assert_eq!(&*a.name, "layers.0.w");
        assert_eq!(&*a.shape, &[4, 8]);
        assert!(Arc::ptr_eq(&a.name, &b.name) && Arc::ptr_eq(&a.shape, &b.shape));
        // The wire form is that of a String and a Vec<u64>.
        assert_eq!(postcard::to_allocvec(&a).unwrap(), bytes);
        // Outside: separate allocations, and the table is gone.
        let c: Rec = postcard::from_bytes(&bytes).unwrap();
        assert!(!Arc::ptr_eq(&a.name, &c.name));
        assert!(TABLE.with(|t| t.borrow().is_none()));
    }

    #[test]
    fn a_panic_inside_sharing_clears_the_table() {
        let r = std::panic::catch_unwind(|| sharing(|| panic!("boom")));
        assert!(r.is_err());
        assert!(TABLE.with(|t| t.borrow().is_none()));
    }

    #[test]
    fn hostile_shape_lengths_fail_without_allocating() {
        // A claimed length of 2^60 elements with nothing behind it.
        let mut bytes = postcard::to_allocvec(&"n").unwrap();
        bytes.extend([0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]);
        assert!(postcard::from_bytes::<Rec>(&bytes).is_err());
    }
}

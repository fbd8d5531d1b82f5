//! The reads one read schedule serves: a rank's own load plan, or, when
//! the ranks of one process share their reads, the reads of every rank's
//! plan that this rank serves, borrowed rather than copied.

use crate::plan::{BytesRead, LoadPlan, ReadItem};

/// The tensor and bytes reads of one schedule. Each tensor read comes with
/// the index of the destination item it fills among the slots the
/// schedule writes ([`Reads::tensor`]): a plan's own `dest_item`, or, for
/// reads served for several ranks, that index moved past the items of the
/// ranks before the read's own.
pub(crate) enum Reads<'a> {
    /// A rank's own plan, its destination items as they are.
    Plan(&'a LoadPlan),
    /// Reads of several ranks' plans, each with its destination item in
    /// the slots of every rank; bytes reads with theirs already moved.
    Served {
        tensor: Vec<(&'a ReadItem, usize)>,
        bytes: Vec<BytesRead>,
    },
}

impl<'a> Reads<'a> {
    /// Number of tensor reads.
    pub(crate) fn tensor_len(&self) -> usize {
        match self {
            Reads::Plan(p) => p.tensor_reads.len(),
            Reads::Served { tensor, .. } => tensor.len(),
        }
    }

    /// Tensor read `i` and the destination item it fills among the slots.
    /// Panics if `i` is out of range.
    pub(crate) fn tensor(&self, i: usize) -> (&'a ReadItem, usize) {
        match self {
            Reads::Plan(p) => {
                let p: &'a LoadPlan = p;
                let r = &p.tensor_reads[i];
                (r, r.dest_item)
            }
            Reads::Served { tensor, .. } => tensor[i],
        }
    }

    /// Every tensor read, in order, as [`Reads::tensor`] gives it.
    pub(crate) fn tensors(&self) -> impl Iterator<Item = (&'a ReadItem, usize)> + '_ {
        (0..self.tensor_len()).map(|i| self.tensor(i))
    }

    /// The bytes reads, their destination items among the slots.
    pub(crate) fn bytes(&self) -> &[BytesRead] {
        match self {
            Reads::Plan(p) => &p.bytes_reads,
            Reads::Served { bytes, .. } => bytes,
        }
    }

    /// Whether there is nothing to read.
    pub(crate) fn is_empty(&self) -> bool {
        self.tensor_len() == 0 && self.bytes().is_empty()
    }
}

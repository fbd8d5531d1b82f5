//! Placements over a device mesh, as torch's DTensor has them: which box of
//! a tensor each rank holds, so nobody computes boxes by hand.
//!
//! A [`DeviceMesh`] arranges the ranks of a job in an n-dimensional grid
//! (`[8]` for plain data parallelism, `[2, 4]` for 2 replicas of 4-way
//! sharding). A tensor has one [`Placement`] per mesh dimension:
//! [`Placement::Shard`] splits one tensor dimension across the ranks along
//! that mesh dimension, [`Placement::Replicate`] gives each of them the same
//! part. The split is torch's (`torch.chunk`, which DTensor's `Shard` uses):
//! pieces of `ceil(len / n)` elements, so the last ranks may hold a smaller
//! piece or nothing. Several mesh dimensions sharding one tensor dimension
//! split it again, in mesh order (DTensor's nested sharding).
//!
//! ```
//! use dcp_core::placement::{DeviceMesh, Placement};
//! let mesh = DeviceMesh::new(vec![2, 2]).unwrap();
//! // Rows across mesh dimension 1, replicated along dimension 0.
//! let p = [Placement::Replicate, Placement::Shard(0)];
//! let b = mesh.local_box(&[10, 4], &p, 3).unwrap().unwrap();
//! assert_eq!((b.offsets.to_vec(), b.sizes.to_vec()), (vec![5, 0], vec![5, 4]));
//! ```

use crate::error::{Error, Result};
use crate::model::ChunkBox;

/// How a tensor lies along one mesh dimension (torch's DTensor placements).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Split tensor dimension `d` across the ranks of this mesh dimension.
    Shard(usize),
    /// Every rank of this mesh dimension holds the same part.
    Replicate,
}

/// The ranks of a job arranged in a grid, rank `r` at the row-major
/// coordinates of `r` (torch's `DeviceMesh` over `arange(world)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMesh {
    shape: Vec<usize>,
}

impl DeviceMesh {
    /// A mesh of `shape`. Refuses an empty shape and zero-sized dimensions.
    pub fn new(shape: Vec<usize>) -> Result<DeviceMesh> {
        if shape.is_empty() || shape.contains(&0) {
            return Err(Error::invalid(format!(
                "device mesh shape {shape:?} must have at least one dimension and no zero"
            )));
        }
        shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::invalid(format!("device mesh shape {shape:?} overflows")))?;
        Ok(DeviceMesh { shape })
    }

    /// A one-dimensional mesh of `world` ranks.
    pub fn flat(world: usize) -> Result<DeviceMesh> {
        DeviceMesh::new(vec![world])
    }

    /// The mesh's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.shape.iter().product()
    }

    /// The coordinates of `rank` (row-major). Refuses a rank outside the mesh.
    pub fn coords(&self, rank: usize) -> Result<Vec<usize>> {
        if rank >= self.size() {
            return Err(Error::invalid(format!(
                "rank {rank} is outside a device mesh of {} ranks",
                self.size()
            )));
        }
        let mut c = vec![0; self.shape.len()];
        let mut r = rank;
        for (i, &d) in self.shape.iter().enumerate().rev() {
            c[i] = r % d;
            r /= d;
        }
        Ok(c)
    }

    /// The box of a tensor of `shape` that `rank` holds under `placements`
    /// (one per mesh dimension), or `None` when its piece is empty (a short
    /// dimension split across many ranks). A tensor with no elements gives
    /// every rank its (empty) box, so that saving declares it. Refuses a placement count that
    /// differs from the mesh's dimensions, and a `Shard` of a dimension the
    /// tensor does not have.
    pub fn local_box(
        &self,
        shape: &[u64],
        placements: &[Placement],
        rank: usize,
    ) -> Result<Option<ChunkBox>> {
        if placements.len() != self.shape.len() {
            return Err(Error::invalid(format!(
                "{} placements for a {}-dimensional device mesh",
                placements.len(),
                self.shape.len()
            )));
        }
        let coords = self.coords(rank)?;
        let mut b = ChunkBox::full(shape);
        for ((p, &n), &c) in placements.iter().zip(&self.shape).zip(&coords) {
            let Placement::Shard(d) = *p else { continue };
            if d >= shape.len() {
                return Err(Error::invalid(format!(
                    "Shard({d}) of a tensor with {} dimensions",
                    shape.len()
                )));
            }
            let (off, len) = chunk(b.sizes[d], n as u64, c as u64);
            b.offsets[d] += off;
            b.sizes[d] = len;
        }
        // A tensor with no elements is held, empty, by every rank, so that it
        // is still declared when saved; otherwise an empty piece is `None`.
        Ok((!b.is_empty() || shape.contains(&0)).then_some(b))
    }

    /// Whether `rank` holds a copy that other ranks hold too (some mesh
    /// dimension replicates the tensor): such chunks are saved with
    /// `replicated = true` so that only one rank writes them.
    pub fn is_replicated(&self, placements: &[Placement]) -> bool {
        placements
            .iter()
            .zip(&self.shape)
            .any(|(p, &n)| *p == Placement::Replicate && n > 1)
    }

    /// Every rank's box of a tensor of `shape`, in rank order (`None` where a
    /// rank holds nothing).
    pub fn boxes(&self, shape: &[u64], placements: &[Placement]) -> Result<Vec<Option<ChunkBox>>> {
        (0..self.size())
            .map(|r| self.local_box(shape, placements, r))
            .collect()
    }
}

/// Piece `i` of `len` elements split into `n` pieces the way `torch.chunk`
/// does: pieces of `ceil(len / n)`; returns `(offset, size)`, the size 0
/// past the end.
pub fn chunk(len: u64, n: u64, i: u64) -> (u64, u64) {
    let n = n.max(1);
    let size = len.div_ceil(n);
    let start = (size * i).min(len);
    let end = (start + size).min(len);
    (start, end - start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_matches_torch_chunk() {
        // torch.arange(10).chunk(4) -> sizes 3, 3, 3, 1.
        let sizes: Vec<u64> = (0..4).map(|i| chunk(10, 4, i).1).collect();
        assert_eq!(sizes, [3, 3, 3, 1]);
        // torch.arange(5).chunk(4) -> 2, 2, 1 and nothing for the last.
        let pieces: Vec<(u64, u64)> = (0..4).map(|i| chunk(5, 4, i)).collect();
        assert_eq!(pieces, [(0, 2), (2, 2), (4, 1), (5, 0)]);
        assert_eq!(chunk(0, 3, 1), (0, 0));
    }

    #[test]
    fn boxes_tile_the_tensor_exactly_once_per_replica() {
        let mesh = DeviceMesh::new(vec![2, 3]).unwrap();
        let shape = [7u64, 5];
        for placements in [
            [Placement::Shard(0), Placement::Shard(1)],
            [Placement::Shard(1), Placement::Shard(0)],
            [Placement::Shard(0), Placement::Shard(0)],
            [Placement::Replicate, Placement::Shard(1)],
        ] {
            let boxes = mesh.boxes(&shape, &placements).unwrap();
            let mut count = vec![0u32; 35];
            for b in boxes.iter().flatten() {
                for r in b.offsets[0]..b.offsets[0] + b.sizes[0] {
                    for c in b.offsets[1]..b.offsets[1] + b.sizes[1] {
                        count[(r * 5 + c) as usize] += 1;
                    }
                }
            }
            let copies = if mesh.is_replicated(&placements) {
                2
            } else {
                1
            };
            assert!(
                count.iter().all(|&x| x == copies),
                "{placements:?}: {count:?}"
            );
        }
        // Nested sharding of one dimension: mesh dim 0 first, then dim 1.
        let b = mesh
            .local_box(&[12], &[Placement::Shard(0), Placement::Shard(0)], 4)
            .unwrap()
            .unwrap();
        assert_eq!((b.offsets.to_vec(), b.sizes.to_vec()), (vec![8], vec![2]));
    }

    #[test]
    fn refuses_bad_meshes_and_placements() {
        assert!(DeviceMesh::new(vec![]).is_err());
        assert!(DeviceMesh::new(vec![2, 0]).is_err());
        let mesh = DeviceMesh::flat(4).unwrap();
        let e = mesh.local_box(&[4], &[Placement::Shard(1)], 0).unwrap_err();
        assert!(e.message().contains("Shard(1)"), "{e}");
        let e = mesh.local_box(&[4], &[], 0).unwrap_err();
        assert!(e.message().contains("0 placements"), "{e}");
        let e = mesh
            .local_box(&[4], &[Placement::Replicate], 4)
            .unwrap_err();
        assert!(e.message().contains("rank 4"), "{e}");
        // A short dimension leaves the last ranks empty; scalars are whole.
        assert_eq!(
            mesh.local_box(&[2], &[Placement::Shard(0)], 3).unwrap(),
            None
        );
        assert_eq!(
            mesh.local_box(&[], &[Placement::Replicate], 3).unwrap(),
            Some(ChunkBox::full(&[]))
        );
    }
}

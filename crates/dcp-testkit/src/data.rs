//! Deterministic data: tensors and bytes whose every element is a function
//! of a seed, a name and the element's global index, so whatever saved
//! them, any sharding can be checked against [`TensorSpec::slice`].
//!
//! The bytes come from the one generator of dcp, the demo's
//! ([`dcp_cli::model::element_bits`], re-exported here): the test suites and
//! `dcp demo` share it rather than keeping copies. It lives in `dcp-cli`
//! because the demo needs it in production and a published crate cannot
//! depend on this unpublished one.

use dcp_core::{ChunkBox, DType};

pub use dcp_cli::model::{element_bits, fnv1a, item_key, splitmix64};

/// A tensor whose every element is a function of its name, seed and global
/// linear index: the low bytes of [`element_bits`]`(`[`item_key`]`(seed,
/// name), index)` (bit 0 for `bool`).
#[derive(Clone, Debug)]
pub struct TensorSpec {
    /// Item name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Global shape.
    pub shape: Vec<u64>,
    /// Seed: two specs differing only in seed hold different data.
    pub seed: u64,
}

impl TensorSpec {
    /// A spec.
    pub fn new(name: &str, dtype: DType, shape: &[u64], seed: u64) -> Self {
        TensorSpec {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            seed,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Bytes of the whole tensor.
    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }

    /// The whole tensor, row-major, assembled element by element from the
    /// generator.
    pub fn global(&self) -> Vec<u8> {
        let elem = self.dtype.size();
        let key = item_key(self.seed, &self.name);
        let mut out = Vec::with_capacity(self.nbytes() as usize);
        for i in 0..self.numel() {
            let bytes = element_bits(key, i).to_le_bytes();
            if self.dtype == DType::Bool {
                out.push(bytes[0] & 1);
            } else {
                out.extend_from_slice(&bytes[..elem]);
            }
        }
        out
    }

    /// The expected bytes of box `b` (reference: naive slicing of
    /// [`TensorSpec::global`]).
    pub fn slice(&self, b: &ChunkBox) -> Vec<u8> {
        slice_box(&self.global(), &self.shape, self.dtype.size(), b)
    }
}

/// Slice box `b` out of the row-major tensor `global` of `shape`, one
/// element at a time (the independent reference: no run detection, no
/// shared code with dcp-core).
pub fn slice_box(global: &[u8], shape: &[u64], elem: usize, b: &ChunkBox) -> Vec<u8> {
    let n = shape.len();
    assert_eq!(b.ndim(), n, "box rank differs from shape");
    let numel: u64 = b.sizes.iter().product();
    let mut out = Vec::with_capacity(numel as usize * elem);
    if numel == 0 {
        return out;
    }
    let mut strides = vec![1u64; n];
    for d in (0..n.saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    let mut idx = vec![0u64; n];
    for _ in 0..numel {
        let mut linear = 0u64;
        for d in 0..n {
            linear += (b.offsets[d] + idx[d]) * strides[d];
        }
        let at = linear as usize * elem;
        out.extend_from_slice(&global[at..at + elem]);
        // Odometer increment, last dimension fastest.
        for d in (0..n).rev() {
            idx[d] += 1;
            if idx[d] < b.sizes[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Deterministic bytes for a bytes item: byte `i` is the low byte of
/// [`element_bits`]`(`[`item_key`]`(seed, name), i)`.
pub fn bytes_value(name: &str, seed: u64, len: usize) -> Vec<u8> {
    let key = item_key(seed, name);
    (0..len as u64)
        .map(|i| element_bits(key, i) as u8)
        .collect()
}

/// A sequential SplitMix64 stream (Steele et al.): seeded, tiny and stable
/// forever, unlike library RNGs whose streams may change between versions.
/// Value `n` is [`splitmix64`]`(seed + n * golden gamma)`.
#[derive(Clone, Debug)]
pub struct Rng(u64);

/// SplitMix64's increment (the golden ratio in 64 bits).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl Rng {
    /// A stream starting at `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let v = splitmix64(self.0);
        self.0 = self.0.wrapping_add(GAMMA);
        v
    }

    /// Uniform in `0..n` (`n > 0`; modulo bias is irrelevant for tests).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_slicing() {
        let spec = TensorSpec::new("t", DType::U16, &[3, 4], 7);
        let g = spec.global();
        assert_eq!(g.len(), 24);
        let b = ChunkBox::new(vec![1, 1], vec![2, 2]).unwrap();
        let s = spec.slice(&b);
        let at = |r: usize, c: usize| &g[(r * 4 + c) * 2..(r * 4 + c) * 2 + 2];
        let want = [at(1, 1), at(1, 2), at(2, 1), at(2, 2)].concat();
        assert_eq!(s, want);
        assert_eq!(slice_box(&g, &[3, 4], 2, &ChunkBox::full(&[3, 4])), g);
        let scalar = TensorSpec::new("s", DType::F64, &[], 1);
        assert_eq!(scalar.global().len(), 8);
        assert_eq!(scalar.slice(&ChunkBox::full(&[])), scalar.global());
        assert_ne!(
            TensorSpec::new("t", DType::U16, &[3, 4], 8).global(),
            g,
            "seeds differ"
        );
    }

    /// The stream is the classic SplitMix64 one (the reference
    /// implementation's first outputs for seed 1234567).
    #[test]
    fn rng_is_splitmix64() {
        let mut r = Rng::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }

    /// A bf16 tensor of the suites holds the demo's values' bits' low bytes:
    /// one generator.
    #[test]
    fn tensors_use_the_demo_generator() {
        let spec = TensorSpec::new("w", DType::BF16, &[5], 3);
        let key = item_key(3, "w");
        let g = spec.global();
        for i in 0..5u64 {
            let bits = element_bits(key, i);
            assert_eq!(
                g[2 * i as usize..2 * i as usize + 2],
                bits.to_le_bytes()[..2]
            );
            // The demo's bf16 element is shaped from the same bits.
            assert_eq!(dcp_cli::model::element(key, i) & 0x7F, (bits & 0x7F) as u16);
        }
    }
}

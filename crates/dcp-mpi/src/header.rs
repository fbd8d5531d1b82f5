//! The header every rank sends every other rank at the start of a
//! collective operation: which operation it is in, how long its message is
//! and in what pieces the message follows.
//!
//! A message of any length travels as consecutive pieces of at most the
//! sender's piece size (MPI counts are C `int`s, so one send or receive
//! moves at most `i32::MAX` bytes). The receiver learns length and piece
//! size from the header, allocates the whole message once and receives the
//! pieces straight into it.

use dcp_core::{Error, ErrorKind, Result};

/// Bytes of an encoded [`Header`].
pub(crate) const HEADER_LEN: usize = 32;

/// Marks a dcp-mpi header ("dcpmpi" and a version byte).
const MAGIC: u64 = u64::from_le_bytes(*b"dcpmpi\x00\x01");

/// The largest piece one MPI send or receive can move.
pub(crate) const MAX_PIECE: usize = i32::MAX as usize;

/// What a rank announces to another before sending it a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// Number of the operation on the communicator (1, 2, ...): every rank
    /// counts its operations, so ranks that called a different number of
    /// them are caught instead of exchanging the wrong messages.
    pub(crate) op: u64,
    /// Length of the message in bytes.
    pub(crate) len: u64,
    /// Largest piece the message is sent in.
    pub(crate) piece: u64,
}

impl Header {
    /// The 32 bytes on the wire: magic, op, len, piece, little-endian.
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        for (i, w) in [MAGIC, self.op, self.len, self.piece].iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Decode and check the header `from` sent for operation `op`: refuses
    /// bytes that are not a header, a different operation number, and a
    /// piece size outside `1..=i32::MAX`.
    pub(crate) fn decode(b: &[u8; HEADER_LEN], from: usize, op: u64) -> Result<Header> {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        let bad = |what: String| Error::new(ErrorKind::Collective, what);
        if word(0) != MAGIC {
            return Err(bad(format!(
                "rank {from} sent a message that is not a dcp-mpi header (another library's traffic on dcp's communicator?)"
            )));
        }
        let h = Header {
            op: word(1),
            len: word(2),
            piece: word(3),
        };
        if h.op != op {
            return Err(bad(format!(
                "rank {from} is in collective operation #{} while this rank is in #{op}: ranks called a different number of collective operations",
                h.op
            )));
        }
        if h.piece == 0 || h.piece > MAX_PIECE as u64 {
            return Err(bad(format!(
                "rank {from} announced pieces of {} bytes (must be 1 to {MAX_PIECE})",
                h.piece
            )));
        }
        if usize::try_from(h.len).is_err() {
            return Err(bad(format!(
                "rank {from} announced a message of {} bytes, more than this machine can address",
                h.len
            )));
        }
        Ok(h)
    }

    /// The message length as a `usize` (checked by [`Header::decode`]).
    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }

    /// The piece size as a `usize` (checked by [`Header::decode`]).
    pub(crate) fn piece(&self) -> usize {
        self.piece as usize
    }
}

/// Number of pieces a message of `len` bytes travels in with pieces of at
/// most `piece` bytes (`piece > 0`); an empty message sends none.
pub(crate) fn piece_count(len: usize, piece: usize) -> usize {
    len.div_ceil(piece)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_is_checked() {
        let h = Header {
            op: 7,
            len: 1 << 40,
            piece: 1 << 30,
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b, 3, 7).unwrap(), h);

        let e = Header::decode(&b, 3, 8).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Collective);
        assert!(
            e.message()
                .contains("rank 3 is in collective operation #7 while this rank is in #8"),
            "{e}"
        );

        let mut other = b;
        other[0] ^= 1;
        let e = Header::decode(&other, 1, 7).unwrap_err();
        assert!(e.message().contains("not a dcp-mpi header"), "{e}");

        for piece in [0u64, MAX_PIECE as u64 + 1] {
            let b = Header { piece, ..h }.encode();
            let e = Header::decode(&b, 2, 7).unwrap_err();
            assert!(e.message().contains("announced pieces of"), "{e}");
        }
        let b = Header {
            piece: MAX_PIECE as u64,
            ..h
        }
        .encode();
        assert_eq!(Header::decode(&b, 2, 7).unwrap().piece(), MAX_PIECE);
    }

    #[test]
    fn pieces_cover_the_message() {
        assert_eq!(piece_count(0, 5), 0);
        assert_eq!(piece_count(1, 5), 1);
        assert_eq!(piece_count(5, 5), 1);
        assert_eq!(piece_count(6, 5), 2);
        // A message past MPI's count limit needs more than one piece.
        let big = MAX_PIECE + 1;
        assert_eq!(piece_count(big, MAX_PIECE), 2);
        assert_eq!(piece_count(3 << 30, 1 << 30), 3);
    }
}

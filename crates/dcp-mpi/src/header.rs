//! The header every rank sends every other rank at the start of a
//! collective operation: which operation it is in, how long its message is
//! and in what pieces the message follows.
//!
//! A message of any length travels as consecutive pieces of at most the
//! sender's piece size (MPI counts are C `int`s, so one send or receive
//! moves at most `i32::MAX` bytes). The receiver learns length and piece
//! size from the header, allocates the whole message once and receives the
//! pieces straight into it.
//!
//! A message may be several buffers (`all_to_all_v`): the header lists
//! their lengths, each buffer travels in its own pieces, and the receiver
//! hands them out as slices of its one buffer, so the sender never copies
//! them into one message first. More than [`MAX_SEGMENTS`] buffers travel
//! framed, as one.

use dcp_core::{Error, ErrorKind, Result};

/// Bytes of a header's fixed part: magic, op, len, piece, framed,
/// segment count.
const FIXED_LEN: usize = 48;

/// The most segments a header lists; a message of more buffers travels
/// framed, as one segment (see [`Header::framed`]).
pub(crate) const MAX_SEGMENTS: usize = 25;

/// Bytes of the longest header: the size of the buffer a header is
/// received into (a shorter one fills only its start).
pub(crate) const HEADER_LEN: usize = FIXED_LEN + 8 * MAX_SEGMENTS;

/// Marks a dcp-mpi header ("dcpmpi" and a version byte).
const MAGIC: u64 = u64::from_le_bytes(*b"dcpmpi\x00\x02");

/// The largest piece one MPI send or receive can move.
pub(crate) const MAX_PIECE: usize = i32::MAX as usize;

/// What a rank announces to another before sending it a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// Number of the operation on the communicator (1, 2, ...): every rank
    /// counts its operations, so ranks that called a different number of
    /// them are caught instead of exchanging the wrong messages.
    pub(crate) op: u64,
    /// Length of the message in bytes: the sum of the segments.
    pub(crate) len: u64,
    /// Largest piece the message is sent in.
    pub(crate) piece: u64,
    /// Whether the message is one segment holding more than
    /// [`MAX_SEGMENTS`] buffers, framed (count, lengths, bytes).
    pub(crate) framed: bool,
    /// The lengths of the buffers the message is made of, in order; each
    /// travels in its own pieces and arrives as its own slice of one
    /// receive buffer, so several buffers cross without being copied into
    /// one first.
    pub(crate) segments: Vec<u64>,
}

impl Header {
    /// The bytes on the wire: magic, op, len, piece, framed, the segment
    /// count, then each segment's length, little-endian (at most
    /// [`HEADER_LEN`]: callers frame messages of more than
    /// [`MAX_SEGMENTS`] buffers).
    pub(crate) fn encode(&self) -> Vec<u8> {
        debug_assert!(self.segments.len() <= MAX_SEGMENTS);
        let words = [
            MAGIC,
            self.op,
            self.len,
            self.piece,
            u64::from(self.framed),
            self.segments.len() as u64,
        ];
        let mut out = Vec::with_capacity(FIXED_LEN + 8 * self.segments.len());
        for w in words.iter().chain(&self.segments) {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Decode and check the header `from` sent for operation `op`: refuses
    /// bytes that are not a header, a different operation number, a piece
    /// size outside `1..=i32::MAX`, more than [`MAX_SEGMENTS`] segments, a
    /// framed message of other than one segment, and segments that do not
    /// add up to the length.
    pub(crate) fn decode(b: &[u8; HEADER_LEN], from: usize, op: u64) -> Result<Header> {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        let bad = |what: String| Error::new(ErrorKind::Collective, what);
        if word(0) != MAGIC {
            return Err(bad(format!(
                "rank {from} sent a message that is not a dcp-mpi header (another library's traffic on dcp's communicator, or another dcp-mpi version?)"
            )));
        }
        let (h_op, len, piece, framed, count) = (word(1), word(2), word(3), word(4), word(5));
        if h_op != op {
            return Err(bad(format!(
                "rank {from} is in collective operation #{h_op} while this rank is in #{op}: ranks called a different number of collective operations"
            )));
        }
        if piece == 0 || piece > MAX_PIECE as u64 {
            return Err(bad(format!(
                "rank {from} announced pieces of {piece} bytes (must be 1 to {MAX_PIECE})"
            )));
        }
        if usize::try_from(len).is_err() {
            return Err(bad(format!(
                "rank {from} announced a message of {len} bytes, more than this machine can address"
            )));
        }
        if count > MAX_SEGMENTS as u64 || framed > 1 || (framed == 1 && count != 1) {
            return Err(bad(format!(
                "rank {from} announced {count} segments (framed: {framed}); at most {MAX_SEGMENTS}, exactly one when framed"
            )));
        }
        let segments: Vec<u64> = (0..count as usize).map(|i| word(6 + i)).collect();
        if segments
            .iter()
            .try_fold(0u64, |a, &s| a.checked_add(s))
            .is_none_or(|sum| sum != len)
        {
            return Err(bad(format!(
                "rank {from} announced segments {segments:?} that do not add up to its message of {len} bytes"
            )));
        }
        Ok(Header {
            op: h_op,
            len,
            piece,
            framed: framed == 1,
            segments,
        })
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

/// One buffer holding `bufs`: their count, each length, then the bytes
/// (all little-endian `u64`s): how a message of more than
/// [`MAX_SEGMENTS`] buffers travels.
pub(crate) fn frame(bufs: &[bytes::Bytes]) -> bytes::Bytes {
    let total: usize = bufs.iter().map(|b| b.len() + 8).sum::<usize>() + 8;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(bufs.len() as u64).to_le_bytes());
    for b in bufs {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    }
    for b in bufs {
        out.extend_from_slice(b);
    }
    bytes::Bytes::from(out)
}

/// The buffers [`frame`] put in `msg` (slices of it, not copies); refuses
/// a message that is not such a frame, naming the sender `from`.
pub(crate) fn unframe(msg: &bytes::Bytes, from: usize) -> Result<Vec<bytes::Bytes>> {
    let bad = || {
        Error::new(
            ErrorKind::Collective,
            format!("rank {from} sent a malformed multi-buffer message"),
        )
    };
    let word = |at: usize| -> Result<u64> {
        let b = msg.get(at..at + 8).ok_or_else(bad)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let count = usize::try_from(word(0)?).map_err(|_| bad())?;
    if count > msg.len() / 8 {
        return Err(bad());
    }
    let mut at = 8 + 8 * count;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let len = usize::try_from(word(8 + 8 * i)?).map_err(|_| bad())?;
        let end = at
            .checked_add(len)
            .filter(|&e| e <= msg.len())
            .ok_or_else(bad)?;
        out.push(msg.slice(at..end));
        at = end;
    }
    if at != msg.len() {
        return Err(bad());
    }
    Ok(out)
}

/// Number of pieces a message of `len` bytes travels in with pieces of at
/// most `piece` bytes (`piece > 0`); an empty message sends none.
pub(crate) fn piece_count(len: usize, piece: usize) -> usize {
    len.div_ceil(piece)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A header as it sits in a receive buffer.
    fn received(h: &Header) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let e = h.encode();
        b[..e.len()].copy_from_slice(&e);
        b
    }

    #[test]
    fn header_round_trips_and_is_checked() {
        let h = Header {
            op: 7,
            len: (1 << 40) + 3,
            piece: 1 << 30,
            framed: false,
            segments: vec![1 << 40, 0, 3],
        };
        let b = received(&h);
        assert_eq!(h.encode().len(), 48 + 3 * 8);
        assert_eq!(Header::decode(&b, 3, 7).unwrap(), h);
        let most = Header {
            segments: vec![1; MAX_SEGMENTS],
            len: MAX_SEGMENTS as u64,
            ..h.clone()
        };
        assert_eq!(most.encode().len(), HEADER_LEN);
        assert_eq!(Header::decode(&received(&most), 3, 7).unwrap(), most);

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
            let b = received(&Header { piece, ..h.clone() });
            let e = Header::decode(&b, 2, 7).unwrap_err();
            assert!(e.message().contains("announced pieces of"), "{e}");
        }
        let b = received(&Header {
            piece: MAX_PIECE as u64,
            ..h.clone()
        });
        assert_eq!(Header::decode(&b, 2, 7).unwrap().piece(), MAX_PIECE);

        // Segments that do not add up, too many, a framed message of two.
        let e = Header::decode(
            &received(&Header {
                len: 5,
                ..h.clone()
            }),
            4,
            7,
        )
        .unwrap_err();
        assert!(e.message().contains("do not add up"), "{e}");
        let mut many = received(&most);
        many[40..48].copy_from_slice(&(MAX_SEGMENTS as u64 + 1).to_le_bytes());
        let e = Header::decode(&many, 4, 7).unwrap_err();
        assert!(e.message().contains("at most 25"), "{e}");
        let e = Header::decode(
            &received(&Header {
                framed: true,
                ..h.clone()
            }),
            4,
            7,
        )
        .unwrap_err();
        assert!(e.message().contains("exactly one when framed"), "{e}");
    }

    #[test]
    fn frames_round_trip_and_bad_frames_are_refused() {
        for bufs in [
            vec![],
            vec![Bytes::new()],
            (0..40)
                .map(|i| Bytes::from(vec![i as u8; i * 3]))
                .collect::<Vec<_>>(),
        ] {
            let f = frame(&bufs);
            assert_eq!(unframe(&f, 0).unwrap(), bufs);
        }
        let f = frame(&[Bytes::from_static(b"abc"), Bytes::from_static(b"de")]);
        for bad in [
            f.slice(..f.len() - 1),
            Bytes::from([&f[..], b"x"].concat()),
            Bytes::from_static(&[1, 2, 3]),
            Bytes::from(u64::MAX.to_le_bytes().to_vec()),
        ] {
            let e = unframe(&bad, 6).unwrap_err();
            assert!(
                e.message()
                    .contains("rank 6 sent a malformed multi-buffer message"),
                "{e}"
            );
        }
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

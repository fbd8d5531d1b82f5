//! Typed messages between ranks: postcard-encoded values, and errors as
//! they travel ([`WireError`]).

use crate::error::{Error, ErrorKind, Result, WireError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Bytes> {
    postcard::to_allocvec(v)
        .map(Bytes::from)
        .map_err(|e| Error::invalid(format!("encode message: {e}")))
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T> {
    postcard::from_bytes(b).map_err(|e| {
        Error::new(
            ErrorKind::Collective,
            format!("malformed message between ranks: {e}"),
        )
    })
}

/// `e` as seen from `rank` (keeping the rank it already names, if any).
pub(crate) fn on_rank(e: &Error, rank: usize) -> Error {
    e.detached().with_rank(e.rank().unwrap_or(rank))
}

pub(crate) fn wire<T>(r: Result<T>, rank: usize) -> std::result::Result<T, WireError> {
    r.map_err(|e| {
        let e = if e.rank().is_none() {
            e.with_rank(rank)
        } else {
            e
        };
        e.to_wire()
    })
}

/// First error among per-rank results, in rank order.
pub(crate) fn first_error<T>(
    results: Vec<std::result::Result<T, WireError>>,
) -> std::result::Result<Vec<T>, WireError> {
    results.into_iter().collect()
}

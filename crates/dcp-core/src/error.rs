//! The one error type of dcp-core, with a small kind and a message that names
//! what went wrong (item, file, offset, rank).

use std::fmt;

/// What class of failure an [`Error`] is. Callers branch on this; the message
/// is for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An I/O operation on storage failed.
    Io,
    /// The storage is full, or a quota is exhausted (`ENOSPC`, `EDQUOT`):
    /// free space or write elsewhere; retrying as it is will not help.
    StorageFull,
    /// A file or item that should exist does not.
    NotFound,
    /// A checkpoint already exists and `overwrite` is off.
    AlreadyExists,
    /// Stored bytes or metadata are damaged, truncated or inconsistent.
    Corrupt,
    /// A checksum recorded at save time does not match the bytes read.
    ChecksumMismatch,
    /// The checkpoint needs a feature, version or extension this build lacks.
    Unsupported,
    /// The caller passed something invalid (shapes, dtypes, options).
    InvalidInput,
    /// Planning failed: conflicting or inconsistent items across ranks.
    Plan,
    /// Another rank failed; the message names it.
    RankFailed,
    /// A collective operation failed: a deadline passed or a rank left.
    Collective,
    /// A temporary storage failure that a retry may fix.
    Temporary,
    /// Another save holds the location's lease (the message names it: save
    /// id, host, pid, start time), or a save lost its lease or found a newer
    /// generation committed under it. Nothing of the other save was touched.
    Busy,
    /// The commit's outcome could not be decided (it failed, and `.metadata`
    /// could not be read back to tell whether it took effect). Every data
    /// file was kept; whichever `.metadata` is present loads.
    OutcomeUnknown,
}

impl ErrorKind {
    /// A stable lower-case name, used when errors cross ranks.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::StorageFull => "storage_full",
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::ChecksumMismatch => "checksum_mismatch",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Plan => "plan",
            ErrorKind::RankFailed => "rank_failed",
            ErrorKind::Collective => "collective",
            ErrorKind::Temporary => "temporary",
            ErrorKind::Busy => "busy",
            ErrorKind::OutcomeUnknown => "outcome_unknown",
        }
    }

    /// Inverse of [`ErrorKind::as_str`]; unknown names map to `Io`.
    pub fn parse(s: &str) -> ErrorKind {
        match s {
            "storage_full" => ErrorKind::StorageFull,
            "not_found" => ErrorKind::NotFound,
            "already_exists" => ErrorKind::AlreadyExists,
            "corrupt" => ErrorKind::Corrupt,
            "checksum_mismatch" => ErrorKind::ChecksumMismatch,
            "unsupported" => ErrorKind::Unsupported,
            "invalid_input" => ErrorKind::InvalidInput,
            "plan" => ErrorKind::Plan,
            "rank_failed" => ErrorKind::RankFailed,
            "collective" => ErrorKind::Collective,
            "temporary" => ErrorKind::Temporary,
            "busy" => ErrorKind::Busy,
            "outcome_unknown" => ErrorKind::OutcomeUnknown,
            _ => ErrorKind::Io,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every dcp operation: a [`ErrorKind`], a message carrying
/// context, the rank it happened on (when known), whether a retry may
/// succeed ([`Error::is_temporary`]) and an optional source. The kind, the
/// message, the rank and the temporary flag survive crossing ranks; the
/// source stays on the rank where it happened.
pub struct Error {
    kind: ErrorKind,
    message: String,
    rank: Option<usize>,
    temporary: bool,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            rank: None,
            temporary: kind == ErrorKind::Temporary,
            source: None,
        }
    }

    /// Mark whether a retry of the failed operation may succeed (a timeout,
    /// a throttled request, a connection reset) or not (a missing file, a
    /// full disk, bad input). Errors of kind [`ErrorKind::Temporary`] are
    /// temporary from the start; any other kind can be marked.
    pub fn with_temporary(mut self, temporary: bool) -> Self {
        self.temporary = temporary;
        self
    }

    /// Whether a retry may succeed. Survives crossing ranks.
    pub fn is_temporary(&self) -> bool {
        self.temporary
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Record the rank the error happened on.
    pub fn with_rank(mut self, rank: usize) -> Self {
        self.rank = Some(rank);
        self
    }

    /// Prefix the message with more context (`"{context}: {message}"`).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind or the source.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The rank the error happened on, when known.
    pub fn rank(&self) -> Option<usize> {
        self.rank
    }

    /// An I/O error on `path` during `op`.
    pub fn io(op: &str, path: &str, err: std::io::Error) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                ErrorKind::StorageFull
            }
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            std::io::ErrorKind::UnexpectedEof => ErrorKind::Corrupt,
            std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut => ErrorKind::Temporary,
            _ => ErrorKind::Io,
        };
        Error::new(kind, format!("{op} {path}: {err}")).with_source(err)
    }

    /// Shorthand for a [`ErrorKind::Corrupt`] error.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    /// Shorthand for an [`ErrorKind::InvalidInput`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// Shorthand for an [`ErrorKind::Unsupported`] error.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for an [`ErrorKind::Plan`] error.
    pub fn plan(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Plan, message)
    }

    /// A copy of everything that crosses ranks (kind, message, rank,
    /// temporary flag), without the source.
    pub(crate) fn detached(&self) -> Error {
        Error {
            kind: self.kind,
            message: self.message.clone(),
            rank: self.rank,
            temporary: self.temporary,
            source: None,
        }
    }

    /// Encode as a small wire form so an error can travel between ranks.
    pub(crate) fn to_wire(&self) -> WireError {
        WireError {
            kind: self.kind.as_str().to_string(),
            message: self.message.clone(),
            rank: self.rank.map(|r| r as u64),
            temporary: self.temporary,
        }
    }

    /// Rebuild an error that travelled between ranks.
    pub(crate) fn from_wire(w: WireError) -> Self {
        let mut e = Error::new(ErrorKind::parse(&w.kind), w.message);
        e.rank = w.rank.map(|r| r as usize);
        e.temporary = w.temporary;
        e
    }
}

/// An error as it travels between ranks.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct WireError {
    pub kind: String,
    pub message: String,
    pub rank: Option<u64>,
    pub temporary: bool,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(rank) = self.rank {
            if self.kind != ErrorKind::RankFailed {
                write!(f, "rank {rank}: ")?;
            }
        }
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(rank) = self.rank {
            d.field("rank", &rank);
        }
        if self.temporary {
            d.field("temporary", &true);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl From<postcard::Error> for Error {
    fn from(e: postcard::Error) -> Self {
        Error::corrupt(format!("decode: {e}")).with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_disks_are_a_kind_of_their_own() {
        for raw in [28 /* ENOSPC */, 122 /* EDQUOT */] {
            let e = Error::io("write", "/x", std::io::Error::from_raw_os_error(raw));
            assert_eq!(e.kind(), ErrorKind::StorageFull, "{e}");
            assert!(!e.is_temporary());
        }
        let e = Error::io(
            "read",
            "/x",
            std::io::Error::from(std::io::ErrorKind::TimedOut),
        );
        assert_eq!(e.kind(), ErrorKind::Temporary);
        assert!(e.is_temporary());
    }

    #[test]
    fn kind_rank_and_temporary_survive_the_wire() {
        let e = Error::new(ErrorKind::Io, "connection reset")
            .with_temporary(true)
            .with_rank(3);
        let back = Error::from_wire(e.to_wire());
        assert_eq!(
            (
                back.kind(),
                back.message(),
                back.rank(),
                back.is_temporary()
            ),
            (ErrorKind::Io, "connection reset", Some(3), true)
        );
        for kind in [ErrorKind::Busy, ErrorKind::OutcomeUnknown] {
            let back = Error::from_wire(Error::new(kind, "x").to_wire());
            assert_eq!(back.kind(), kind);
        }
        let full = Error::from_wire(Error::new(ErrorKind::StorageFull, "disk").to_wire());
        assert_eq!(full.kind(), ErrorKind::StorageFull);
        assert!(!full.is_temporary());
        let d = e.detached();
        assert_eq!(
            (d.kind(), d.rank(), d.is_temporary()),
            (ErrorKind::Io, Some(3), true)
        );
    }
}

//! A small file read together with the version a conditional write can
//! compare against: the one primitive behind the commit's compare-and-swap
//! and the lease's renewal and breaking.

use crate::error::{ErrorKind, Result};
use crate::storage::FileSystem;

/// A small file as read, with its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Versioned {
    /// The content; `None` when the file did not exist.
    pub bytes: Option<Vec<u8>>,
    /// The version the content was read at, for
    /// [`FileSystem::replace_if`]: `None` when the store has no conditional
    /// replace; `Some(None)` when the file did not exist.
    ///
    /// The version is taken before the content: a replacement in between
    /// leaves an older version beside newer content, so a conditional write
    /// based on it fails (and is retried), never succeeds over a file it
    /// did not see.
    pub version: Option<Option<String>>,
}

/// Read `name` (at most `max_len` bytes) with its version.
pub(crate) fn read_versioned(fs: &dyn FileSystem, name: &str, max_len: u64) -> Result<Versioned> {
    let version = match fs.version(name) {
        Ok(v) => Some(v),
        Err(e) if e.kind() == ErrorKind::Unsupported => None,
        Err(e) => return Err(e),
    };
    let bytes = match fs.read_small(name, max_len) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    Ok(Versioned { bytes, version })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemoryFs;

    #[test]
    fn a_replacement_after_the_read_makes_the_conditional_write_fail() {
        let fs = MemoryFs::new("memory://v");
        let absent = read_versioned(&fs, "f", 100).unwrap();
        assert_eq!(absent.bytes, None);
        assert_eq!(absent.version, Some(None));
        assert!(fs.replace_if("f", b"one", false, None).unwrap());
        assert!(!fs.replace_if("f", b"two", false, None).unwrap(), "exists");
        let one = read_versioned(&fs, "f", 100).unwrap();
        assert_eq!(one.bytes.as_deref(), Some(&b"one"[..]));
        let v = one.version.clone().unwrap();
        assert!(v.is_some());
        fs.write_atomic("f", b"other", false).unwrap();
        assert!(!fs.replace_if("f", b"two", false, v.as_deref()).unwrap());
        assert_eq!(fs.get("f").unwrap(), b"other", "nothing written");
        let now = read_versioned(&fs, "f", 100).unwrap().version.unwrap();
        assert!(fs.replace_if("f", b"two", false, now.as_deref()).unwrap());
        assert_eq!(fs.get("f").unwrap(), b"two");
    }
}

//! The exclusive directory lock under which a conditional replace compares
//! and renames ([`FileSystem::replace_if`](dcp_core::FileSystem::replace_if)),
//! and the version tag it compares.
//!
//! POSIX has no compare-and-rename. dcp's conditional replaces of one
//! location take an exclusive `flock(2)` on its directory around the compare
//! and the rename, so two of them (in any processes of this host, or of any
//! NFS client whose mount has working locks) never interleave. Plain writers
//! that do not take the lock are not held back: the lock orders dcp's
//! commits and lease changes, which are the only writers of `.metadata` and
//! `.lease`.

use dcp_core::{Error, ErrorKind, Result};
use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a conditional replace waits for the directory lock before it
/// fails with [`ErrorKind::Busy`].
pub const DIR_LOCK_WAIT: Duration = Duration::from_secs(30);

/// An exclusive lock on a directory, released when dropped (the descriptor
/// closes). `None` inside: the file system has no `flock` (some FUSE file
/// systems); the caller then runs unlocked, as on a store without
/// conditional writes.
#[derive(Debug)]
pub(crate) struct DirLock(#[allow(dead_code)] Option<File>);

impl DirLock {
    /// Lock `dir` exclusively, waiting up to [`DIR_LOCK_WAIT`].
    pub(crate) fn acquire(dir: &Path, show: &str) -> Result<DirLock> {
        let file = File::open(dir).map_err(|e| Error::io("open directory", show, e))?;
        let deadline = Instant::now() + DIR_LOCK_WAIT;
        let mut pause = Duration::from_micros(200);
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(DirLock(Some(file))),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "the directory lock of {show} was held by another process for more than {DIR_LOCK_WAIT:?}"
                        ),
                    ))
                }
                Err(rustix::io::Errno::NOLCK | rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
                    tracing::warn!(
                        "{show} has no working flock: conditional replaces run unlocked there"
                    );
                    return Ok(DirLock(None));
                }
                Err(e) => return Err(Error::io("lock directory", show, e.into())),
            }
        }
    }
}

/// The version tag of a regular file: device, inode, size, and modification
/// and change times to the nanosecond. A rename over the file (every
/// replacement dcp makes) gives a new inode and new times; an inode number
/// reused with the same size and the same nanosecond times is what it would
/// take to confuse two versions.
pub(crate) fn version_tag(md: &Metadata) -> String {
    format!(
        "{:x}-{:x}-{}-{}.{:09}-{}.{:09}",
        md.dev(),
        md.ino(),
        md.len(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_excludes_a_second_holder_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = DirLock::acquire(dir.path(), "d").unwrap();
        assert!(a.0.is_some(), "tmpfs and ext4 have flock");
        // A second descriptor (as another process would hold) is refused
        // while the first holds the lock...
        let other = File::open(dir.path()).unwrap();
        let e = rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .unwrap_err();
        assert_eq!(e, rustix::io::Errno::WOULDBLOCK);
        drop(a);
        // ...and granted once it is dropped.
        rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    }
}

//! A forwarding base for [`FileSystem`] wrappers.
//!
//! A wrapper (fault injection, recording, metering, caching) implements
//! [`FileSystemLayer`] instead of [`FileSystem`]: it names its inner file
//! system once, in [`FileSystemLayer::inner`], and overrides only the
//! methods it changes. Every other method forwards to the inner file system,
//! *including* the ones [`FileSystem`] gives a default body
//! ([`FileSystem::read_scattered`], [`FileSystem::read_if_cached`],
//! [`FileSystem::read_small`]). A wrapper written against `FileSystem`
//! directly silently replaces the inner backend's fast path (`preadv`, a
//! page-cache probe) with the trait's generic default; a layer cannot.
//!
//! Every type that implements `FileSystemLayer` is a `FileSystem` through a
//! blanket impl that calls the layer's method for every `FileSystem` method.
//! Backends (`dcp_fs::LocalFs`, `dcp_fsspec::OpendalFs`, [`MemoryFs`])
//! implement `FileSystem` directly; the two impls do not overlap, as with
//! `Display` and `ToString`.
//!
//! Modelled on OpenDAL's `LayeredAccess`.
//!
//! ```
//! use dcp_core::layer::FileSystemLayer;
//! use dcp_core::{mem::MemoryFs, FileSystem, Result};
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//!
//! /// Counts `read_into` calls; everything else, `read_scattered` included,
//! /// goes to the inner file system untouched.
//! #[derive(Debug)]
//! struct CountReads {
//!     inner: Arc<dyn FileSystem>,
//!     reads: AtomicU64,
//! }
//!
//! impl FileSystemLayer for CountReads {
//!     fn inner(&self) -> &dyn FileSystem {
//!         &*self.inner
//!     }
//!     fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
//!         self.reads.fetch_add(1, Ordering::Relaxed);
//!         self.inner.read_into(name, offset, buf)
//!     }
//! }
//!
//! let fs: Arc<dyn FileSystem> = Arc::new(CountReads {
//!     inner: Arc::new(MemoryFs::new("memory://layer")),
//!     reads: AtomicU64::new(0),
//! });
//! assert_eq!(fs.location(), "memory://layer");
//! ```
//!
//! [`MemoryFs`]: crate::mem::MemoryFs

use crate::error::Result;
use crate::storage::{Capabilities, FileEntry, FileSink, FileSystem};
use std::fmt;
use std::io::IoSliceMut;

/// A [`FileSystem`] wrapper that forwards every method it does not override
/// to [`FileSystemLayer::inner`]. See the [module docs](self).
///
/// There is one method per `FileSystem` method, with the same signature and
/// contract; each default calls the same method of the inner file system.
/// When a method is added to `FileSystem`, it must be added here too (with a
/// forwarding default) and to the blanket impl below, or wrappers would fall
/// back to `FileSystem`'s default instead of the inner backend's method.
pub trait FileSystemLayer: Send + Sync + fmt::Debug + 'static {
    /// The wrapped file system, which receives every call this layer does
    /// not override.
    fn inner(&self) -> &dyn FileSystem;

    /// [`FileSystem::location`]; forwarded by default.
    fn location(&self) -> String {
        self.inner().location()
    }

    /// [`FileSystem::capabilities`]; forwarded by default.
    fn capabilities(&self) -> Capabilities {
        self.inner().capabilities()
    }

    /// [`FileSystem::prepare`]; forwarded by default.
    fn prepare(&self) -> Result<()> {
        self.inner().prepare()
    }

    /// [`FileSystem::create`]; forwarded by default.
    fn create(&self, name: &str) -> Result<Box<dyn FileSink>> {
        self.inner().create(name)
    }

    /// [`FileSystem::read_into`]; forwarded by default.
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner().read_into(name, offset, buf)
    }

    /// [`FileSystem::read_scattered`]; forwarded by default, so the inner
    /// backend's scattered read (`preadv` on local disk) runs, not the
    /// trait's read-and-copy default.
    fn read_scattered(&self, name: &str, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.inner().read_scattered(name, offset, bufs)
    }

    /// [`FileSystem::read_if_cached`]; forwarded by default, so the inner
    /// backend's page-cache probe answers, not the trait's `Ok(false)`.
    fn read_if_cached(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.inner().read_if_cached(name, offset, buf)
    }

    /// [`FileSystem::read_requests_in_flight`]; forwarded by default.
    fn read_requests_in_flight(&self) -> usize {
        self.inner().read_requests_in_flight()
    }

    /// [`FileSystem::read_request_size`]; forwarded by default.
    fn read_request_size(&self) -> Option<u64> {
        self.inner().read_request_size()
    }

    /// [`FileSystem::file_len`]; forwarded by default.
    fn file_len(&self, name: &str) -> Result<Option<u64>> {
        self.inner().file_len(name)
    }

    /// [`FileSystem::write_atomic`]; forwarded by default.
    fn write_atomic(&self, name: &str, data: &[u8], sync: bool) -> Result<()> {
        self.inner().write_atomic(name, data, sync)
    }

    /// [`FileSystem::create_new`]; forwarded by default.
    fn create_new(&self, name: &str, data: &[u8], sync: bool) -> Result<bool> {
        self.inner().create_new(name, data, sync)
    }

    /// [`FileSystem::version`]; forwarded by default.
    fn version(&self, name: &str) -> Result<Option<String>> {
        self.inner().version(name)
    }

    /// [`FileSystem::replace_if`]; forwarded by default.
    fn replace_if(
        &self,
        name: &str,
        data: &[u8],
        sync: bool,
        expected: Option<&str>,
    ) -> Result<bool> {
        self.inner().replace_if(name, data, sync, expected)
    }

    /// [`FileSystem::list`]; forwarded by default.
    fn list(&self) -> Result<Vec<FileEntry>> {
        self.inner().list()
    }

    /// [`FileSystem::remove`]; forwarded by default.
    fn remove(&self, name: &str) -> Result<()> {
        self.inner().remove(name)
    }

    /// [`FileSystem::sync_dir`]; forwarded by default.
    fn sync_dir(&self) -> Result<()> {
        self.inner().sync_dir()
    }

    /// [`FileSystem::read_small`]; forwarded by default (the inner file
    /// system's own `read_small`, not `file_len` plus `read_into` through
    /// this layer: a layer that counts or fails those must override this
    /// too).
    fn read_small(&self, name: &str, max_len: u64) -> Result<Vec<u8>> {
        self.inner().read_small(name, max_len)
    }
}

/// Every layer is a file system: each `FileSystem` method, including those
/// with a default body, calls the layer's method of the same name.
impl<L: FileSystemLayer> FileSystem for L {
    fn location(&self) -> String {
        FileSystemLayer::location(self)
    }
    fn capabilities(&self) -> Capabilities {
        FileSystemLayer::capabilities(self)
    }
    fn prepare(&self) -> Result<()> {
        FileSystemLayer::prepare(self)
    }
    fn create(&self, name: &str) -> Result<Box<dyn FileSink>> {
        FileSystemLayer::create(self, name)
    }
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        FileSystemLayer::read_into(self, name, offset, buf)
    }
    fn read_scattered(&self, name: &str, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        FileSystemLayer::read_scattered(self, name, offset, bufs)
    }
    fn read_if_cached(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<bool> {
        FileSystemLayer::read_if_cached(self, name, offset, buf)
    }
    fn file_len(&self, name: &str) -> Result<Option<u64>> {
        FileSystemLayer::file_len(self, name)
    }
    fn read_requests_in_flight(&self) -> usize {
        FileSystemLayer::read_requests_in_flight(self)
    }
    fn read_request_size(&self) -> Option<u64> {
        FileSystemLayer::read_request_size(self)
    }
    fn write_atomic(&self, name: &str, data: &[u8], sync: bool) -> Result<()> {
        FileSystemLayer::write_atomic(self, name, data, sync)
    }
    fn create_new(&self, name: &str, data: &[u8], sync: bool) -> Result<bool> {
        FileSystemLayer::create_new(self, name, data, sync)
    }
    fn version(&self, name: &str) -> Result<Option<String>> {
        FileSystemLayer::version(self, name)
    }
    fn replace_if(
        &self,
        name: &str,
        data: &[u8],
        sync: bool,
        expected: Option<&str>,
    ) -> Result<bool> {
        FileSystemLayer::replace_if(self, name, data, sync, expected)
    }
    fn list(&self) -> Result<Vec<FileEntry>> {
        FileSystemLayer::list(self)
    }
    fn remove(&self, name: &str) -> Result<()> {
        FileSystemLayer::remove(self, name)
    }
    fn sync_dir(&self) -> Result<()> {
        FileSystemLayer::sync_dir(self)
    }
    fn read_small(&self, name: &str, max_len: u64) -> Result<Vec<u8>> {
        FileSystemLayer::read_small(self, name, max_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::{Arc, Mutex};

    /// Every `FileSystem` method, in declaration order. Add a new method
    /// here when it is added to the trait: the test then fails until the
    /// layer forwards it.
    const METHODS: [&str; 18] = [
        "location",
        "capabilities",
        "prepare",
        "create",
        "read_into",
        "read_scattered",
        "read_if_cached",
        "file_len",
        "write_atomic",
        "create_new",
        "version",
        "replace_if",
        "list",
        "remove",
        "sync_dir",
        "read_small",
        "read_requests_in_flight",
        "read_request_size",
    ];

    /// A file system whose every method (the defaulted ones too) records
    /// its name and returns something recognisable.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Mutex<Vec<&'static str>>,
    }

    impl Recorder {
        fn record(&self, m: &'static str) {
            self.calls.lock().unwrap().push(m);
        }
    }

    struct NullSink;
    impl FileSink for NullSink {
        fn write(&mut self, _buf: Bytes) -> Result<()> {
            Ok(())
        }
        fn finish(self: Box<Self>, _sync: bool) -> Result<u64> {
            Ok(0)
        }
        fn abort(self: Box<Self>) {}
    }

    impl FileSystem for Recorder {
        fn location(&self) -> String {
            self.record("location");
            "recorder://".into()
        }
        fn capabilities(&self) -> Capabilities {
            self.record("capabilities");
            Capabilities {
                durable_sync: false,
                atomic_replace: true,
                list: false,
            }
        }
        fn prepare(&self) -> Result<()> {
            self.record("prepare");
            Ok(())
        }
        fn create(&self, _name: &str) -> Result<Box<dyn FileSink>> {
            self.record("create");
            Ok(Box::new(NullSink))
        }
        fn read_into(&self, _name: &str, _offset: u64, buf: &mut [u8]) -> Result<()> {
            self.record("read_into");
            buf.fill(1);
            Ok(())
        }
        fn read_scattered(
            &self,
            _name: &str,
            _offset: u64,
            bufs: &mut [IoSliceMut<'_>],
        ) -> Result<()> {
            self.record("read_scattered");
            for b in bufs.iter_mut() {
                b.fill(2);
            }
            Ok(())
        }
        fn read_if_cached(&self, _name: &str, _offset: u64, buf: &mut [u8]) -> Result<bool> {
            self.record("read_if_cached");
            buf.fill(3);
            Ok(true)
        }
        fn file_len(&self, _name: &str) -> Result<Option<u64>> {
            self.record("file_len");
            Ok(Some(42))
        }
        fn write_atomic(&self, _name: &str, _data: &[u8], _sync: bool) -> Result<()> {
            self.record("write_atomic");
            Ok(())
        }
        fn create_new(&self, _name: &str, _data: &[u8], _sync: bool) -> Result<bool> {
            self.record("create_new");
            Ok(true)
        }
        fn version(&self, _name: &str) -> Result<Option<String>> {
            self.record("version");
            Ok(Some("v7".into()))
        }
        fn replace_if(
            &self,
            _name: &str,
            _data: &[u8],
            _sync: bool,
            expected: Option<&str>,
        ) -> Result<bool> {
            self.record("replace_if");
            Ok(expected == Some("v7"))
        }
        fn list(&self) -> Result<Vec<FileEntry>> {
            self.record("list");
            Ok(vec![FileEntry {
                name: "f".into(),
                length: 7,
            }])
        }
        fn remove(&self, _name: &str) -> Result<()> {
            self.record("remove");
            Ok(())
        }
        fn sync_dir(&self) -> Result<()> {
            self.record("sync_dir");
            Ok(())
        }
        fn read_small(&self, _name: &str, _max_len: u64) -> Result<Vec<u8>> {
            self.record("read_small");
            Ok(vec![4; 5])
        }
        fn read_requests_in_flight(&self) -> usize {
            self.record("read_requests_in_flight");
            6
        }
        fn read_request_size(&self) -> Option<u64> {
            self.record("read_request_size");
            Some(9)
        }
    }

    /// A layer that overrides nothing.
    #[derive(Debug)]
    struct PassThrough(Arc<Recorder>);

    impl FileSystemLayer for PassThrough {
        fn inner(&self) -> &dyn FileSystem {
            &*self.0
        }
    }

    #[test]
    fn a_layer_that_overrides_nothing_forwards_every_method() {
        let rec = Arc::new(Recorder::default());
        // Called as a `dyn FileSystem`, as the pipeline does.
        let fs: Arc<dyn FileSystem> = Arc::new(PassThrough(rec.clone()));

        assert_eq!(fs.location(), "recorder://");
        assert!(!fs.capabilities().durable_sync);
        fs.prepare().unwrap();
        let sink = fs.create("f").unwrap();
        assert_eq!(sink.finish(false).unwrap(), 0);
        let mut buf = [0u8; 4];
        fs.read_into("f", 0, &mut buf).unwrap();
        assert_eq!(buf, [1; 4]);
        let (mut a, mut b) = ([0u8; 2], [0u8; 3]);
        fs.read_scattered(
            "f",
            0,
            &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)],
        )
        .unwrap();
        assert_eq!((a, b), ([2; 2], [2; 3]), "not the trait's read-and-copy");
        assert!(fs.read_if_cached("f", 0, &mut buf).unwrap());
        assert_eq!(buf, [3; 4], "not the trait's Ok(false)");
        assert_eq!(fs.file_len("f").unwrap(), Some(42));
        fs.write_atomic("f", b"x", true).unwrap();
        assert!(fs.create_new("f", b"x", true).unwrap());
        assert_eq!(fs.version("f").unwrap().as_deref(), Some("v7"));
        assert!(
            fs.replace_if("f", b"y", true, Some("v7")).unwrap(),
            "not the trait's refusal"
        );
        assert_eq!(fs.list().unwrap().len(), 1);
        fs.remove("f").unwrap();
        fs.sync_dir().unwrap();
        assert_eq!(fs.read_small("f", 10).unwrap(), vec![4; 5]);
        assert_eq!(fs.read_requests_in_flight(), 6, "not the trait's 1");
        assert_eq!(fs.read_request_size(), Some(9), "not the trait's None");

        let calls = rec.calls.lock().unwrap().clone();
        assert_eq!(calls, METHODS, "the inner file system saw exactly these");
    }

    /// A layer over a layer still reaches the innermost file system.
    #[test]
    fn layers_stack() {
        #[derive(Debug)]
        struct Outer(PassThrough);
        impl FileSystemLayer for Outer {
            fn inner(&self) -> &dyn FileSystem {
                &self.0
            }
            fn location(&self) -> String {
                format!("outer+{}", FileSystem::location(&self.0))
            }
        }
        let rec = Arc::new(Recorder::default());
        let fs = Outer(PassThrough(rec.clone()));
        assert_eq!(FileSystem::location(&fs), "outer+recorder://");
        let mut buf = [0u8; 1];
        FileSystem::read_scattered(&fs, "f", 0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(buf, [2]);
        assert_eq!(
            *rec.calls.lock().unwrap(),
            ["location", "read_scattered"],
            "each call reached the recorder once"
        );
    }
}

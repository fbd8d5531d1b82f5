//! Progress bars on stderr: shown only when stderr is a terminal and
//! `--quiet` was not given; otherwise every bar is hidden and nothing extra
//! is written (piped stderr stays clean for scripts and logs).
//!
//! Bars follow real bytes: [`Metered`] wraps a checkpoint's
//! [`FileSystem`] and advances a bar by every byte a save writes or a load,
//! `verify` or `convert` reads through it; the safetensors export advances
//! its bar by every byte it writes ([`dcp::hf::ExportOptions::on_progress`]).

use bytes::Bytes;
use dcp_core::{FileSink, FileSystem, FileSystemLayer, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, WeakProgressBar};
use std::io::{IoSliceMut, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The bar drawn last (a bar on screen at a time), for [`LogWriter`].
static CURRENT: Mutex<Option<WeakProgressBar>> = Mutex::new(None);

/// Tracing output (`--log`, `RUST_LOG`) on stderr that does not tear a
/// bar: while one is drawn, each line is written with the bar cleared and
/// redrawn after it (indicatif's `suspend`).
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let live = CURRENT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(WeakProgressBar::upgrade)
            .filter(|b| !b.is_finished());
        match live {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Set by `--quiet`: no bars, no phase lines.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Silence (or not) every bar and phase line of this process (`--quiet`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether `--quiet` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Whether bars are drawn: stderr is a terminal and `--quiet` was not given.
pub fn enabled() -> bool {
    !quiet() && std::io::stderr().is_terminal()
}

/// A byte bar of `total` bytes labelled `what` (`saving`, `verifying`),
/// drawn on stderr when [`enabled`], hidden (drawing nothing) otherwise.
/// A `total` of 0 means not known yet: set it with `set_length`.
pub fn bar(total: u64, what: &str) -> ProgressBar {
    if !enabled() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(10));
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{bar:32}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar.downgrade());
    // Drawn at once when the total is known; else at the first bytes (the
    // caller sets the length then).
    if total > 0 {
        bar.tick();
    }
    bar
}

/// A [`FileSystem`] that advances a bar by the bytes written through it
/// (file sinks) and read from it (ranged, scattered and cached reads).
/// Everything else goes to the inner file system untouched.
#[derive(Debug)]
pub struct Metered {
    inner: Arc<dyn FileSystem>,
    bar: ProgressBar,
}

impl Metered {
    /// `inner` metered into `bar`; when bars are off (see [`enabled`]),
    /// `inner` itself, so a plain run pays nothing.
    pub fn wrap(inner: Arc<dyn FileSystem>, bar: &ProgressBar) -> Arc<dyn FileSystem> {
        if bar.is_hidden() {
            return inner;
        }
        Arc::new(Metered {
            inner,
            bar: bar.clone(),
        })
    }
}

impl FileSystemLayer for Metered {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }

    fn create(&self, name: &str) -> Result<Box<dyn FileSink>> {
        Ok(Box::new(MeteredSink {
            inner: self.inner.create(name)?,
            bar: self.bar.clone(),
        }))
    }

    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_into(name, offset, buf)?;
        self.bar.inc(buf.len() as u64);
        Ok(())
    }

    fn read_scattered(&self, name: &str, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.inner.read_scattered(name, offset, bufs)?;
        self.bar.inc(bufs.iter().map(|b| b.len() as u64).sum());
        Ok(())
    }

    fn read_if_cached(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let hit = self.inner.read_if_cached(name, offset, buf)?;
        if hit {
            self.bar.inc(buf.len() as u64);
        }
        Ok(hit)
    }
}

/// A file sink that advances a bar by every buffer written.
struct MeteredSink {
    inner: Box<dyn FileSink>,
    bar: ProgressBar,
}

impl FileSink for MeteredSink {
    fn expect_len(&mut self, len: u64) {
        self.inner.expect_len(len)
    }
    fn keeps_bytes(&self) -> bool {
        self.inner.keeps_bytes()
    }
    fn write(&mut self, buf: Bytes) -> Result<()> {
        let n = buf.len() as u64;
        self.inner.write(buf)?;
        self.bar.inc(n);
        Ok(())
    }

    fn finish(self: Box<Self>, sync: bool) -> Result<u64> {
        self.inner.finish(sync)
    }

    fn abort(self: Box<Self>) {
        self.inner.abort()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcp_core::mem::MemoryFs;

    #[test]
    fn metered_counts_bytes_written_and_read() {
        let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::hidden());
        // A hidden bar is not metered (nothing to draw).
        let inner: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://metered-hidden"));
        assert!(Arc::ptr_eq(&Metered::wrap(inner.clone(), &bar), &inner));

        let bar = ProgressBar::with_draw_target(
            Some(100),
            ProgressDrawTarget::term_like(Box::new(NullTerm)),
        );
        let fs = Metered::wrap(Arc::new(MemoryFs::new("memory://metered")), &bar);
        let mut sink = fs.create("a").unwrap();
        sink.write(Bytes::from_static(b"0123456789")).unwrap();
        sink.write(Bytes::from_static(b"abc")).unwrap();
        assert_eq!(sink.finish(false).unwrap(), 13);
        assert_eq!(bar.position(), 13);
        let mut buf = [0u8; 4];
        fs.read_into("a", 9, &mut buf).unwrap();
        assert_eq!(&buf, b"9abc");
        assert_eq!(bar.position(), 17);
        let (mut x, mut y) = ([0u8; 2], [0u8; 3]);
        fs.read_scattered(
            "a",
            0,
            &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
        )
        .unwrap();
        assert_eq!((&x, &y), (b"01", b"234"));
        assert_eq!(bar.position(), 22);
        // A failed read counts nothing.
        assert!(fs.read_into("missing", 0, &mut buf).is_err());
        assert_eq!(bar.position(), 22);
    }

    /// A terminal that discards what is drawn (so the bar is not hidden).
    #[derive(Debug)]
    struct NullTerm;

    impl indicatif::TermLike for NullTerm {
        fn width(&self) -> u16 {
            80
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, _: &str) -> std::io::Result<()> {
            Ok(())
        }
        fn write_str(&self, _: &str) -> std::io::Result<()> {
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }
}

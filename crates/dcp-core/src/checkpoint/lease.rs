//! The lease a save holds on its location: one writer at a time.
//!
//! The coordinator of a save creates [`LEASE_FILE`] with
//! [`FileSystem::create_new`] before any rank writes, renews it on a
//! background thread while the save runs, checks it just before the commit,
//! and removes it at the end, whatever the outcome. A second save finds the
//! file and fails with [`ErrorKind::Busy`] naming the holder, or waits
//! ([`WriterOptions::lease_wait`](crate::WriterOptions::lease_wait)). A lease
//! whose holder is dead (past its expiry, or held by a process of this host
//! that no longer exists, or by a save of this process that has ended) is
//! broken, with a warning naming it.

use crate::checkpoint::versioned::read_versioned;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::FileSystem;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Name of the lease file in a checkpoint location.
pub const LEASE_FILE: &str = ".lease";

/// The largest lease file read (a lease is about 150 bytes of JSON).
const MAX_LEASE_LEN: u64 = 64 << 10;

/// A lease is removed at release only with at least this long left before
/// it expires (see [`Lease::release`]).
const RELEASE_MARGIN: Duration = Duration::from_secs(1);

/// Save ids of the saves of this process that hold a lease now: a lease of
/// this host and pid whose save id is not here belongs to a save that ended.
static LIVE: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn live() -> std::sync::MutexGuard<'static, Option<HashSet<String>>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a lease file holds: who holds the location, since when, until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// The holder's save id.
    pub save_id: String,
    /// The holder's host name.
    pub host: String,
    /// The holder's process id on `host`.
    pub pid: u32,
    /// When the holder took the lease, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// When the lease expires unless renewed, in milliseconds since the Unix
    /// epoch.
    pub expires_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// This machine's host name (`uname`), or `unknown`.
pub(crate) fn host_name() -> String {
    let u = rustix::system::uname();
    let n = u.nodename().to_string_lossy().into_owned();
    if n.is_empty() {
        "unknown".into()
    } else {
        n
    }
}

/// Whether process `pid` of this host exists (`kill(pid, 0)`; `EPERM`
/// means it exists under another user).
fn pid_alive(pid: u32) -> bool {
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match rustix::process::test_kill_process(p) {
        Ok(()) => true,
        Err(e) => e != rustix::io::Errno::SRCH,
    }
}

impl LeaseInfo {
    /// A lease for `save_id` held by this process from now, expiring after
    /// `expiry`.
    fn new(save_id: &str, expiry: Duration) -> LeaseInfo {
        let now = now_ms();
        LeaseInfo {
            save_id: save_id.to_string(),
            host: host_name(),
            pid: std::process::id(),
            started_ms: now,
            expires_ms: now.saturating_add(expiry.as_millis() as u64),
        }
    }

    /// Parse a lease file; `Corrupt` when it is not one.
    pub fn decode(bytes: &[u8]) -> Result<LeaseInfo> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(format!("{LEASE_FILE} is not a dcp lease: {e}")))
    }

    /// The lease file's bytes (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a lease encodes")
    }

    /// This machine's host name, as leases record it (`uname`'s node name,
    /// or `unknown`).
    pub fn local_host() -> String {
        host_name()
    }

    /// Why the holder is dead, or `None` if it may be alive: past its
    /// expiry; a process of this host that no longer exists; a save of this
    /// process that has ended.
    pub fn dead_because(&self) -> Option<String> {
        let now = now_ms();
        if now > self.expires_ms {
            return Some(format!("it expired {} ms ago", now - self.expires_ms));
        }
        if self.host == host_name() {
            if self.pid == std::process::id() {
                let live = live();
                if !live.as_ref().is_some_and(|s| s.contains(&self.save_id)) {
                    return Some("its save in this process has ended".into());
                }
            } else if !pid_alive(self.pid) {
                return Some(format!(
                    "process {} no longer exists on this host",
                    self.pid
                ));
            }
        }
        None
    }

    /// The holder, for messages: save id, host, pid, start time.
    pub fn describe(&self) -> String {
        let age = now_ms().saturating_sub(self.started_ms);
        format!(
            "save {} of pid {} on host {}, started at {} ms since the Unix epoch ({:.1} s ago), lease expiring at {} ms",
            self.save_id,
            self.pid,
            self.host,
            self.started_ms,
            age as f64 / 1000.0,
            self.expires_ms
        )
    }
}

/// Read the lease file: `None` when there is none.
fn read(fs: &dyn FileSystem) -> Result<Option<Vec<u8>>> {
    match fs.read_small(LEASE_FILE, MAX_LEASE_LEN) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A lease held by a save of this process. Renewed on a background thread
/// until [`Lease::release`] (or drop).
#[derive(Debug)]
pub(crate) struct Lease {
    fs: Arc<dyn FileSystem>,
    save_id: String,
    lost: Arc<AtomicBool>,
    stop: Option<mpsc::Sender<()>>,
    renewer: Option<JoinHandle<()>>,
}

impl Lease {
    /// Take the lease of `fs`'s location for `save_id`: create it if free,
    /// break it if its holder is dead, otherwise wait up to `wait` (if any)
    /// and then fail with `Busy` naming the holder. Blocking.
    pub(crate) fn acquire(
        fs: Arc<dyn FileSystem>,
        save_id: &str,
        expiry: Duration,
        wait: Option<Duration>,
        sync: bool,
    ) -> Result<Lease> {
        if expiry < Duration::from_secs(3) {
            return Err(Error::invalid(format!(
                "lease_expiry {expiry:?} is under the minimum of 3 s"
            )));
        }
        let deadline = wait.map(|w| Instant::now() + w);
        let mut pause = Duration::from_millis(5);
        loop {
            // Registered first: from the moment the file exists, this
            // process must see the lease as live.
            live()
                .get_or_insert_with(HashSet::new)
                .insert(save_id.to_string());
            let info = LeaseInfo::new(save_id, expiry);
            let created = fs.create_new(LEASE_FILE, &info.encode(), sync);
            if let Ok(true) = created {
                return Ok(Lease::start(fs, save_id, expiry, expiry / 3));
            }
            forget(save_id);
            created?;
            let snap = read_versioned(fs.as_ref(), LEASE_FILE, MAX_LEASE_LEN)?;
            let holder = match snap.bytes {
                None => continue, // released in between: try again
                Some(bytes) => match LeaseInfo::decode(&bytes) {
                    // A create whose reply was lost and was retried: the
                    // lease is this save's own.
                    Ok(h) if h.save_id == save_id => {
                        live()
                            .get_or_insert_with(HashSet::new)
                            .insert(save_id.to_string());
                        return Ok(Lease::start(fs, save_id, expiry, expiry / 3));
                    }
                    Ok(h) => {
                        if let Some(why) = h.dead_because() {
                            tracing::warn!(
                                location = %fs.location(),
                                "breaking the lease of {}: {why}",
                                h.describe()
                            );
                            if let Some(version) = snap.version {
                                // Replace exactly the lease judged dead by
                                // this save's, in one conditional write: a
                                // concurrent breaker or a renewal makes it
                                // fail, and the loop judges what is there.
                                live()
                                    .get_or_insert_with(HashSet::new)
                                    .insert(save_id.to_string());
                                let info = LeaseInfo::new(save_id, expiry);
                                match fs.replace_if(
                                    LEASE_FILE,
                                    &info.encode(),
                                    sync,
                                    version.as_deref(),
                                ) {
                                    Ok(true) => {
                                        return Ok(Lease::start(fs, save_id, expiry, expiry / 3))
                                    }
                                    Ok(false) => {}
                                    Err(e) => {
                                        forget(save_id);
                                        return Err(e.context("break a dead lease"));
                                    }
                                }
                                forget(save_id);
                            } else if read(fs.as_ref())?.as_deref() == Some(&bytes[..]) {
                                // No conditional replace: remove only the
                                // lease judged dead (if it was replaced in
                                // between, judge the new one). Two breakers
                                // of one dead lease may still race here; see
                                // RELIABILITY.md.
                                fs.remove(LEASE_FILE)?;
                            }
                            continue;
                        }
                        h.describe()
                    }
                    Err(e) => format!(
                        "an unreadable lease ({}); if no save is running, remove {LEASE_FILE}",
                        e.message()
                    ),
                },
            };
            match deadline {
                Some(d) if Instant::now() < d => {
                    std::thread::sleep(pause.min(d.saturating_duration_since(Instant::now())));
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
                _ => {
                    let waited = match wait {
                        Some(w) => format!(" (waited {w:?})"),
                        None => String::new(),
                    };
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "another save is writing to {}{waited}: {holder}",
                            fs.location()
                        ),
                    ));
                }
            }
        }
    }

    /// A held lease, renewed every `every` (a third of `expiry` outside
    /// tests) by extending it to `expiry` from then.
    fn start(fs: Arc<dyn FileSystem>, save_id: &str, expiry: Duration, every: Duration) -> Lease {
        let lost = Arc::new(AtomicBool::new(false));
        let (stop, rx) = mpsc::channel::<()>();
        let renewer = {
            let (fs, id, lost) = (fs.clone(), save_id.to_string(), lost.clone());
            std::thread::Builder::new()
                .name("dcp-lease".into())
                .spawn(move || {
                    // Wakes every third of the expiry, or at once when the
                    // sender is dropped (release).
                    while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                        if let Err(e) = renew(fs.as_ref(), &id, expiry) {
                            tracing::warn!("could not renew the lease of save {id}: {e}");
                            if e.kind() == ErrorKind::Busy {
                                lost.store(true, Ordering::SeqCst);
                                return;
                            }
                        }
                    }
                })
                .ok()
        };
        Lease {
            fs,
            save_id: save_id.to_string(),
            lost,
            stop: Some(stop),
            renewer,
        }
    }

    /// Check that this save still holds the lease and that it has not
    /// expired (the renewer keeps it fresh; an expired lease may be broken
    /// by another save at any moment). `Busy` otherwise. One read; writes
    /// nothing. Blocking.
    pub(crate) fn check(&self) -> Result<()> {
        let lost = |why: String| {
            Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "save {} lost its lease on {}: {why}",
                    self.save_id,
                    self.fs.location()
                ),
            ))
        };
        if self.lost.load(Ordering::SeqCst) {
            return lost("another save took it while this one ran".into());
        }
        match read(self.fs.as_ref())? {
            None => lost("the lease file was removed".into()),
            Some(b) => match LeaseInfo::decode(&b) {
                Ok(h) if h.save_id != self.save_id => {
                    lost(format!("it is held by {}", h.describe()))
                }
                Ok(h) if now_ms() > h.expires_ms => lost(format!(
                    "it expired {} ms ago without being renewed",
                    now_ms() - h.expires_ms
                )),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            },
        }
    }

    /// Stop renewing and remove the lease file if it is still this save's
    /// and unexpired. Blocking; failures are logged (the next save breaks
    /// the lease: its save has ended).
    ///
    /// Why the read-then-remove is safe: another save breaks a lease only
    /// when its holder is dead, and this save is still registered as live
    /// until after the removal, so only expiry could let it; a lease with
    /// at least [`RELEASE_MARGIN`] left is removed, an older one left for
    /// the next save to break as expired.
    pub(crate) fn release(mut self) {
        self.stop_renewing();
        match read(self.fs.as_ref()) {
            Ok(Some(b))
                if LeaseInfo::decode(&b).is_ok_and(|h| {
                    h.save_id == self.save_id
                        && h.expires_ms > now_ms().saturating_add(RELEASE_MARGIN.as_millis() as u64)
                }) =>
            {
                if let Err(e) = self.fs.remove(LEASE_FILE) {
                    tracing::warn!("could not remove the lease of save {}: {e}", self.save_id);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("could not read the lease of save {}: {e}", self.save_id),
        }
        forget(&self.save_id);
    }

    fn stop_renewing(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.renewer.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop_renewing();
        forget(&self.save_id);
    }
}

fn forget(save_id: &str) {
    if let Some(s) = live().as_mut() {
        s.remove(save_id);
    }
}

/// Extend the lease of `save_id` by `expiry` from now, if it is still
/// `save_id`'s; `Busy` naming the holder if not. Where the store has a
/// conditional replace, the extension is written only over the lease just
/// read, so a renewal never overwrites a lease another save took meanwhile.
fn renew(fs: &dyn FileSystem, save_id: &str, expiry: Duration) -> Result<()> {
    let snap = read_versioned(fs, LEASE_FILE, MAX_LEASE_LEN)?;
    let held = snap.bytes.as_deref().map(LeaseInfo::decode).transpose();
    match held {
        Ok(Some(mut h)) if h.save_id == save_id => {
            h.expires_ms = now_ms().saturating_add(expiry.as_millis() as u64);
            match snap.version {
                None => fs.write_atomic(LEASE_FILE, &h.encode(), false),
                Some(v) => match fs.replace_if(LEASE_FILE, &h.encode(), false, v.as_deref())? {
                    true => Ok(()),
                    // Changed since the read: the next renewal judges it.
                    false => Err(Error::new(
                        ErrorKind::Io,
                        format!(
                            "the lease of save {save_id} on {} changed while it was renewed",
                            fs.location()
                        ),
                    )
                    .with_temporary(true)),
                },
            }
        }
        Ok(Some(h)) => Err(Error::new(
            ErrorKind::Busy,
            format!(
                "save {save_id} lost its lease on {}: it is held by {}",
                fs.location(),
                h.describe()
            ),
        )),
        Ok(None) => Err(Error::new(
            ErrorKind::Busy,
            format!(
                "save {save_id} lost its lease on {}: it was removed",
                fs.location()
            ),
        )),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemoryFs;

    #[test]
    fn a_held_lease_refuses_a_second_save_and_is_released() {
        let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://lease"));
        let a = Lease::acquire(
            fs.clone(),
            "aaaaaaaaaaaaaaaa",
            Duration::from_secs(60),
            None,
            true,
        )
        .unwrap();
        let e = Lease::acquire(
            fs.clone(),
            "bbbbbbbbbbbbbbbb",
            Duration::from_secs(60),
            None,
            true,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy);
        assert!(e.message().contains("save aaaaaaaaaaaaaaaa of pid"), "{e}");
        assert!(e.message().contains(&host_name()), "{e}");
        a.check().unwrap();
        // Another save broke it (as if this one had stalled past expiry).
        fs.write_atomic(
            LEASE_FILE,
            &LeaseInfo::new("dddddddddddddddd", Duration::from_secs(60)).encode(),
            false,
        )
        .unwrap();
        let e = a.check().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy);
        assert!(
            e.message().contains("lost its lease") && e.message().contains("save dddddddddddddddd"),
            "{e}"
        );
        // Release leaves the other save's lease alone.
        a.release();
        assert!(fs.file_len(LEASE_FILE).unwrap().is_some());
        fs.remove(LEASE_FILE).unwrap();
        assert_eq!(fs.file_len(LEASE_FILE).unwrap(), None);
        Lease::acquire(fs, "bbbbbbbbbbbbbbbb", Duration::from_secs(60), None, true)
            .unwrap()
            .release();
    }

    /// The renewer extends the expiry while the lease is held, and stops
    /// (marking the lease lost) once another save holds it.
    #[test]
    fn the_lease_is_renewed_until_it_is_lost() {
        let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://renew"));
        let expiry = Duration::from_secs(60);
        let info = LeaseInfo::new("eeeeeeeeeeeeeeee", expiry);
        live()
            .get_or_insert_with(HashSet::new)
            .insert(info.save_id.clone());
        assert!(fs.create_new(LEASE_FILE, &info.encode(), false).unwrap());
        let lease = Lease::start(fs.clone(), &info.save_id, expiry, Duration::from_millis(1));
        let expires = || LeaseInfo::decode(&read(fs.as_ref()).unwrap().unwrap()).unwrap();
        // Wait (bounded) for a renewal to be visible: the expiry moves on.
        let deadline = Instant::now() + Duration::from_secs(30);
        while expires().expires_ms == info.expires_ms {
            assert!(Instant::now() < deadline, "no renewal within 30 s");
            std::thread::yield_now();
        }
        assert_eq!(expires().save_id, info.save_id);
        assert_eq!(expires().started_ms, info.started_ms);
        // Another save takes the location: the renewer notices and stops.
        // Its renewals are conditional on the version it read, so none
        // writes over the other save's lease, even one that read just before.
        let other = LeaseInfo::new("ffffffffffffffff", expiry).encode();
        fs.write_atomic(LEASE_FILE, &other, false).unwrap();
        while !lease.lost.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the loss was not noticed within 30 s"
            );
            assert_eq!(read(fs.as_ref()).unwrap().unwrap(), other, "overwritten");
            std::thread::yield_now();
        }
        assert_eq!(
            read(fs.as_ref()).unwrap().unwrap(),
            other,
            "not overwritten"
        );
        let e = lease.check().unwrap_err();
        assert!(e.message().contains("another save took it"), "{e}");
        lease.release();
        assert_eq!(read(fs.as_ref()).unwrap().unwrap(), other, "not removed");
    }

    /// Of two saves breaking the same dead lease at once, exactly one takes
    /// the location (the break is a conditional replace of the lease it
    /// judged dead), the other is refused naming it; 50 rounds.
    #[test]
    fn two_breakers_of_one_dead_lease_one_wins() {
        for round in 0..50 {
            let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://break"));
            let mut dead = LeaseInfo::new("dddddddddddddddd", Duration::from_secs(60));
            dead.pid = u32::MAX; // no such process on this host
            assert!(fs.create_new(LEASE_FILE, &dead.encode(), false).unwrap());
            let barrier = std::sync::Barrier::new(2);
            let results: Vec<Result<Lease>> = std::thread::scope(|s| {
                let hs: Vec<_> = ["aaaaaaaaaaaaaaa1", "aaaaaaaaaaaaaaa2"]
                    .map(|id| {
                        let (fs, barrier) = (fs.clone(), &barrier);
                        s.spawn(move || {
                            barrier.wait();
                            Lease::acquire(fs, id, Duration::from_secs(60), None, false)
                        })
                    })
                    .into_iter()
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let won: Vec<&Lease> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(won.len(), 1, "round {round}: {results:?}");
            let holder = LeaseInfo::decode(&read(fs.as_ref()).unwrap().unwrap()).unwrap();
            assert_eq!(holder.save_id, won[0].save_id, "round {round}");
            let e = results.iter().find_map(|r| r.as_ref().err()).unwrap();
            assert_eq!(e.kind(), ErrorKind::Busy, "round {round}: {e}");
            assert!(e.message().contains(&won[0].save_id), "{e}");
            for r in results.into_iter().flatten() {
                r.release();
            }
        }
    }

    #[test]
    fn dead_holders() {
        let mut h = LeaseInfo::new("cccccccccccccccc", Duration::from_secs(60));
        // A save of this process that is not live.
        assert!(h.dead_because().unwrap().contains("ended"));
        h.pid = u32::MAX; // no such process
        assert!(h.dead_because().unwrap().contains("no longer exists"));
        h.host = "another-host.invalid".into();
        assert_eq!(h.dead_because(), None, "a live lease of another host");
        h.expires_ms = 1;
        assert!(h.dead_because().unwrap().contains("expired"));
    }
}

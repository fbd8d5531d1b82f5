//! A real S3 server for tests: moto (`pip install 'moto[server]'`), on a
//! free port of 127.0.0.1.
//!
//! * [`Moto::shared`]: one server per test binary, started on first use and
//!   stopped when the binary exits. Tests share it and keep apart by using
//!   their own bucket or prefix.
//! * [`Moto::start`]: a private server, for a test that kills it
//!   ([`Moto::kill`]); stopped when dropped, or with the binary.
//!
//! When `moto_server` is not on `PATH` both print a `SKIPPED` notice and
//! return `None`, so the S3 cases skip; under CI ([`under_ci`]) a missing
//! moto panics instead, so a CI run never skips S3 silently.
//!
//! The server is a [`Server`]: it cannot outlive
//! the test binary (for the shared server the handle lives in a `static`),
//! so no stray server is ever left behind.

use crate::server::Server;
use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::OnceLock;

/// The executable that runs the server.
pub const MOTO: &str = "moto_server";

/// Whether this is a CI run: the environment variable `CI` is set to
/// anything but empty, `0` or `false` (CI services set `CI=true`). Under CI
/// a missing tool fails a test instead of skipping it.
pub fn under_ci() -> bool {
    std::env::var("CI")
        .map(|v| !matches!(v.trim(), "" | "0" | "false"))
        .unwrap_or(false)
}

/// Whether `moto_server` is an executable file on `PATH`.
pub fn moto_installed() -> bool {
    crate::server::on_path(MOTO).is_some()
}

/// `true` when moto can run; otherwise print a `SKIPPED` notice (once per
/// test binary) and return `false`, or panic under CI ([`under_ci`]).
pub fn moto_available() -> bool {
    if moto_installed() {
        return true;
    }
    if under_ci() {
        panic!("{MOTO} is not on PATH and CI is set: the S3 tests cannot run (pip install 'moto[server]'; .ci/run does this)");
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        eprintln!("SKIPPED: the S3 tests: {MOTO} is not installed (pip install 'moto[server]')")
    });
    false
}

/// A running moto server (see the module docs for how it is stopped).
#[derive(Debug)]
pub struct Moto {
    /// The port on 127.0.0.1.
    pub port: u16,
    /// The PID of the moto process itself.
    pub pid: u32,
    server: Server,
}

impl Moto {
    /// The server of this test binary, started on first use and stopped when
    /// the binary exits. `None` when moto is not installed (after a notice;
    /// a panic under CI, see [`moto_available`]). Panics when it is
    /// installed but does not start.
    pub fn shared() -> Option<&'static Moto> {
        static SHARED: OnceLock<Moto> = OnceLock::new();
        if let Some(m) = SHARED.get() {
            return Some(m);
        }
        if !moto_available() {
            return None;
        }
        Some(SHARED.get_or_init(Moto::launch))
    }

    /// A private server, stopped when dropped (or killed with
    /// [`Moto::kill`]). `None` when moto is not installed, as for
    /// [`Moto::shared`].
    pub fn start() -> Option<Moto> {
        moto_available().then(Moto::launch)
    }

    fn launch() -> Moto {
        let port = free_port();
        let argv = [MOTO, "-H", "127.0.0.1", "-p", &port.to_string()].map(String::from);
        let server = Server::launch("moto", port, &argv, |p| http(p, "GET", "/", &[]).is_ok());
        Moto {
            port,
            pid: server.pid,
            server,
        }
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create `bucket` with a plain HTTP PUT.
    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) =
            http(self.port, "PUT", &format!("/{bucket}"), &[]).expect("create bucket");
        assert_eq!(status, 200, "create bucket {bucket}: {body}");
    }

    /// Multipart uploads still in progress in `bucket`.
    pub fn pending_uploads(&self, bucket: &str) -> usize {
        let (status, body) =
            http(self.port, "GET", &format!("/{bucket}?uploads"), &[]).expect("list uploads");
        assert_eq!(status, 200, "{body}");
        body.matches("<Upload>").count()
    }

    /// `storage_options` for this server (`dcp_fsspec::OpendalFs::from_url_with`).
    pub fn options(&self) -> HashMap<String, String> {
        [
            ("endpoint", self.endpoint()),
            ("region", "us-east-1".to_string()),
            ("access_key_id", "testing".to_string()),
            ("secret_access_key", "testing".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Stop the server now and wait until it is gone. Later calls do
    /// nothing.
    pub fn kill(&self) {
        self.server.kill();
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A minimal HTTP/1.1 request to 127.0.0.1; returns the status and body
/// ([`crate::server::request`] without extra headers).
pub fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    crate::server::request(port, method, path, &[], body)
}

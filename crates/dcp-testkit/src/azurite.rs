//! An Azure Blob server for tests: Azurite (`npm install -g azurite`), its
//! blob service on a free port of 127.0.0.1, in memory.
//!
//! The executable is `azurite-blob`: the path in `DCP_AZURITE_BLOB`, or on
//! `PATH`. It runs with `--inMemoryPersistence --skipApiVersionCheck
//! --loose` and the well-known development account ([`ACCOUNT`],
//! [`KEY`]).
//!
//! * [`Azurite::shared`]: one server per test binary, started on first use
//!   and stopped when the binary exits; tests keep apart by container.
//! * [`Azurite::start`]: a private server, stopped when dropped.
//!
//! Both print a `SKIPPED` notice and return `None` when Azurite is
//! missing, or panic under CI ([`under_ci`](crate::moto::under_ci)).
//!
//! What it checks: Azurite verifies Shared Key signatures, so a wrong
//! account key is refused (403) as Azure refuses it; it honours `If-Match`
//! and `If-None-Match` on uploads. Containers are created here with a
//! request signed by hand ([`Azurite::create_container`]).

use crate::moto::free_port;
use crate::server::{self, Server};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::SystemTime;

/// The development account Azurite serves.
pub const ACCOUNT: &str = "devstoreaccount1";
/// Its well-known key (public: Azurite's documentation prints it).
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Where `azurite-blob` is, or `None`.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DCP_AZURITE_BLOB") {
        let p = PathBuf::from(p);
        return server::is_executable(&p).then_some(p);
    }
    server::on_path("azurite-blob")
}

/// `true` when Azurite can run; otherwise a `SKIPPED` notice (once) and
/// `false`, or a panic under CI.
pub fn available() -> bool {
    static SAID: std::sync::Once = std::sync::Once::new();
    server::available(
        binary().is_some(),
        "azurite",
        "npm install -g azurite",
        &SAID,
    )
}

/// A running Azurite blob service.
#[derive(Debug)]
pub struct Azurite {
    /// The process.
    pub server: Server,
}

impl Azurite {
    /// The server of this test binary, started on first use. `None` when
    /// Azurite is missing (see [`available`]).
    pub fn shared() -> Option<&'static Azurite> {
        static SHARED: OnceLock<Azurite> = OnceLock::new();
        if let Some(s) = SHARED.get() {
            return Some(s);
        }
        if !available() {
            return None;
        }
        Some(SHARED.get_or_init(Azurite::launch))
    }

    /// A private server, stopped when dropped (or with [`Azurite::kill`]).
    pub fn start() -> Option<Azurite> {
        available().then(Azurite::launch)
    }

    fn launch() -> Azurite {
        let bin = binary().expect("checked by available()");
        let port = free_port();
        let argv: Vec<String> = [
            bin.to_string_lossy().as_ref(),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Any HTTP reply (an unsigned request is refused with 403) means
        // it listens.
        let server = Server::launch("azurite", port, &argv, |port| {
            server::request(port, "GET", "/", &[], b"").is_ok()
        });
        Azurite { server }
    }

    /// The blob endpoint of the development account
    /// (`http://127.0.0.1:PORT/devstoreaccount1`).
    pub fn endpoint(&self) -> String {
        format!("{}/{ACCOUNT}", self.server.endpoint())
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// An `AZURE_STORAGE_CONNECTION_STRING` for this server.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={};",
            self.endpoint()
        )
    }

    /// Create `container`: `PUT /{account}/{container}?restype=container`,
    /// signed with the account key (Shared Key).
    pub fn create_container(&self, container: &str) {
        let (status, body) = self
            .signed("PUT", container, "restype=container", KEY)
            .expect("create container");
        assert_eq!(status, 201, "create container {container}: {body}");
    }

    /// A bodiless request on `/{account}/{path}?{query}` signed with `key`
    /// (base64); returns the status and body.
    pub fn signed(
        &self,
        method: &str,
        path: &str,
        query: &str,
        key: &str,
    ) -> std::io::Result<(u16, String)> {
        let date = http_date(SystemTime::now());
        let version = "2021-08-06";
        // Shared Key: the verb, eleven standard headers (all empty here, the
        // length of an empty body included), the x-ms-* headers sorted, then
        // the resource: /account/path plus each query parameter.
        let mut resource = format!("/{ACCOUNT}/{ACCOUNT}/{path}");
        let mut params: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_lowercase(), v.to_string())
            })
            .collect();
        params.sort();
        for (k, v) in &params {
            resource.push_str(&format!("\n{k}:{v}"));
        }
        let to_sign = format!(
            "{method}\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n{resource}"
        );
        let signature = sign(key, &to_sign);
        let target = if query.is_empty() {
            format!("/{ACCOUNT}/{path}")
        } else {
            format!("/{ACCOUNT}/{path}?{query}")
        };
        server::request(
            self.port(),
            method,
            &target,
            &[
                ("x-ms-date", date),
                ("x-ms-version", version.to_string()),
                ("Authorization", format!("SharedKey {ACCOUNT}:{signature}")),
            ],
            b"",
        )
    }

    /// `storage_options` for this server: the development account's
    /// endpoint, name and key.
    pub fn options(&self) -> HashMap<String, String> {
        [
            ("endpoint", self.endpoint()),
            ("account_name", ACCOUNT.to_string()),
            ("account_key", KEY.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Stop the server now (its blobs are lost). Later calls do nothing.
    pub fn kill(&self) {
        self.server.kill()
    }
}

/// HMAC-SHA256 of `msg` with the base64 `key`, in base64.
fn sign(key: &str, msg: &str) -> String {
    use base64::Engine;
    use hmac::Mac;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(key).expect("the account key is base64");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(msg.as_bytes());
    b64.encode(mac.finalize().into_bytes())
}

/// `t` as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn http_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn http_dates() {
        let at = |s| http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(at(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(at(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(at(1_798_761_599), "Thu, 31 Dec 2026 23:59:59 GMT");
    }

    /// The example of RFC 4231 (test case 2), as base64.
    #[test]
    fn hmac_sha256() {
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD.encode(b"Jefe");
        let want = base64::engine::general_purpose::STANDARD.encode([
            0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95,
            0x75, 0xc7, 0x5a, 0x00, 0x3f, 0x08, 0x9d, 0x27, 0x39, 0x83, 0x9d, 0xec, 0x58, 0xb9,
            0x64, 0xec, 0x38, 0x43,
        ]);
        // RFC 4231 test case 2 is HMAC-SHA256("Jefe", "what do ya want for nothing?").
        assert_eq!(sign(&key, "what do ya want for nothing?"), want);
    }
}

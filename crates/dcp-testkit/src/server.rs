//! A test server process on 127.0.0.1 that cannot outlive the test binary:
//! what [`gcs`](crate::gcs) (fake-gcs-server) and
//! [`azurite`](crate::azurite) (Azurite) start, the way [`moto`](crate::moto)
//! starts moto.
//!
//! The server runs under a small `sh` wrapper whose standard input is a
//! pipe from the test process, which never writes to it and keeps its end
//! open for as long as the server is to run. The wrapper waits for
//! end-of-file and then kills the server by its PID: a normal exit, a
//! panic, `SIGKILL` of the test binary all close the pipe, so no stray
//! server is left behind.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The wrapper: `$1` is the log file, the rest the server's command line.
/// The server is killed with `SIGKILL`: its state is in memory and of no
/// use afterwards, and Azurite takes more than a minute to stop on
/// `SIGTERM` once it has served a request.
const WRAPPER: &str = r#"
log="$1"; shift
"$@" </dev/null >"$log" 2>&1 &
pid=$!
echo "$pid"
trap 'kill -KILL "$pid" 2>/dev/null; rm -f "$log"; exit 0' HUP INT TERM
while read -r _; do :; done
kill -KILL "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
rm -f "$log"
exit 0
"#;

/// A running server process (see the module docs for how it is stopped).
#[derive(Debug)]
pub struct Server {
    /// What it is, for messages (`fake-gcs-server`).
    pub name: &'static str,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// The PID of the server process itself.
    pub pid: u32,
    wrapper: Mutex<Option<Child>>,
    log: PathBuf,
}

impl Server {
    /// Start `argv` (which must make the server listen on 127.0.0.1:`port`)
    /// and wait up to 60 s until `ready(port)` holds. Panics, with the
    /// server's log, when it exits early or never gets ready.
    pub fn launch(
        name: &'static str,
        port: u16,
        argv: &[String],
        ready: impl Fn(u16) -> bool,
    ) -> Server {
        let log =
            std::env::temp_dir().join(format!("dcp-{name}-{}-{port}.log", std::process::id()));
        let mut wrapper = Command::new("sh")
            .args(["-c", WRAPPER, "dcp-server"])
            .arg(&log)
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start sh for {name}: {e}"));
        let mut line = String::new();
        let mut out = wrapper.stdout.take().expect("piped stdout");
        let mut byte = [0u8; 1];
        while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0] as char);
        }
        let pid: u32 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the {name} wrapper printed no PID: {line:?}"));
        let server = Server {
            name,
            port,
            pid,
            wrapper: Mutex::new(Some(wrapper)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if ready(port) {
                break;
            }
            let alive = Path::new(&format!("/proc/{pid}")).exists();
            assert!(
                alive && Instant::now() < deadline,
                "{name} on port {port} {} (log {}):\n{}",
                if alive {
                    "did not answer within 60 s"
                } else {
                    "exited early"
                },
                server.log.display(),
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// `http://127.0.0.1:{port}`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Whether the server process still runs.
    pub fn alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    /// Stop the server now and wait until it is gone. Later calls do
    /// nothing.
    pub fn kill(&self) {
        let child = self
            .wrapper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut c) = child {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `name` as an executable file on `PATH`, if there is one.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// Whether `p` is an executable file.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `true` when `found`; otherwise print a `SKIPPED` notice naming `what`
/// and how to install it (once per `once`), and return `false`, or panic
/// under CI ([`under_ci`](crate::moto::under_ci)) so a CI run never skips
/// silently.
pub fn available(found: bool, what: &str, install: &str, once: &std::sync::Once) -> bool {
    if found {
        return true;
    }
    if crate::moto::under_ci() {
        panic!("{what} is not installed and CI is set: its tests cannot run ({install}; .ci/run does this)");
    }
    once.call_once(|| eprintln!("SKIPPED: the {what} tests: {what} is not installed ({install})"));
    false
}

/// A minimal HTTP/1.1 request to 127.0.0.1 with extra `headers`; returns
/// the status and body.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    use std::io::Write;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((status, body))
}

//! A TCP proxy on 127.0.0.1 that can be killed: a test talks to a server
//! (moto) through it, kills it mid-operation to simulate the server dying,
//! and then checks what the server kept through a direct connection. Killing
//! moto itself would lose its in-memory objects, and with them the check.
//!
//! It can also lose replies: with [`TcpProxy::drop_replies_to`], a request
//! whose first line is `PUT <path ending in the given name> HTTP/...` goes
//! through to the server (which stores the object), but the server's reply
//! never reaches the client: the connection is cut instead, as a reply lost
//! on the network is. The client cannot tell whether the PUT took effect.
//!
//! It can stall ([`TcpProxy::stall`]): connections stay open, nothing is
//! forwarded either way, as a server that hangs. And it can answer in the
//! server's place ([`TcpProxy::reply_instead`]): the next requests get a
//! canned reply (a `503 SlowDown`, a `429`) and their connection is closed,
//! without reaching the server, as a throttling service answers.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

#[derive(Debug, Default)]
struct State {
    stopped: AtomicBool,
    /// Both ends of every connection, to shut down on kill.
    conns: Mutex<Vec<TcpStream>>,
    /// Replies to `PUT` requests for paths ending in this are dropped.
    drop_put: Mutex<Option<String>>,
    /// Replies dropped so far.
    dropped: std::sync::atomic::AtomicUsize,
    /// `METHOD target` (query string kept) of every request seen, in order.
    seen: Mutex<Vec<String>>,
    /// The head (request line and headers) of every request seen, in order.
    heads: Mutex<Vec<String>>,
    /// Forward nothing, either way.
    stalled: AtomicBool,
    /// Requests still to answer with `canned` instead of forwarding.
    canned_left: std::sync::atomic::AtomicUsize,
    /// The reply given in the server's place.
    canned: Mutex<Vec<u8>>,
    /// Requests answered with `canned` so far.
    canned_sent: std::sync::atomic::AtomicUsize,
}

/// Forwards every connection made to [`TcpProxy::port`] to a target port on
/// 127.0.0.1, byte for byte, both ways, until [`TcpProxy::kill`].
#[derive(Debug)]
pub struct TcpProxy {
    /// The port the proxy listens on (127.0.0.1).
    pub port: u16,
    state: Arc<State>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl TcpProxy {
    /// Listen on a free port of 127.0.0.1 and forward to `target`. Fails
    /// only if no port can be bound.
    pub fn start(target: u16) -> io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State::default());
        let st = state.clone();
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                ) else {
                    continue;
                };
                {
                    let mut conns = st.conns.lock().unwrap_or_else(|p| p.into_inner());
                    if st.stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    conns.push(c3);
                    conns.push(s3);
                }
                // The request direction marks a connection whose next reply
                // is to be lost; the reply direction then cuts it.
                let lose = Arc::new(AtomicBool::new(false));
                requests(client, server, st.clone(), lose.clone());
                replies(s2, c2, st.clone(), lose);
            }
            // The listener is dropped here: later connections are refused.
        });
        Ok(TcpProxy {
            port,
            state,
            accept: Mutex::new(Some(accept)),
        })
    }

    /// From now on, lose the reply to every `PUT` of a path ending in
    /// `name` (`".metadata"`): the request reaches the server, the
    /// connection is cut before its reply reaches the client. `None` stops.
    pub fn drop_replies_to(&self, name: Option<&str>) {
        *self
            .state
            .drop_put
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = name.map(str::to_string);
    }

    /// From now on forward nothing, either way, on open connections and new
    /// ones (which are still accepted): requests hang as on a server that
    /// stopped answering. [`TcpProxy::resume`] forwards again (what was
    /// dropped meanwhile is lost).
    pub fn stall(&self) {
        self.state.stalled.store(true, Ordering::SeqCst);
    }

    /// Forward again after [`TcpProxy::stall`].
    pub fn resume(&self) {
        self.state.stalled.store(false, Ordering::SeqCst);
    }

    /// Answer the next `n` requests in the server's place with `status`
    /// `reason`, a body of `content_type`, and `Connection: close`, then
    /// close their connection; they never reach the server.
    pub fn reply_instead(
        &self,
        n: usize,
        status: u16,
        reason: &str,
        content_type: &str,
        body: &str,
    ) {
        *self.state.canned.lock().unwrap_or_else(|p| p.into_inner()) = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Retry-After: 0\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        self.state.canned_left.store(n, Ordering::SeqCst);
    }

    /// How many requests were answered by [`TcpProxy::reply_instead`].
    pub fn replied_instead(&self) -> usize {
        self.state.canned_sent.load(Ordering::SeqCst)
    }

    /// How many replies were lost so far.
    pub fn dropped(&self) -> usize {
        self.state.dropped.load(Ordering::SeqCst)
    }

    /// `METHOD path` (query string cut) of every HTTP request that passed
    /// through so far, in the order they were seen.
    pub fn requests(&self) -> Vec<String> {
        self.request_targets()
            .into_iter()
            .map(|r| match r.split_once('?') {
                Some((head, _)) => head.to_string(),
                None => r,
            })
            .collect()
    }

    /// `METHOD target` of every HTTP request that passed through so far,
    /// query string included (`POST /upload/storage/v1/b/b/o?ifGenerationMatch=0&..`).
    pub fn request_targets(&self) -> Vec<String> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The head of every HTTP request that passed through so far (request
    /// line and headers, as sent, without the blank line; at most the first
    /// 16 KiB), in the order they were seen.
    pub fn request_heads(&self) -> Vec<String> {
        self.state
            .heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forget the requests seen so far.
    pub fn clear_requests(&self) {
        self.state
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.state
            .heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// `http://127.0.0.1:{port}`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stop now, as a server that died: stop listening (new connections are
    /// refused) and reset every open connection, both ways. Returns once the
    /// listener is closed. Later calls do nothing.
    pub fn kill(&self) {
        let Some(accept) = self.accept.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        self.state.stopped.store(true, Ordering::SeqCst);
        for c in self
            .state
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        // Wake the accept loop, which then sees `stopped`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        let _ = accept.join();
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `chunk` holds the first line of a `PUT` of a path ending in
/// `name` (`PUT /bucket/prefix/.metadata HTTP/1.1`, a query string allowed).
fn is_put_of(chunk: &[u8], name: &str) -> bool {
    let text = String::from_utf8_lossy(&chunk[..chunk.len().min(4096)]);
    text.lines().any(|line| {
        let mut parts = line.split(' ');
        let (Some("PUT"), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let path = target.split('?').next().unwrap_or(target);
        version.starts_with("HTTP/") && path.ends_with(&format!("/{name}"))
    })
}

/// `METHOD target` when `chunk` begins with an HTTP/1 request line (a
/// request's head starts a read: clients send one request at a time per
/// connection).
fn request_line(chunk: &[u8]) -> Option<String> {
    let head = &chunk[..chunk.len().min(4096)];
    let end = head.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&head[..end]).ok()?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let known = ["GET", "PUT", "HEAD", "DELETE", "POST"].contains(&method);
    (known && version.starts_with("HTTP/1.")).then(|| format!("{method} {target}"))
}

/// The head of the request that `chunk` begins with: up to the blank line
/// that ends it, or the first 16 KiB of `chunk`, as text.
fn request_head(chunk: &[u8]) -> String {
    let head = &chunk[..chunk.len().min(16 << 10)];
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(head.len());
    String::from_utf8_lossy(&head[..end]).into_owned()
}

/// Copy client requests to the server on a thread until either side
/// closes; mark `lose` when a request's reply is to be lost.
fn requests(mut from: TcpStream, mut to: TcpStream, st: Arc<State>, lose: Arc<AtomicBool>) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let target = st
                .drop_put
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if st.stalled.load(Ordering::SeqCst) {
                continue;
            }
            if let Some(line) = request_line(&buf[..n]) {
                st.seen.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                st.heads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(request_head(&buf[..n]));
                let take = st
                    .canned_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if take {
                    let reply = st.canned.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    st.canned_sent.fetch_add(1, Ordering::SeqCst);
                    // The server never sees this request: answer the client,
                    // then close both sides.
                    let _ = from.write_all(&reply);
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
            if target.is_some_and(|t| is_put_of(&buf[..n], &t)) {
                lose.store(true, Ordering::SeqCst);
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Copy server replies to the client on a thread until either side closes;
/// when the connection's pending reply is to be lost, cut the connection
/// (both ways) instead of forwarding it.
fn replies(mut from: TcpStream, mut to: TcpStream, st: Arc<State>, lose: Arc<AtomicBool>) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if st.stalled.load(Ordering::SeqCst) {
                continue;
            }
            if lose.load(Ordering::SeqCst) {
                st.dropped.fetch_add(1, Ordering::SeqCst);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

#[cfg(test)]
mod tests {
    use super::{is_put_of, TcpProxy};

    #[test]
    fn request_lines() {
        assert_eq!(
            super::request_line(b"HEAD /b/p/.lease?x=1 HTTP/1.1\r\nhost: x\r\n\r\n").as_deref(),
            Some("HEAD /b/p/.lease?x=1")
        );
        assert_eq!(super::request_line(b"\x00\x01 binary body\r\n"), None);
        assert_eq!(
            super::request_line(b"PUT /b/x HTTP/1.1"),
            None,
            "no line end"
        );
    }

    #[test]
    fn recognises_put_request_lines() {
        assert!(is_put_of(
            b"PUT /b/ckpt/.metadata HTTP/1.1\r\nhost: x\r\n\r\n",
            ".metadata"
        ));
        assert!(is_put_of(
            b"PUT /b/.metadata?x-id=PutObject HTTP/1.1\r\n",
            ".metadata"
        ));
        assert!(!is_put_of(
            b"GET /b/ckpt/.metadata HTTP/1.1\r\n",
            ".metadata"
        ));
        assert!(!is_put_of(
            b"PUT /b/ckpt/.metadata.tmp HTTP/1.1\r\n",
            ".metadata"
        ));
        assert!(!is_put_of(
            b"PUT /b/ckpt/x.metadata HTTP/1.1\r\n",
            ".metadata"
        ));
        assert!(!is_put_of(b"\x00\x01binary body", ".metadata"));
    }
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// An HTTP server that answers the first request of each connection
    /// with 200 "ok" and closes it.
    fn http_ok_server() -> u16 {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in server.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    if matches!(s.read(&mut buf), Ok(n) if n > 0) {
                        let _ = s.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        );
                    }
                });
            }
        });
        port
    }

    fn get(port: u16) -> std::io::Result<String> {
        let mut c = TcpStream::connect(("127.0.0.1", port))?;
        c.set_read_timeout(Some(std::time::Duration::from_millis(500)))?;
        c.write_all(b"GET /x?a=1 HTTP/1.1\r\nHost: h\r\n\r\n")?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        Ok(out)
    }

    #[test]
    fn replies_instead_then_forwards_and_stalls() {
        let proxy = TcpProxy::start(http_ok_server()).unwrap();
        proxy.reply_instead(
            2,
            503,
            "Slow Down",
            "application/xml",
            "<Error><Code>SlowDown</Code></Error>",
        );
        for _ in 0..2 {
            let r = get(proxy.port).unwrap();
            assert!(r.starts_with("HTTP/1.1 503 Slow Down\r\n"), "{r}");
            assert!(r.ends_with("<Error><Code>SlowDown</Code></Error>"), "{r}");
        }
        assert!(get(proxy.port).unwrap().ends_with("\r\n\r\nok"));
        assert_eq!(proxy.replied_instead(), 2);
        assert_eq!(proxy.request_targets(), vec!["GET /x?a=1"; 3]);
        assert_eq!(proxy.requests(), vec!["GET /x"; 3]);
        assert_eq!(
            proxy.request_heads(),
            vec!["GET /x?a=1 HTTP/1.1\r\nHost: h"; 3]
        );
        // Stalled: the request is taken, no reply comes (the read times out).
        proxy.stall();
        let e = get(proxy.port).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        proxy.resume();
        assert!(get(proxy.port).unwrap().ends_with("ok"));
    }

    #[test]
    fn forwards_then_refuses_after_kill() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap().port();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
            // Hold the connection until the proxy resets it.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        let proxy = TcpProxy::start(target).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        c.write_all(b"hello").unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello");
        proxy.kill();
        // The open connection is closed, and new ones are refused.
        let mut rest = Vec::new();
        let n = c.read_to_end(&mut rest).unwrap_or(0);
        assert_eq!(n, 0);
        let e = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        echo.join().unwrap();
        proxy.kill();
    }
}

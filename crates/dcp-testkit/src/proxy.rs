//! A TCP proxy on 127.0.0.1 that can be killed: a test talks to a server
//! (moto) through it, kills it mid-operation to simulate the server dying,
//! and then checks what the server kept through a direct connection. Killing
//! moto itself would lose its in-memory objects, and with them the check.

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
                pump(client, server);
                pump(s2, c2);
            }
            // The listener is dropped here: later connections are refused.
        });
        Ok(TcpProxy {
            port,
            state,
            accept: Mutex::new(Some(accept)),
        })
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

/// Copy `from` to `to` on a thread until either side closes.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}

#[cfg(test)]
mod tests {
    use super::TcpProxy;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

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

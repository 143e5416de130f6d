//! A small HTTP CONNECT proxy on loopback for tests: it counts the tunnels it opened,
//! records what it was asked to connect to, can demand Basic credentials, refuse, or answer
//! with garbage. Targets are resolved and connected like a real proxy does (every address of
//! the name in turn). Included by path from the tests that need it (`#[path]`).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the proxy behaves.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Tunnels every CONNECT.
    Open,
    /// Tunnels only a CONNECT whose `Proxy-Authorization` header is exactly this value
    /// (e.g. `Basic YWdlbnQ6...`); 407 otherwise.
    RequireAuth(&'static str),
    /// Answers every CONNECT with this status line (e.g. `403 Forbidden`).
    Refuse(&'static str),
    /// Answers with bytes that are not HTTP.
    Garbage,
    /// Closes the connection after reading the request, without answering.
    Close,
    /// Answers `200` followed by an endless header (never a blank line).
    EndlessHeader,
    /// Reads the request and says nothing for 10 s.
    Silent,
}

/// A running proxy; stops when dropped.
pub struct ConnectProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    tunnels: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Longest request header the proxy reads.
const MAX_REQUEST: usize = 8 * 1024;
/// How long the proxy waits for a request or for its upstream.
const STEP: Duration = Duration::from_secs(10);

impl ConnectProxy {
    pub async fn start(behaviour: Behaviour) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let tunnels = tunnels.clone();
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        Ok((inbound, _)) = listener.accept() => {
                            let behaviour = behaviour.clone();
                            let tunnels = tunnels.clone();
                            let requests = requests.clone();
                            conns.spawn(async move {
                                let _ = serve(inbound, behaviour, tunnels, requests).await;
                            });
                        }
                        Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    }
                }
            })
        };
        ConnectProxy {
            addr,
            tunnels,
            requests,
            task,
        }
    }

    /// Tunnels opened so far (2xx answered and upstream connected).
    pub fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::SeqCst)
    }

    /// The request lines received so far (`CONNECT host:port HTTP/1.1`), in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(inbound: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = tokio::time::timeout(STEP, inbound.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return String::from_utf8(buf).ok();
        }
        if buf.len() > MAX_REQUEST {
            return None;
        }
    }
}

async fn connect_upstream(target: &str) -> Option<TcpStream> {
    let addrs = tokio::time::timeout(STEP, tokio::net::lookup_host(target))
        .await
        .ok()?
        .ok()?;
    for a in addrs {
        if !a.ip().is_loopback() {
            continue; // tests only ever reach loopback
        }
        if let Ok(Ok(s)) = tokio::time::timeout(STEP, TcpStream::connect(a)).await {
            return Some(s);
        }
    }
    None
}

async fn serve(
    mut inbound: TcpStream,
    behaviour: Behaviour,
    tunnels: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
) -> std::io::Result<()> {
    let Some(request) = read_request(&mut inbound).await else {
        return Ok(());
    };
    let mut lines = request.split("\r\n");
    let first = lines.next().unwrap_or("").to_owned();
    requests.lock().unwrap().push(first.clone());
    let auth = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("proxy-authorization"))
        .map(|(_, v)| v.trim().to_owned());
    let mut parts = first.split(' ');
    let (Some("CONNECT"), Some(target), Some("HTTP/1.1")) =
        (parts.next(), parts.next(), parts.next())
    else {
        inbound
            .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    match behaviour {
        Behaviour::Open => {}
        Behaviour::RequireAuth(expected) => {
            if auth.as_deref() != Some(expected) {
                inbound
                    .write_all(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                          Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n",
                    )
                    .await?;
                return Ok(());
            }
        }
        Behaviour::Refuse(status) => {
            inbound
                .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await?;
            return Ok(());
        }
        Behaviour::Garbage => {
            inbound.write_all(b"\x16\x03\x01garbage\r\n\r\n").await?;
            return Ok(());
        }
        Behaviour::Close => return Ok(()),
        Behaviour::Silent => {
            tokio::time::sleep(STEP).await;
            return Ok(());
        }
        Behaviour::EndlessHeader => {
            inbound.write_all(b"HTTP/1.1 200 OK\r\n").await?;
            // Bounded: 64 KiB of header lines at most, then hold the connection.
            for _ in 0..1024 {
                if inbound
                    .write_all(b"X-Filler: 0123456789abcdef0123456789abcdef0123456789abcdef\r\n")
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            tokio::time::sleep(STEP).await;
            return Ok(());
        }
    }
    let Some(mut upstream) = connect_upstream(target).await else {
        inbound
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    inbound
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    tunnels.fetch_add(1, Ordering::SeqCst);
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
    Ok(())
}

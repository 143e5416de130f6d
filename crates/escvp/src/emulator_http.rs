//! The HTTP control interface of an emulated projector (see [`super::HttpConfig`]).
//!
//! HTTP/1.1 with keep-alive, GET (and HEAD) only; request heads parsed with `httparse` and
//! bounded ([`MAX_HEAD`]); bodies refused. Queries run through the same state machine as the
//! ESC/VP21 side, so both interfaces always agree.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Faults, Outcome, Shared, State, execute};
use crate::http::{
    Authorization, Challenge, DIGEST_USER, DIRECTSEND_PATH, JSON_QUERY_PATH, JsonQueryReply,
};
use crate::vp21::{OwnedRequest, decode_request};

/// Longest request head (request line and headers) accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Most headers in one request.
const MAX_HEADERS: usize = 32;
/// Digest nonces remembered (older ones are answered as stale).
const MAX_NONCES: usize = 256;
/// The Digest realm.
const REALM: &str = "EPSONWEB";
/// Longest wait for a request on an idle keep-alive connection.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

pub(super) async fn serve_http(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _peer)) = accepted {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(connection(stream, shared.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A response to write.
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    challenge: Option<String>,
    close: bool,
}

impl Response {
    fn new(status: u16, reason: &'static str) -> Response {
        Response {
            status,
            reason,
            content_type: "text/plain",
            body: Vec::new(),
            challenge: None,
            close: false,
        }
    }

    fn json(body: String) -> Response {
        Response {
            content_type: "application/json",
            body: body.into_bytes(),
            ..Response::new(200, "OK")
        }
    }

    fn closing(mut self) -> Response {
        self.close = true;
        self
    }

    fn to_bytes(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: {}\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
            if self.close { "close" } else { "keep-alive" },
        );
        if let Some(c) = &self.challenge {
            out.push_str("WWW-Authenticate: ");
            out.push_str(c);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// The parts of a request head this server uses.
struct Head {
    method: String,
    target: String,
    authorization: Option<String>,
    close: bool,
    content_length: usize,
}

fn parse_head(bytes: &[u8]) -> Result<Option<(usize, Head)>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("too many headers"),
        Err(_) => return Err("malformed request"),
    };
    let method = req.method.unwrap_or_default().to_owned();
    let target = req.path.unwrap_or_default().to_owned();
    let http10 = req.version == Some(0);
    let mut head = Head {
        method,
        target,
        authorization: None,
        close: http10,
        content_length: 0,
    };
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| "non-UTF-8 header")?;
        if h.name.eq_ignore_ascii_case("authorization") {
            head.authorization = Some(value.to_owned());
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                head.close = true;
            } else if v.contains("keep-alive") {
                head.close = false;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            head.content_length = value.trim().parse().map_err(|_| "bad content-length")?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("request bodies are not accepted");
        }
    }
    Ok(Some((n, head)))
}

async fn connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        // Read one request head.
        let head = loop {
            match parse_head(&buf) {
                Ok(Some((n, head))) => {
                    buf.drain(..n);
                    break head;
                }
                Ok(None) if buf.len() >= MAX_HEAD => {
                    let r = Response::new(431, "Request Header Fields Too Large").closing();
                    refuse(stream, &r).await;
                    return;
                }
                Ok(None) => {}
                Err(why) => {
                    tracing::debug!(why, "bad HTTP request");
                    let mut r = Response::new(400, "Bad Request").closing();
                    r.body = why.as_bytes().to_vec();
                    refuse(stream, &r).await;
                    return;
                }
            }
            match tokio::time::timeout(KEEP_ALIVE, stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        if head.content_length > 0 {
            let r = Response::new(413, "Content Too Large").closing();
            refuse(stream, &r).await;
            return;
        }
        // Faults, as on the ESC/VP21 side.
        let faults = {
            let mut s = shared.lock();
            s.http_requests += 1;
            let mut faults = s.http_faults.clone();
            if let Some(n) = s.http_faults.drop_after.as_mut() {
                if *n == 0 {
                    return;
                }
                *n -= 1;
                faults.drop_after = Some(*n);
            }
            faults
        };
        if faults.silent {
            // Read on (and discard) until the client gives up.
            while let Ok(Ok(n)) = tokio::time::timeout(KEEP_ALIVE, stream.read(&mut chunk)).await {
                if n == 0 {
                    break;
                }
            }
            return;
        }
        let mut response = if faults.busy {
            Response::new(503, "Service Unavailable")
        } else {
            respond(&shared, &head)
        };
        if head.close {
            response.close = true;
        }
        if !faults.reply_delay.is_zero() {
            tokio::time::sleep(faults.reply_delay).await;
        }
        if write(&mut stream, &faults, &response, head.method == "HEAD")
            .await
            .is_err()
            || response.close
        {
            return;
        }
    }
}

/// Answers and closes a connection whose request was not read completely: shuts down the
/// sending side, then reads and discards (bounded in bytes and time) so that the unread
/// request does not turn the close into a reset that destroys the answer.
async fn refuse(mut stream: TcpStream, response: &Response) {
    if stream.write_all(&response.to_bytes(false)).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut left: usize = 256 * 1024;
    let drain = async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 || n >= left {
                break;
            }
            left -= n;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

async fn write(
    stream: &mut TcpStream,
    faults: &Faults,
    response: &Response,
    head_only: bool,
) -> std::io::Result<()> {
    let mut out = faults.garbage.clone();
    out.extend_from_slice(&response.to_bytes(head_only));
    match faults.chunk_size {
        Some(size) if size > 0 => {
            for part in out.chunks(size) {
                stream.write_all(part).await?;
                stream.flush().await?;
                tokio::time::sleep(faults.chunk_pause).await;
            }
            Ok(())
        }
        _ => stream.write_all(&out).await,
    }
}

fn new_nonce(s: &mut State) -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(s.http_requests);
    h.write_u64(s.commands);
    let seed = format!("{:016x}{:?}", h.finish(), Instant::now());
    let nonce = crate::http::DigestAlgorithm::Sha256.hash_hex(&seed)[..32].to_owned();
    if s.http_nonces.len() == MAX_NONCES {
        s.http_nonces.pop_front();
    }
    s.http_nonces.push_back(nonce.clone());
    nonce
}

/// `None` if the request may go on; otherwise the `401` to send.
fn check_auth(s: &mut State, head: &Head) -> Option<Response> {
    let password = s.config.password.as_ref()?.as_str().to_owned();
    let algorithm = s
        .config
        .http
        .as_ref()
        .map(|h| h.algorithm)
        .unwrap_or(crate::http::DigestAlgorithm::Md5);
    let mut stale = false;
    if let Some(value) = &head.authorization {
        match Authorization::parse(value) {
            Ok(auth)
                if auth.username() == DIGEST_USER
                    && auth.realm() == REALM
                    && auth.uri() == head.target
                    && auth.algorithm() == algorithm
                    && auth.verify(&password, &head.method) =>
            {
                if s.http_nonces.iter().any(|n| n == auth.nonce()) {
                    return None;
                }
                // Right password, but a nonce we did not hand out (or forgot).
                stale = true;
            }
            Ok(auth) => {
                tracing::debug!(?auth, "HTTP Digest credentials refused");
            }
            Err(e) => tracing::debug!(error = %e, "unreadable Authorization header"),
        }
    }
    let nonce = new_nonce(s);
    let challenge = Challenge::new(REALM, &nonce, algorithm).with_stale(stale);
    let mut r = Response::new(401, "Unauthorized");
    r.body = b"401 Unauthorized".to_vec();
    r.challenge = Some(challenge.to_header());
    Some(r)
}

/// Percent-decodes a query component (`+` stays `+`); `None` if it is not valid UTF-8 or a
/// `%` escape is broken.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn respond(shared: &Shared, head: &Head) -> Response {
    if head.method != "GET" && head.method != "HEAD" {
        return Response::new(405, "Method Not Allowed");
    }
    let (path, query) = head
        .target
        .split_once('?')
        .unwrap_or((head.target.as_str(), ""));
    let kind = match path {
        JSON_QUERY_PATH | "/cgi-bin/Remote/json_query" => Kind::Query,
        DIRECTSEND_PATH | "/cgi-bin/Remote/directsend" => Kind::Set,
        _ => return Response::new(404, "Not Found"),
    };
    let mut s = shared.lock();
    if let Some(refusal) = check_auth(&mut s, head) {
        return refusal;
    }
    // Parameters, minus the web UI's cache buster `_=<ms>`.
    let params: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .filter(|(k, _)| k != "_")
        .collect();
    let now = Instant::now();
    if s.tick(now) {
        shared.changed(&s);
    }
    match kind {
        Kind::Query => {
            let Some((_, asked)) = params.iter().find(|(k, _)| k == "jsoncallback") else {
                return Response::new(400, "Bad Request");
            };
            let request = line(asked);
            if let OwnedRequest::Query(name) = &request
                && let Some(allowed) = s
                    .config
                    .http
                    .as_ref()
                    .and_then(|h| h.allowed_queries.as_ref())
                && !allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
            {
                return Response::new(403, "Forbidden");
            }
            s.commands += 1;
            if !matches!(request, OwnedRequest::Query(_)) {
                // A set or a malformed line on json_query: the projector says ERR.
                return Response::json(JsonQueryReply::refused(asked).to_json());
            }
            if s.http_faults.err_next > 0 {
                s.http_faults.err_next -= 1;
                return Response::json(JsonQueryReply::refused(asked).to_json());
            }
            let bytes = match execute(&mut s, shared, &request, now) {
                Outcome::Reply(b) | Outcome::AtWarmUpEnd(b) => b,
            };
            Response::json(reply_json(asked, &bytes).to_json())
        }
        Kind::Set => {
            // `directsend?=` is the null probe; otherwise one `CMD=VALUE`. The answer is an
            // empty 200 whether or not the projector accepted the value, as on real ones.
            match params.first() {
                None => Response::new(200, "OK"),
                Some((k, v)) if k.is_empty() && v.is_empty() => Response::new(200, "OK"),
                Some((k, v)) => {
                    s.commands += 1;
                    let request = line(&format!("{k} {v}"));
                    if matches!(request, OwnedRequest::Set(..)) {
                        // `PWR ON` starts warm-up at once; HTTP does not wait for it.
                        let _ = execute(&mut s, shared, &request, now);
                    }
                    Response::new(200, "OK")
                }
            }
        }
    }
}

enum Kind {
    Query,
    Set,
}

/// Frames one command line with the ESC/VP21 request decoder.
fn line(text: &str) -> OwnedRequest {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(b'\r');
    match decode_request(&bytes) {
        Ok((_, l)) => l.into(),
        Err(_) => OwnedRequest::Malformed(text.as_bytes().to_vec()),
    }
}

/// Turns the ESC/VP21 reply bytes (`KEY=VALUE\r:` or `ERR\r:`) into the JSON reply.
fn reply_json(asked: &str, reply: &[u8]) -> JsonQueryReply {
    let text = String::from_utf8_lossy(reply);
    let body = text.strip_suffix(':').unwrap_or(&text);
    let body = body.strip_suffix('\r').unwrap_or(body);
    match body.split_once('=') {
        Some((_, v)) => JsonQueryReply::value(asked, v),
        None => JsonQueryReply::refused(asked),
    }
}

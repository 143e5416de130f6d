//! Session transcripts (`tests/fixtures/wire/*.txt`) replayed through the decoders.
//!
//! Fixture format, one item per line (`#` starts a comment):
//! - `C: bytes` / `S: bytes`: what the client / the projector sends, with the escapes `\r`,
//!   `\n`, `\\` and `\xNN`. Payloads starting with `ESC/VP.net` are ESC/VP.net messages, the
//!   rest is ESC/VP21 text.
//! - `MC: …` / `MS: …`: the ESC/VP.net messages decoded from the client / projector bytes.
//! - `Q: …`: the requests a projector decodes from the client's text.
//! - `R: …`: the replies a client decodes from the projector's text.
//!
//! Each text stream is fed whole and also in chunks of 1, 2, 3, 5, 7 and 16 bytes (the way
//! TCP may deliver it): the decoded items must be the same every time.

use std::fs;
use std::path::Path;

use escvp::net::{HelloInfo, Message};
use escvp::vp21::{Reply, ReplyDecoder, Request, RequestDecoder, RequestLine};

#[derive(Default, Debug)]
struct Transcript {
    client_net: Vec<u8>,
    server_net: Vec<u8>,
    client_text: Vec<u8>,
    server_text: Vec<u8>,
    expect_client_msgs: Vec<String>,
    expect_server_msgs: Vec<String>,
    expect_requests: Vec<String>,
    expect_replies: Vec<String>,
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b'\\' => out.push(b'\\'),
                b'x' => {
                    let hex = std::str::from_utf8(&b[i + 2..i + 4]).expect("ascii escape");
                    out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
                    i += 2;
                }
                other => panic!("unknown escape \\{}", other as char),
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn parse(text: &str) -> Transcript {
    let mut t = Transcript::default();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (tag, rest) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("line {}: no tag: {line:?}", n + 1));
        match tag {
            "C" | "S" => {
                let bytes = unescape(rest);
                let net = bytes.starts_with(b"ESC/VP.net");
                let dst = match (tag, net) {
                    ("C", true) => &mut t.client_net,
                    ("C", false) => &mut t.client_text,
                    (_, true) => &mut t.server_net,
                    (_, false) => &mut t.server_text,
                };
                dst.extend_from_slice(&bytes);
            }
            "MC" => t.expect_client_msgs.push(rest.to_owned()),
            "MS" => t.expect_server_msgs.push(rest.to_owned()),
            "Q" => t.expect_requests.push(rest.to_owned()),
            "R" => t.expect_replies.push(rest.to_owned()),
            other => panic!("line {}: unknown tag {other:?}", n + 1),
        }
    }
    t
}

fn render_message(m: &Message) -> String {
    let name =
        |o: Option<&'static str>, b: u8| o.map_or_else(|| format!("0x{b:02X}"), String::from);
    let mut s = format!(
        "{} {} v{:02X} headers={}",
        name(m.kind().name(), m.kind().get()),
        name(m.status().name(), m.status().get()),
        m.version().get(),
        m.headers().len()
    );
    if let Some(info) = HelloInfo::from_reply(m) {
        s += &format!(
            " name={} im={} cmd=0x{:02X}",
            info.name.unwrap_or_default(),
            info.im_type.unwrap_or(0),
            info.command_type.unwrap_or(0)
        );
    }
    s
}

fn messages(mut bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, m) = Message::decode(bytes).expect("a whole ESC/VP.net message");
        assert_eq!(
            m.to_bytes(),
            &bytes[..bytes.len() - rest.len()],
            "re-encodes"
        );
        out.push(render_message(&m));
        bytes = rest;
    }
    out
}

fn render_reply(r: &Reply<'_>) -> String {
    match r {
        Reply::Ack => "ack".into(),
        Reply::Err => "err".into(),
        Reply::Value { key, value } => format!("value {key}={value}"),
        Reply::Lines(l) => {
            let lines: Vec<String> = l.iter().map(|l| format!("{}={}", l.key, l.value)).collect();
            format!("lines {}", lines.join("|"))
        }
        Reply::Event(e) => match e.report() {
            Ok(rep) => format!(
                "event status={} warnings={:X} alarms={:X} extra={}",
                rep.status.name().unwrap_or("?"),
                rep.warnings.bits(),
                rep.alarms.bits(),
                rep.extra
            ),
            Err(_) => format!("malformed event {}", e.raw()),
        },
    }
}

fn render_request(r: &RequestLine<'_>) -> String {
    match r {
        RequestLine::Ok(Request::Null) => "null".into(),
        RequestLine::Ok(Request::Query(n)) => format!("query {n}"),
        RequestLine::Ok(Request::Set(n, p)) => format!("set {n} {p}"),
        RequestLine::Malformed(b) => format!("malformed {}", String::from_utf8_lossy(b)),
        RequestLine::Skip => "skip".into(),
    }
}

/// Feeds `stream` to a decoder `chunk` bytes at a time, as a socket would, keeping the
/// unconsumed bytes in a buffer; returns what was decoded.
fn feed<D>(stream: &[u8], chunk: usize, mut decode: D) -> Vec<String>
where
    D: FnMut(&[u8]) -> Option<(usize, String)>,
{
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        while let Some((n, item)) = decode(&buf) {
            out.push(item);
            buf.drain(..n);
        }
    }
    assert!(buf.is_empty(), "bytes left over: {buf:?}");
    out
}

fn replay(path: &Path) {
    let t = parse(&fs::read_to_string(path).expect("fixture readable"));
    assert_eq!(
        messages(&t.client_net),
        t.expect_client_msgs,
        "{path:?} client messages"
    );
    assert_eq!(
        messages(&t.server_net),
        t.expect_server_msgs,
        "{path:?} projector messages"
    );
    for chunk in [usize::MAX, 1, 2, 3, 5, 7, 16] {
        let mut replies = ReplyDecoder::new();
        let got = feed(&t.server_text, chunk, |buf| {
            let (n, r) = replies.decode(buf).expect("valid replies")?;
            Some((n, render_reply(&r)))
        });
        assert_eq!(got, t.expect_replies, "{path:?} replies, chunks of {chunk}");
        let mut requests = RequestDecoder::new();
        let got: Vec<String> = feed(&t.client_text, chunk, |buf| {
            let (n, r) = requests.decode(buf).expect("valid requests")?;
            Some((n, render_request(&r)))
        })
        .into_iter()
        // The `\n` of a `\r\n` split across reads: consumed, nothing to answer.
        .filter(|r| r != "skip")
        .collect();
        assert_eq!(
            got, t.expect_requests,
            "{path:?} requests, chunks of {chunk}"
        );
    }
}

#[test]
fn every_fixture_replays() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wire");
    let mut paths: Vec<_> = fs::read_dir(&dir)
        .expect("fixtures dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 4, "fixtures found: {paths:?}");
    for p in &paths {
        replay(p);
    }
}

#[test]
fn fixture_parser_understands_escapes() {
    assert_eq!(unescape(r"A\r\n\x00\\"), b"A\r\n\0\\");
    let t = parse("# c\nC: PWR?\\r\nQ: query PWR\nS: PWR=01\\r:\nR: value PWR=01\n");
    assert_eq!(t.client_text, b"PWR?\r");
    assert_eq!(t.server_text, b"PWR=01\r:");
    assert_eq!(t.expect_requests, ["query PWR"]);
    assert_eq!(t.expect_replies, ["value PWR=01"]);
}

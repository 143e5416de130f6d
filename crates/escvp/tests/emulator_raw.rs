//! The emulator at the byte level: what a real projector does with odd clients.
#![cfg(feature = "emulator")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command as Process, Stdio};
use std::time::Duration;

use escvp::emulator::{AckStyle, Fleet, ProjectorConfig};
use escvp::net::{Message, MessageType, Status, Version};
use escvp::vp21::{Reply, ReplyDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const BOUND: Duration = Duration::from_secs(10);

async fn fleet(config: ProjectorConfig) -> Fleet {
    Fleet::spawn([("127.0.0.1:0".parse::<SocketAddr>().unwrap(), config)])
        .await
        .unwrap()
}

/// Reads until EOF or `n` bytes, within the bound.
async fn read_some(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while out.len() < n {
        match tokio::time::timeout(BOUND, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(k)) => out.extend_from_slice(&buf[..k]),
            Err(_) => panic!("no data within the bound"),
        }
    }
    out
}

async fn is_closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 16];
    matches!(
        tokio::time::timeout(BOUND, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn tcp_handshake_refusals() {
    let f = fleet(ProjectorConfig::default()).await;
    let addr = f.projectors()[0].tcp_addr();
    // HELLO belongs to UDP: 0x45, then close.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&Message::hello().to_bytes()).await.unwrap();
    let reply = read_some(&mut s, 16).await;
    let (_, m) = Message::decode(&reply).unwrap();
    assert_eq!(
        (m.kind(), m.status()),
        (MessageType::HELLO, Status::NOT_ALLOWED)
    );
    assert!(is_closed(&mut s).await);
    // Version 2.0: 0x55.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let v2 = Message::connect(None).with_version(Version::V2_0);
    s.write_all(&v2.to_bytes()).await.unwrap();
    let (_, m) = Message::decode(&read_some(&mut s, 16).await).unwrap();
    assert_eq!(m.status(), Status::VERSION_NOT_SUPPORTED);
    // Not ESC/VP.net at all: 0x40.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let (_, m) = Message::decode(&read_some(&mut s, 16).await).unwrap();
    assert_eq!(m.status(), Status::BAD_REQUEST);
    assert!(is_closed(&mut s).await);
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let f = fleet(ProjectorConfig {
        ack_style: AckStyle::CrColon,
        start_on: true,
        ..ProjectorConfig::default()
    })
    .await;
    let mut s = TcpStream::connect(f.projectors()[0].tcp_addr())
        .await
        .unwrap();
    // CONNECT and four commands in one write, with \r\n line ends and a final \r.
    let mut out = Message::connect(None).to_bytes();
    out.extend_from_slice(b"PWR?\r\nMUTE ON\r\nMUTE?\r\nBOGUS?\r");
    s.write_all(&out).await.unwrap();
    let expected = b"PWR=01\r:\r:MUTE=ON\r:ERR\r:";
    let got = read_some(&mut s, 16 + expected.len()).await;
    assert_eq!(&got[..16], b"ESC/VP.net\x10\x03\x00\x00\x20\x00");
    assert_eq!(&got[16..], expected);
    let mut dec = ReplyDecoder::new();
    let (n, r) = dec.decode(&got[16..]).unwrap().unwrap();
    assert_eq!(
        r,
        Reply::Value {
            key: "PWR",
            value: "01"
        }
    );
    assert_eq!(n, 8);
}

#[tokio::test]
async fn crlf_split_across_writes_gets_one_answer() {
    let f = fleet(ProjectorConfig::default()).await;
    let mut s = TcpStream::connect(f.projectors()[0].tcp_addr())
        .await
        .unwrap();
    s.write_all(&Message::connect(None).to_bytes())
        .await
        .unwrap();
    assert_eq!(read_some(&mut s, 16).await.len(), 16);
    s.write_all(b"PWR?\r").await.unwrap();
    assert_eq!(read_some(&mut s, 8).await, b"PWR=04\r:");
    s.write_all(b"\n").await.unwrap();
    s.write_all(b"SNO?\r\n").await.unwrap();
    // Exactly the SNO reply: no extra ":" for the late "\n".
    let expected = format!("SNO={}\r:", f.projectors()[0].serial());
    assert_eq!(read_some(&mut s, expected.len()).await, expected.as_bytes());
}

#[tokio::test]
async fn over_long_line_is_refused_and_closed() {
    let f = fleet(ProjectorConfig {
        max_line_len: 64,
        ..ProjectorConfig::default()
    })
    .await;
    let mut s = TcpStream::connect(f.projectors()[0].tcp_addr())
        .await
        .unwrap();
    s.write_all(&Message::connect(None).to_bytes())
        .await
        .unwrap();
    assert_eq!(read_some(&mut s, 16).await.len(), 16);
    // A megabyte without a line break: refused with one ERR once the line passes
    // `max_line_len`, then the connection is closed (`read_some` reads to EOF). How much the
    // emulator buffered meanwhile is not measured here.
    let junk = vec![b'A'; 1 << 20];
    let _ = s.write_all(&junk).await; // may fail once the peer closes
    let rest = read_some(&mut s, usize::MAX).await;
    assert_eq!(rest, b"ERR\r:");
    assert!(is_closed(&mut s).await);
}

#[tokio::test]
async fn udp_hello_and_refusals() {
    let f = fleet(ProjectorConfig::default()).await;
    let p = &f.projectors()[0];
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ask = |msg: Message| {
        let sock = &sock;
        let to = p.udp_addr();
        async move {
            sock.send_to(&msg.to_bytes(), to).await.unwrap();
            let mut buf = [0u8; 1024];
            let (n, _) = tokio::time::timeout(BOUND, sock.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            Message::decode(&buf[..n]).unwrap().1
        }
    };
    let m = ask(Message::hello()).await;
    assert_eq!(m.status(), Status::OK);
    assert_eq!(m.headers().len(), 3);
    assert_eq!(
        escvp::net::HelloInfo::from_reply(&m)
            .unwrap()
            .name
            .as_deref(),
        Some(p.name())
    );
    assert_eq!(
        ask(Message::connect(None)).await.status(),
        Status::NOT_ALLOWED
    );
    assert_eq!(
        ask(Message::hello().with_version(Version::new(0x11)))
            .await
            .status(),
        Status::VERSION_NOT_SUPPORTED
    );
}

#[test]
fn binary_prints_one_line_per_projector_and_serves() {
    // With its log at info level: the log goes to standard error, without colour codes
    // into a pipe, and standard output stays the projectors' list.
    let mut child = Process::new(env!("CARGO_BIN_EXE_escvp-emulator"))
        .args(["--listen", "127.0.0.1:0", "--count", "3"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let line = lines.next().expect("a line").unwrap();
        assert!(line.starts_with("projector name="), "{line}");
        let tcp = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("tcp="))
            .unwrap();
        addrs.push(tcp.parse::<SocketAddr>().unwrap());
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    for addr in addrs {
        rt.block_on(async {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&Message::connect(None).to_bytes())
                .await
                .unwrap();
            let got = read_some(&mut s, 16).await;
            assert_eq!(got, b"ESC/VP.net\x10\x03\x00\x00\x20\x00");
        });
    }
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("emulated projector listening"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a pipe: {log:?}");
}

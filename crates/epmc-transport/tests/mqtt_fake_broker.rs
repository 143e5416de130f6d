//! The MQTT client against a scripted broker over real TLS on loopback: what Mosquitto will
//! not do on demand (withhold PUBACKs, refuse with each CONNACK code, send hostile bytes,
//! fall silent) is done here, packet by packet, with our own codec on the broker side.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use epmc_transport::client::{MqttClient, MqttError, MqttOptions, ServerTrust, TlsIdentity};
use epmc_transport::mqtt::{
    Connect, ConnectReturn, DEFAULT_MAX_PACKET, Packet, PacketError, Publish, QoS, TopicName,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use support::{BOUND, Ca, within};

const A: &str = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";

struct Fake {
    ca: Ca,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

/// A socket bound to a free loopback port that does not listen yet: connections to it are
/// refused, and no other socket can take the port meanwhile (a port found by binding a
/// listener and closing it is free for anyone until it is bound again).
fn reserved_port() -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket
}

impl Fake {
    async fn start(versions: &[&'static rustls::SupportedProtocolVersion]) -> Fake {
        Fake::start_on(versions, reserved_port(), Ca::new("Fake Broker CA")).await
    }

    /// Listens on `port`, a socket bound by [`reserved_port`].
    async fn start_on(
        versions: &[&'static rustls::SupportedProtocolVersion],
        port: tokio::net::TcpSocket,
        ca: Ca,
    ) -> Fake {
        let (cert, key) = ca.server(&["localhost", "127.0.0.1"]);
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"mqtt".to_vec()];
        Fake {
            ca,
            listener: port.listen(64).unwrap(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap()
    }

    fn options(&self) -> MqttOptions {
        MqttOptions::new(self.addr(), "localhost", A)
    }

    /// Accepts one TLS connection and reads its CONNECT.
    async fn accept(&self) -> (Conn, Connect) {
        self.try_accept().await.expect("a TLS connection")
    }

    /// Accepts one connection; `None` if the client gave up during the TLS handshake.
    async fn try_accept(&self) -> Option<(Conn, Connect)> {
        let (tcp, _) = self.listener.accept().await.unwrap();
        let tls = self.acceptor.accept(tcp).await.ok()?;
        let mut conn = Conn {
            tls,
            buf: Vec::new(),
        };
        match conn.read().await {
            Some(Packet::Connect(c)) => Some((conn, c)),
            other => panic!("expected CONNECT, got {other:?}"),
        }
    }
}

struct Conn {
    tls: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    /// The next packet from the client; `None` once it closed.
    async fn read(&mut self) -> Option<Packet> {
        loop {
            match Packet::decode(&self.buf, DEFAULT_MAX_PACKET) {
                Ok((p, used)) => {
                    self.buf.drain(..used);
                    return Some(p);
                }
                Err(PacketError::Incomplete { .. }) => {}
                Err(e) => panic!("the client sent a bad packet: {e}"),
            }
            let mut chunk = [0u8; 4096];
            match self.tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next packet, or `None` if nothing comes within `wait`.
    async fn read_within(&mut self, wait: Duration) -> Option<Packet> {
        tokio::time::timeout(wait, self.read()).await.ok().flatten()
    }

    async fn send(&mut self, p: &Packet) {
        self.send_raw(&p.to_bytes().unwrap()).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.unwrap();
        self.tls.flush().await.unwrap();
    }

    async fn connack(&mut self, code: ConnectReturn) {
        self.send(&Packet::ConnAck {
            session_present: false,
            code,
        })
        .await;
    }
}

fn publish_of(p: Option<Packet>) -> Publish {
    match p {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn tls_12_and_13_with_alpn_mqtt() {
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let fake = Fake::start(&[version]).await;
        let id = fake.ca.identity(A);
        let opts = fake.options();
        let client = tokio::spawn(async move { MqttClient::connect(&opts, &id).await });
        let (mut conn, connect) = within(fake.accept()).await;
        assert_eq!(connect.client_id, A);
        let (_, session) = conn.tls.get_ref();
        assert_eq!(session.protocol_version(), Some(expected));
        assert_eq!(session.alpn_protocol(), Some(&b"mqtt"[..]));
        conn.connack(ConnectReturn::Accepted).await;
        let (c, _, _) = within(client).await.unwrap().unwrap();
        assert!(c.is_connected());
    }
}

#[tokio::test]
async fn every_connack_refusal_is_a_typed_error() {
    let fake = Fake::start(&[&rustls::version::TLS13]).await;
    for code in [
        ConnectReturn::BadProtocol,
        ConnectReturn::IdentifierRejected,
        ConnectReturn::ServerUnavailable,
        ConnectReturn::BadCredentials,
        ConnectReturn::NotAuthorized,
        ConnectReturn::Other(0x77),
    ] {
        let id = fake.ca.identity(A);
        let opts = fake.options();
        let client = tokio::spawn(async move { MqttClient::connect(&opts, &id).await });
        let (mut conn, _) = within(fake.accept()).await;
        conn.connack(code).await;
        match within(client).await.unwrap() {
            Err(MqttError::Refused(got)) => assert_eq!(got, code),
            other => panic!("{code:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn at_most_the_window_waits_for_puback() {
    const WINDOW: usize = 4;
    let fake = Fake::start(&[&rustls::version::TLS13]).await;
    let mut opts = fake.options();
    opts.in_flight = WINDOW;
    let id = fake.ca.identity(A);
    let client = tokio::spawn(async move { MqttClient::connect(&opts, &id).await });
    let (mut conn, _) = within(fake.accept()).await;
    conn.connack(ConnectReturn::Accepted).await;
    let (c, _, _) = within(client).await.unwrap().unwrap();
    // Ten publishes handed over in order; their acknowledgements collected in order.
    let sender = tokio::spawn({
        let c = c.clone();
        async move {
            let mut pending = Vec::new();
            for n in 0..10u8 {
                pending.push(
                    c.send_publish("t/x", Bytes::from(vec![n]), QoS::AtLeastOnce, false)
                        .await
                        .unwrap(),
                );
            }
            let mut results = Vec::new();
            for p in pending {
                results.push(p.acked().await);
            }
            results
        }
    });
    let mut ids = Vec::new();
    for n in 0..WINDOW as u8 {
        let p = publish_of(within(conn.read()).await);
        assert_eq!(&p.payload[..], &[n]);
        ids.push(p.packet_id.unwrap());
    }
    // The window is full: nothing more comes until a PUBACK.
    assert!(conn.read_within(Duration::from_millis(300)).await.is_none());
    assert_eq!(c.in_flight(), WINDOW);
    // Each PUBACK lets exactly one more through, in order.
    for n in WINDOW as u8..10 {
        conn.send(&Packet::PubAck(ids.remove(0))).await;
        let p = publish_of(within(conn.read()).await);
        assert_eq!(&p.payload[..], &[n]);
        ids.push(p.packet_id.unwrap());
        assert!(conn.read_within(Duration::from_millis(50)).await.is_none());
    }
    for id in ids {
        conn.send(&Packet::PubAck(id)).await;
    }
    let results = within(sender).await.unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test]
async fn an_unsendable_publish_fails_alone() {
    let fake = Fake::start(&[&rustls::version::TLS13]).await;
    let mut opts = fake.options();
    opts.max_packet = 1024;
    let id = fake.ca.identity(A);
    let client = tokio::spawn(async move { MqttClient::connect(&opts, &id).await });
    let (mut conn, _) = within(fake.accept()).await;
    conn.connack(ConnectReturn::Accepted).await;
    let (c, _, _) = within(client).await.unwrap().unwrap();
    let big = c
        .publish("t/x", Bytes::from(vec![0; 2000]), QoS::AtLeastOnce, false)
        .await;
    assert!(
        matches!(
            big,
            Err(MqttError::Unsendable(PacketError::TooLarge { .. }))
        ),
        "{big:?}"
    );
    let wildcard = c
        .publish("t/#", Bytes::new(), QoS::AtLeastOnce, false)
        .await;
    assert!(
        matches!(wildcard, Err(MqttError::Unsendable(PacketError::Topic(_)))),
        "{wildcard:?}"
    );
    // The connection is still up and the next publish goes through.
    let next = tokio::spawn({
        let c = c.clone();
        async move {
            c.publish("t/x", Bytes::from_static(b"ok"), QoS::AtLeastOnce, false)
                .await
        }
    });
    let p = publish_of(within(conn.read()).await);
    assert_eq!(&p.payload[..], b"ok");
    conn.send(&Packet::PubAck(p.packet_id.unwrap())).await;
    within(next).await.unwrap().unwrap();
    assert!(c.is_connected());
}

fn order(id: u16, payload: Vec<u8>) -> Packet {
    Packet::Publish(Publish {
        topic: TopicName::new("epmc/v1/agents/x/orders").unwrap(),
        qos: QoS::AtLeastOnce,
        packet_id: Some(id),
        retain: false,
        dup: false,
        payload: Bytes::from(payload),
    })
}

/// An incoming QoS 1 publish is acknowledged only by `ack()`: no PUBACK before, one with the
/// right packet id after, each answered on its own (here out of order), and a second `ack`
/// or an `ack` after the connection closed sends nothing.
#[tokio::test]
async fn an_incoming_publish_is_acknowledged_only_by_ack() {
    let fake = Fake::start(&[&rustls::version::TLS13]).await;
    let id = fake.ca.identity(A);
    let opts = fake.options();
    let client = tokio::spawn(async move { MqttClient::connect(&opts, &id).await });
    let (mut conn, _) = within(fake.accept()).await;
    conn.connack(ConnectReturn::Accepted).await;
    let (c, _, mut incoming) = within(client).await.unwrap().unwrap();
    conn.send(&order(7, b"order-7".to_vec())).await;
    let mut dup = order(9, b"order-9".to_vec());
    if let Packet::Publish(p) = &mut dup {
        p.dup = true;
    }
    conn.send(&dup).await;
    let seven = within(incoming.recv()).await.unwrap();
    assert_eq!(&seven.message.payload[..], b"order-7");
    assert_eq!(seven.message.topic, "epmc/v1/agents/x/orders");
    assert!(!seven.redelivered());
    let nine = within(incoming.recv()).await.unwrap();
    assert_eq!(&nine.message.payload[..], b"order-9");
    assert!(nine.redelivered(), "the DUP flag is passed on");
    // Received, not acknowledged: the broker hears nothing.
    assert_eq!(conn.read_within(Duration::from_millis(500)).await, None);
    nine.ack();
    assert_eq!(within(conn.read()).await, Some(Packet::PubAck(9)));
    assert_eq!(conn.read_within(Duration::from_millis(200)).await, None);
    seven.ack();
    assert_eq!(within(conn.read()).await, Some(Packet::PubAck(7)));
    // The broker reuses id 7 for a new order: acknowledged by its own handle only.
    conn.send(&order(7, b"order-7b".to_vec())).await;
    let again = within(incoming.recv()).await.unwrap();
    assert_eq!(&again.message.payload[..], b"order-7b");
    assert_eq!(conn.read_within(Duration::from_millis(300)).await, None);
    // The connection ends; a late `ack` is a no-op.
    drop(conn);
    within(c.closed()).await;
    again.ack();
}

/// A reader that leaves orders unread for 3 × the keep-alive while the broker sends 400 of
/// them (more than any channel the connection could wait on) does not stall the connection:
/// it keeps sending PINGREQs and stays up; then every order arrives, in order, and each `ack`
/// sends the PUBACK with its packet id, in order.
#[tokio::test]
async fn a_slow_order_reader_does_not_stall_the_keep_alive() {
    const N: u16 = 400;
    let fake = Fake::start(&[&rustls::version::TLS13]).await;
    let id = fake.ca.identity(A);
    let mut opts = fake.options();
    opts.keep_alive = Duration::from_secs(1);
    opts.incoming_window = 1000; // a broker with a large in-flight limit
    let client = tokio::spawn(async move { MqttClient::connect(&opts, &id).await });
    let (mut conn, _) = within(fake.accept()).await;
    conn.connack(ConnectReturn::Accepted).await;
    let (c, _, mut incoming) = within(client).await.unwrap().unwrap();
    let mut all = Vec::new();
    for n in 1..=N {
        order(n, n.to_be_bytes().to_vec())
            .encode(&mut all, DEFAULT_MAX_PACKET)
            .unwrap();
    }
    conn.send_raw(&all).await;
    // Nobody reads `incoming` for 3 s; the broker answers each PINGREQ.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut pings = 0;
    while let Ok(p) = tokio::time::timeout_at(until, conn.read()).await {
        match p {
            Some(Packet::PingReq) => {
                pings += 1;
                conn.send(&Packet::PingResp).await;
            }
            other => panic!("expected only PINGREQs, got {other:?}"),
        }
    }
    assert!(pings >= 2, "{pings} PINGREQs in 3 s with a 1 s keep-alive");
    assert!(c.is_connected());
    for n in 1..=N {
        let o = within(incoming.recv()).await.unwrap();
        assert_eq!(&o.message.payload[..], &n.to_be_bytes());
        o.ack();
    }
    let mut acked = Vec::new();
    while acked.len() < usize::from(N) {
        match within(conn.read()).await {
            Some(Packet::PubAck(id)) => acked.push(id),
            Some(Packet::PingReq) => conn.send(&Packet::PingResp).await,
            other => panic!("expected PUBACKs, got {other:?}"),
        }
    }
    assert_eq!(acked, (1..=N).collect::<Vec<u16>>());
    assert!(c.is_connected());
}

/// A broker that ignores its in-flight limit and keeps sending while nothing is acknowledged
/// ends the connection with a protocol error once the incoming window is exceeded, rather
/// than being buffered without bound; what was handed over stays readable.
#[tokio::test]
async fn more_unacknowledged_orders_than_the_window_end_the_connection() {
    let fake = Fake::start(&[&rustls::version::TLS13]).await;
    let id = fake.ca.identity(A);
    let mut opts = fake.options();
    opts.incoming_window = 8;
    let client = tokio::spawn(async move { MqttClient::connect(&opts, &id).await });
    let (mut conn, _) = within(fake.accept()).await;
    conn.connack(ConnectReturn::Accepted).await;
    let (c, _, mut incoming) = within(client).await.unwrap().unwrap();
    for n in 1..=8u16 {
        conn.send(&order(n, vec![n as u8])).await;
    }
    let first = within(incoming.recv()).await.unwrap();
    drop(first); // dropped unacknowledged: still counts, the broker still has it in flight
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.is_connected(), "8 unacknowledged fit the window");
    conn.send(&order(9, vec![9])).await;
    within(c.closed()).await;
    assert!(!c.is_connected());
    assert_eq!(within(conn.read()).await, None, "the client closed");
    for n in 2..=8u8 {
        let o = within(incoming.recv()).await.unwrap();
        assert_eq!(&o.message.payload[..], &[n]);
        o.ack(); // a no-op now
    }
    assert!(
        within(incoming.recv()).await.is_none(),
        "the 9th is not handed over"
    );
}

/// The session keeps one order stream across reconnections, in arrival order, with each
/// order's handle bound to its connection: acknowledging an order from a closed connection
/// sends nothing anywhere; one from the live connection sends its PUBACK there.
#[tokio::test]
async fn the_session_keeps_orders_in_order_across_reconnections() {
    use epmc_transport::OrderSource;
    use epmc_transport::session::MqttSession;
    let fake = Fake::start(&[&rustls::version::TLS13]).await;
    let session = MqttSession::start(
        fake.options(),
        fake.ca.identity(A),
        &[("epmc/v1/agents/x/orders", QoS::AtLeastOnce)],
    )
    .unwrap();
    async fn accept(fake: &Fake) -> Conn {
        let (mut conn, _) = fake.accept().await;
        conn.connack(ConnectReturn::Accepted).await;
        match within(conn.read()).await {
            Some(Packet::Subscribe(id, f)) => {
                conn.send(&Packet::SubAck(id, vec![Some(QoS::AtLeastOnce); f.len()]))
                    .await
            }
            other => panic!("expected SUBSCRIBE, got {other:?}"),
        }
        conn
    }
    let mut first = within(accept(&fake)).await;
    first.send(&order(1, b"1".to_vec())).await;
    first.send(&order(2, b"2".to_vec())).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(first); // the connection dies with both orders unread and unacknowledged
    let mut second = tokio::time::timeout(Duration::from_secs(20), accept(&fake))
        .await
        .expect("the session reconnects");
    second.send(&order(1, b"3".to_vec())).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(within(session.next_order()).await.unwrap());
    }
    let payloads: Vec<&[u8]> = got.iter().map(|o| &o.message.payload[..]).collect();
    assert_eq!(payloads, [&b"1"[..], b"2", b"3"]);
    let mut got = got.into_iter();
    // Orders 1 and 2 came on the closed connection: their acks send nothing (packet id 1 is
    // in use on the new connection for order 3).
    got.next().unwrap().ack();
    got.next().unwrap().ack();
    assert_eq!(second.read_within(Duration::from_millis(300)).await, None);
    got.next().unwrap().ack();
    assert_eq!(within(second.read()).await, Some(Packet::PubAck(1)));
}

/// Hostile or broken broker bytes end the connection with an error; nothing panics, and a
/// publish waiting for its PUBACK fails instead of hanging.
#[tokio::test]
async fn hostile_broker_bytes_end_the_connection_cleanly() {
    let fake = Fake::start(&[&rustls::version::TLS13]).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("reserved packet type", vec![0x00, 0x00]),
        (
            "remaining length over 4 bytes",
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
        ),
        (
            "larger than the maximum packet",
            vec![0x30, 0x80, 0x80, 0x40],
        ),
        ("QoS 2 publish", {
            let mut b = vec![0x34, 0x07, 0x00, 0x01, b't', 0x00, 0x01];
            b.extend_from_slice(b"xy");
            b
        }),
        ("a CONNECT from the broker", {
            Packet::Connect(Connect {
                client_id: "x".into(),
                clean_session: true,
                keep_alive: 1,
                will: None,
                username: None,
                password: None,
            })
            .to_bytes()
            .unwrap()
        }),
        ("SUBACK granting QoS 2", vec![0x90, 0x03, 0x00, 0x09, 0x02]),
        (
            "PUBLISH topic with a wildcard",
            vec![0x30, 0x05, 0x00, 0x03, b'a', b'/', b'#'],
        ),
        ("truncated then closed", vec![0x30, 0x10, 0x00]),
    ];
    for (what, bytes) in cases {
        let id = fake.ca.identity(A);
        let mut opts = fake.options();
        opts.max_packet = 64 * 1024;
        let client = tokio::spawn(async move { MqttClient::connect(&opts, &id).await });
        let (mut conn, _) = within(fake.accept()).await;
        conn.connack(ConnectReturn::Accepted).await;
        let (c, _, _) = within(client).await.unwrap().unwrap();
        let waiting = tokio::spawn({
            let c = c.clone();
            async move {
                c.publish("t/x", Bytes::from_static(b"p"), QoS::AtLeastOnce, false)
                    .await
            }
        });
        publish_of(within(conn.read()).await);
        conn.send_raw(&bytes).await;
        if what == "truncated then closed" {
            conn.tls.shutdown().await.unwrap();
        }
        let outcome = within(waiting).await.unwrap();
        assert!(
            matches!(outcome, Err(MqttError::Closed)),
            "{what}: {outcome:?}"
        );
        within(c.closed()).await;
        assert!(!c.is_connected(), "{what}");
    }
    // And garbage instead of a CONNACK is a protocol error from `connect`.
    let id = fake.ca.identity(A);
    let opts = fake.options();
    let client = tokio::spawn(async move { MqttClient::connect(&opts, &id).await });
    let (mut conn, _) = within(fake.accept()).await;
    conn.send_raw(&[0xD0, 0x00]).await; // PINGRESP
    let err = within(client).await.unwrap().unwrap_err();
    assert!(matches!(err, MqttError::Protocol(_)), "{err:?}");
}

#[tokio::test]
async fn a_silent_broker_is_detected_by_the_keep_alive() {
    let fake = Fake::start(&[&rustls::version::TLS13]).await;
    let mut opts = fake.options();
    opts.keep_alive = Duration::from_secs(1);
    let id = fake.ca.identity(A);
    let client = tokio::spawn(async move { MqttClient::connect(&opts, &id).await });
    let (mut conn, connect) = within(fake.accept()).await;
    assert_eq!(connect.keep_alive, 1);
    conn.connack(ConnectReturn::Accepted).await;
    let (c, _, _) = within(client).await.unwrap().unwrap();
    // The client pings after a second of silence; the broker never answers.
    assert_eq!(within(conn.read()).await, Some(Packet::PingReq));
    within(c.closed()).await;
    assert!(!c.is_connected());
    let err = c
        .publish("t/x", Bytes::new(), QoS::AtLeastOnce, false)
        .await
        .unwrap_err();
    assert!(matches!(err, MqttError::Closed), "{err:?}");
}

/// Run as a child process by the test below, with `SSL_CERT_FILE` pointing at a CA file:
/// connects with the given trust and prints the outcome.
#[tokio::test]
async fn trust_child() {
    let Ok(dir) = std::env::var("EPMC_TRUST_CHILD_DIR") else {
        return; // only meaningful when started by the parent test
    };
    let dir = std::path::PathBuf::from(dir);
    let addr: SocketAddr = std::env::var("EPMC_TRUST_CHILD_ADDR")
        .unwrap()
        .parse()
        .unwrap();
    let cert = std::fs::read(dir.join("agent.crt")).unwrap();
    let key = std::fs::read(dir.join("agent.key")).unwrap();
    let foreign = std::fs::read(dir.join("foreign.crt")).unwrap();
    let trust = match std::env::var("EPMC_TRUST_CHILD_MODE").unwrap().as_str() {
        "system" => ServerTrust::SystemRoots,
        _ => ServerTrust::Pinned(&foreign),
    };
    let id = TlsIdentity::new(trust, &cert, &key).unwrap();
    match MqttClient::connect(&MqttOptions::new(addr, "localhost", A), &id).await {
        Ok(_) => println!("outcome: connected"),
        Err(e) => println!("outcome: refused: {e}"),
    }
}

/// The operating system's roots are used only when asked for, and then they decide: with
/// our CA in the system store (`SSL_CERT_FILE`) the connection succeeds, with only a foreign
/// CA there it is refused; a pinned CA ignores the system store.
#[tokio::test]
async fn system_roots_only_when_asked() {
    let fake = Fake::start(&[&rustls::version::TLS13]).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = fake.ca.client(A);
    std::fs::write(dir.path().join("agent.crt"), cert).unwrap();
    std::fs::write(dir.path().join("agent.key"), key).unwrap();
    std::fs::write(dir.path().join("ca.crt"), &fake.ca.pem).unwrap();
    std::fs::write(dir.path().join("foreign.crt"), Ca::new("Foreign CA").pem).unwrap();
    for (mode, store, expected) in [
        ("system", "ca.crt", "connected"),
        ("system", "foreign.crt", "refused"),
        ("pinned-foreign", "ca.crt", "refused"),
    ] {
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "trust_child", "--nocapture", "--test-threads=1"])
            .env("EPMC_TRUST_CHILD_DIR", dir.path())
            .env("EPMC_TRUST_CHILD_ADDR", fake.addr().to_string())
            .env("EPMC_TRUST_CHILD_MODE", mode)
            .env("SSL_CERT_FILE", dir.path().join(store))
            .env_remove("SSL_CERT_DIR")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
        if let Some((mut conn, _)) = within(fake.try_accept()).await {
            conn.connack(ConnectReturn::Accepted).await;
        }
        let output = within(output).await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let outcome = stdout
            .lines()
            .find_map(|l| l.split_once("outcome: ").map(|(_, o)| o.to_owned()))
            .unwrap_or_else(|| panic!("{mode}/{store}: no outcome in {stdout:?}"));
        assert!(
            outcome.starts_with(expected),
            "{mode} with {store} in the system store: {outcome}"
        );
    }
}

#[test]
fn bad_tls_material_is_a_clear_error() {
    use epmc_transport::client::TlsError;
    let ca = Ca::new("Test CA");
    let (cert, key) = ca.client(A);
    let (_, other_key) = ca.client("someone-else");
    /// What is wrong, CA PEM, certificate PEM, key PEM.
    type Case<'a> = (&'a str, &'a [u8], &'a [u8], &'a [u8]);
    let cases: [Case; 5] = [
        ("no CA", b"", cert.as_bytes(), key.as_bytes()),
        (
            "CA not PEM",
            b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
            cert.as_bytes(),
            key.as_bytes(),
        ),
        (
            "no client certificate",
            ca.pem.as_bytes(),
            b"",
            key.as_bytes(),
        ),
        ("no key", ca.pem.as_bytes(), cert.as_bytes(), b"garbage"),
        (
            "key of another certificate",
            ca.pem.as_bytes(),
            cert.as_bytes(),
            other_key.as_bytes(),
        ),
    ];
    for (what, ca_pem, cert_pem, key_pem) in cases {
        let err = TlsIdentity::from_pem(ca_pem, cert_pem, key_pem).unwrap_err();
        assert!(
            matches!(err, TlsError::Pem { .. } | TlsError::Config(_)),
            "{what}: {err:?}"
        );
        assert!(!err.to_string().is_empty());
    }
    // Missing files name the file.
    let err = TlsIdentity::from_files(
        "/nonexistent/ca.crt",
        "/nonexistent/a.crt",
        "/nonexistent/a.key",
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
}

/// With no broker the session keeps trying, backing off; once one listens it connects,
/// subscribes, and is an uplink.
#[tokio::test]
async fn the_session_backs_off_then_connects_when_the_broker_appears() {
    use epmc_transport::session::MqttSession;
    use epmc_transport::{MessageId, OutboundMessage, Priority, TransportError, Uplink};
    // Nothing listens there yet, and the port stays ours until the broker appears.
    let port = reserved_port();
    let addr = port.local_addr().unwrap();
    let ca = Ca::new("Fake Broker CA");
    let session = MqttSession::start(
        MqttOptions::new(addr, "localhost", A),
        ca.identity(A),
        &[("epmc/v1/agents/x/orders", QoS::AtLeastOnce)],
    )
    .unwrap();
    let message = OutboundMessage {
        id: MessageId::from_bytes([1; 16]),
        topic: "epmc/v1/agents/x/telemetry".into(),
        payload: Bytes::from_static(b"m"),
        priority: Priority::Routine,
    };
    assert!(matches!(
        session.publish(&message).await,
        Err(TransportError::Unavailable)
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Attempts at about 0 s, 0.5 s and 1.5 s (plus jitter): a few, not a busy loop.
    let failures = session.stats().failures;
    assert!((1..=4).contains(&failures), "{:?}", session.stats());
    assert!(!session.is_connected());

    let fake = Fake::start_on(&[&rustls::version::TLS13], port, ca).await;
    let (mut conn, connect) = tokio::time::timeout(Duration::from_secs(20), fake.accept())
        .await
        .expect("the session retries within its back-off");
    assert!(
        !connect.clean_session,
        "a persistent session for the orders"
    );
    conn.connack(ConnectReturn::Accepted).await;
    match within(conn.read()).await {
        Some(Packet::Subscribe(id, filters)) => {
            assert_eq!(filters.len(), 1);
            assert_eq!(filters[0].0.as_str(), "epmc/v1/agents/x/orders");
            conn.send(&Packet::SubAck(id, vec![Some(QoS::AtLeastOnce)]))
                .await;
        }
        other => panic!("expected SUBSCRIBE, got {other:?}"),
    }
    assert!(session.wait_connected(BOUND).await);
    let publish = tokio::spawn(async move { session.publish(&message).await });
    let p = publish_of(within(conn.read()).await);
    assert_eq!(&p.payload[..], b"m");
    conn.send(&Packet::PubAck(p.packet_id.unwrap())).await;
    within(publish).await.unwrap().unwrap();
}

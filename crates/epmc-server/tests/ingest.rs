//! The ingest endpoint over real TLS with real certificates on 127.0.0.1: healthy agents are
//! `epmc_transport::client::MqttClient`, hostile ones raw tokio-rustls sockets speaking our
//! codec.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use epmc_proto::topic::{self, AgentId, Channel};
use epmc_server::ingest::{IngestConfig, OrderError, SecurityEvent, SendOrderError, TlsRefusal};
use epmc_transport::client::{MqttClient, MqttError, PendingAck};
use epmc_transport::mqtt::{
    Connect, ConnectReturn, Packet, Publish, QoS, TopicFilter, TopicName, Will,
};
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{BOUND, Server, connect, new_agent, within};

fn publish(topic: &str, id: Option<u16>, payload: &'static [u8]) -> Packet {
    Packet::Publish(Publish {
        topic: TopicName::new(topic).unwrap(),
        qos: if id.is_some() {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        },
        packet_id: id,
        retain: false,
        dup: false,
        payload: Bytes::from_static(payload),
    })
}

fn config() -> IngestConfig {
    let mut c = IngestConfig::new();
    c.connect_timeout = Duration::from_secs(5);
    c.write_timeout = Duration::from_secs(2);
    c.shutdown_grace = Duration::from_secs(5);
    c
}

/// While the sink holds the commit, none of `acks` (PUBACKs of `a`'s messages) comes within
/// `wait` and nothing of `a` is committed; then the sink is released and every one comes.
async fn no_puback_until_released<F, T, E>(
    s: &Server,
    a: AgentId,
    mut acks: Vec<std::pin::Pin<Box<F>>>,
    wait: Duration,
) where
    F: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    for ack in &mut acks {
        assert!(
            tokio::time::timeout(wait, ack.as_mut()).await.is_err(),
            "a PUBACK came before its commit"
        );
    }
    assert!(s.sink.payloads(a).is_empty());
    s.sink.release();
    for ack in acks {
        within(ack).await.unwrap();
    }
}

#[tokio::test]
async fn puback_only_after_the_commit_that_holds_the_message() {
    let mut s = Server::start(config()).await;
    let a = new_agent();
    let (client, _) = s.agent(a).await;
    s.sink
        .until("online", |r| r.states.contains(&(a, true)))
        .await;
    s.sink.hold();
    let mut acks = Vec::new();
    for n in 0..3u8 {
        let p = client
            .send_publish(
                &topic::telemetry(&a),
                Bytes::from(vec![n]),
                QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
        acks.push(Box::pin(p.acked()));
    }
    // The writer is inside a commit, held by the sink: no PUBACK may arrive.
    within(s.commits.recv()).await.unwrap();
    no_puback_until_released(&s, a, acks, Duration::from_millis(300)).await;
    let got: Vec<Vec<u8>> = s.sink.payloads(a).iter().map(|b| b.to_vec()).collect();
    assert_eq!(got, vec![vec![0], vec![1], vec![2]]);
    let stats = s.endpoint.stats();
    assert_eq!(stats.committed, 3);
    assert!(stats.batches >= 1 && stats.batches <= 3);
    assert_eq!(stats.sessions, 1);
    assert_eq!(stats.connections, 1);
    // A poison message is still acknowledged, and counted as rejected.
    client
        .publish(
            &topic::events(&a),
            Bytes::from_static(b"poison"),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    assert_eq!(s.endpoint.stats().rejected, 1);
}

#[tokio::test]
async fn a_failed_commit_sends_no_puback_and_closes() {
    let s = Server::start(config()).await;
    let a = new_agent();
    s.sink.fail_commits(true);
    let mut raw = s.raw_connected(&a.to_string(), 30).await;
    raw.send(&publish(&topic::telemetry(&a), Some(7), b"m"))
        .await;
    assert_eq!(raw.read().await, None, "closed, without PUBACK");
    // The agent retries once the store is back, and is acknowledged.
    s.sink.fail_commits(false);
    let mut raw = s.raw_connected(&a.to_string(), 30).await;
    raw.send(&publish(&topic::events(&a), None, b"qos0")).await;
    raw.send(&publish(&topic::telemetry(&a), Some(7), b"m"))
        .await;
    // QoS 0 is stored and never acknowledged; the QoS 1 after it is.
    assert_eq!(raw.read().await, Some(Packet::PubAck(7)));
    assert_eq!(
        s.sink.payloads(a),
        vec![Bytes::from_static(b"qos0"), Bytes::from_static(b"m")]
    );
}

/// A healthy agent on its own connection publishes once more: it was not affected.
async fn still_publishes(s: &Server, healthy: &MqttClient, h: AgentId) {
    let before = s.sink.payloads(h).len();
    healthy
        .publish(
            &topic::telemetry(&h),
            Bytes::from_static(b"still here"),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    assert!(healthy.is_connected());
    assert_eq!(s.sink.payloads(h).len(), before + 1);
}

#[tokio::test]
async fn client_id_must_equal_the_certificate_cn() {
    let s = Server::start(config()).await;
    let (a, b) = (new_agent(), new_agent());
    let h = new_agent();
    let (healthy, _) = s.agent(h).await;
    let mut raw = s.raw(&a.to_string()).await;
    raw.send(&connect(&b.to_string(), 30)).await;
    assert_eq!(
        raw.read().await,
        Some(Packet::ConnAck {
            session_present: false,
            code: ConnectReturn::IdentifierRejected
        })
    );
    assert_eq!(raw.read().await, None);
    assert_eq!(
        s.sink.events(),
        vec![SecurityEvent::ClientIdMismatch {
            agent: a,
            client_id: b.to_string(),
            peer: raw.tls.get_ref().0.local_addr().unwrap(),
        }]
    );
    // The same through the agent's client.
    let mut opts = s.options(b);
    opts.client_id = b.to_string();
    match MqttClient::connect(&opts, &s.ca.identity(&a.to_string())).await {
        Err(MqttError::Refused(ConnectReturn::IdentifierRejected)) => {}
        other => panic!("{other:?}"),
    }
    assert!(!s.endpoint.is_connected(&a) && !s.endpoint.is_connected(&b));
    assert_eq!(s.endpoint.stats().sessions, 1, "the healthy agent's only");
    // A will outside the agent's own state topic is refused too.
    let mut raw = s.raw(&a.to_string()).await;
    raw.send(&Packet::Connect(Connect {
        client_id: a.to_string(),
        clean_session: true,
        keep_alive: 30,
        will: Some(Will {
            topic: TopicName::new(topic::state(&b)).unwrap(),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
        }),
        username: None,
        password: None,
    }))
    .await;
    assert_eq!(
        raw.read().await,
        Some(Packet::ConnAck {
            session_present: false,
            code: ConnectReturn::NotAuthorized
        })
    );
    assert!(matches!(
        s.sink.events().last(),
        Some(SecurityEvent::PublishOutsidePrefix { agent, topic, .. })
            if *agent == a && *topic == topic::state(&b)
    ));
    still_publishes(&s, &healthy, h).await;
}

#[tokio::test]
async fn a_certificate_without_an_agent_id_or_from_another_ca_gets_no_session() {
    let s = Server::start(config()).await;
    // Verified by TLS, but its CN is not an agent id: refused by the identity extractor.
    let mut raw = s.raw("agent-001").await;
    raw.send(&connect("agent-001", 30)).await;
    assert_eq!(raw.read().await, None);
    s.sink.until("bad identity", |r| r.events.len() == 1).await;
    assert!(matches!(
        &s.sink.events()[0],
        SecurityEvent::BadIdentity { detail, .. } if detail.contains("agent-001")
    ));
    // A certificate from another CA: refused inside the TLS handshake, and recorded.
    let a = new_agent();
    let foreign = support::Ca::new("Foreign CA");
    let mut config = (*s.ca.raw_client(&a.to_string())).clone();
    config.client_auth_cert_resolver = foreign
        .raw_client(&a.to_string())
        .client_auth_cert_resolver
        .clone();
    if let Some(mut raw) = s.raw_with(Arc::new(config)).await {
        raw.send(&connect(&a.to_string(), 30)).await;
        assert_eq!(raw.read().await, None);
    }
    s.sink
        .until("the TLS refusal", |r| r.events.len() == 2)
        .await;
    assert!(
        matches!(
            &s.sink.events()[1],
            SecurityEvent::TlsRefused { reason: TlsRefusal::Untrusted, agent: None, detail, .. }
                if detail.contains("UnknownIssuer")
        ),
        "{:?}",
        s.sink.events()
    );
    assert!(!s.endpoint.is_connected(&a));
    assert_eq!(s.endpoint.stats().sessions, 0);
    assert_eq!(s.endpoint.stats().violations, 2);
}

#[tokio::test]
async fn refused_tls_handshakes_are_recorded_a_port_probe_is_not_others_unaffected() {
    let s = Server::start(config()).await;
    let b = new_agent();
    let (healthy, _) = s.agent(b).await;

    // A port probe: TCP connect and close, no TLS error. Not an event.
    drop(TcpStream::connect(s.addr()).await.unwrap());
    within(async {
        while s.endpoint.stats().connections != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // TLS without a client certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(s.ca.pem.as_bytes()).unwrap())
        .unwrap();
    let mut no_cert = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    no_cert.alpn_protocols = vec![b"mqtt".to_vec()];
    if let Some(mut raw) = s.raw_with(Arc::new(no_cert)).await {
        raw.send(&connect(&new_agent().to_string(), 30)).await;
        assert_eq!(raw.read().await, None);
    }
    s.sink
        .until("no certificate", |r| r.events.len() == 1)
        .await;
    assert!(
        matches!(
            &s.sink.events()[0],
            SecurityEvent::TlsRefused {
                reason: TlsRefusal::NoCertificate,
                agent: None,
                ..
            }
        ),
        "{:?}",
        s.sink.events()
    );

    // Not TLS at all.
    let mut plain = TcpStream::connect(s.addr()).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = within(plain.read_to_end(&mut rest)).await;
    s.sink.until("not TLS", |r| r.events.len() == 2).await;
    assert!(
        matches!(
            &s.sink.events()[1],
            SecurityEvent::TlsRefused {
                reason: TlsRefusal::Failed,
                agent: None,
                ..
            }
        ),
        "{:?}",
        s.sink.events()
    );
    assert_eq!(s.sink.events().len(), 2, "the probe is not an event");

    // The healthy agent on its own connection keeps publishing.
    still_publishes(&s, &healthy, b).await;
}

#[tokio::test]
async fn publish_outside_the_own_prefix_closes_unacknowledged_others_unaffected() {
    let s = Server::start(config()).await;
    let (a, b) = (new_agent(), new_agent());
    let (healthy, _) = s.agent(b).await;
    let bad_topics = [
        topic::telemetry(&b),
        topic::orders(&a),
        format!("{}{a}/other", topic::PREFIX),
        "epmc/v1/agents".to_owned(),
        topic::telemetry(&a).to_uppercase(),
    ];
    for (n, bad) in bad_topics.iter().enumerate() {
        let mut raw = s.raw_connected(&a.to_string(), 30).await;
        raw.send(&publish(&topic::hello(&a), Some(1), b"fine"))
            .await;
        assert_eq!(raw.read().await, Some(Packet::PubAck(1)));
        raw.send(&publish(bad, Some(2), b"bad")).await;
        assert_eq!(raw.read().await, None, "{bad}: closed without PUBACK");
        s.sink
            .until("the violation", |r| r.events.len() == n + 1)
            .await;
        assert!(matches!(
            s.sink.events().last(),
            Some(SecurityEvent::PublishOutsidePrefix { agent, topic, .. })
                if *agent == a && topic == bad
        ));
        // The healthy agent on its own connection keeps publishing.
        healthy
            .publish(
                &topic::telemetry(&b),
                Bytes::from(vec![n as u8]),
                QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
    }
    assert!(healthy.is_connected());
    assert_eq!(s.sink.payloads(b).len(), bad_topics.len());
    assert!(
        s.sink.payloads(a).iter().all(|p| &p[..] == b"fine"),
        "nothing of the violations was stored"
    );
    assert_eq!(s.endpoint.stats().violations, bad_topics.len() as u64);
}

#[tokio::test]
async fn subscribe_only_to_the_own_orders_topic() {
    let s = Server::start(config()).await;
    let (a, b) = (new_agent(), new_agent());
    let h = new_agent();
    let (healthy, _) = s.agent(h).await;
    let mut raw = s.raw_connected(&a.to_string(), 30).await;
    let own = TopicFilter::new(topic::orders(&a)).unwrap();
    raw.send(&Packet::Subscribe(3, vec![(own, QoS::AtLeastOnce)]))
        .await;
    assert_eq!(
        raw.read().await,
        Some(Packet::SubAck(3, vec![Some(QoS::AtLeastOnce)]))
    );
    let bad_filters = [
        topic::orders(&b),
        topic::all_agents(Channel::Orders),
        format!("{}{a}/#", topic::PREFIX),
        topic::telemetry(&a),
        "#".to_owned(),
    ];
    for (n, bad) in bad_filters.iter().enumerate() {
        let mut raw = s.raw_connected(&a.to_string(), 30).await;
        let own = TopicFilter::new(topic::orders(&a)).unwrap();
        let bad_filter = TopicFilter::new(bad.clone()).unwrap();
        raw.send(&Packet::Subscribe(
            4,
            vec![(own, QoS::AtLeastOnce), (bad_filter, QoS::AtLeastOnce)],
        ))
        .await;
        assert_eq!(raw.read().await, None, "{bad}: closed without SUBACK");
        s.sink
            .until("the violation", |r| r.events.len() == n + 1)
            .await;
        assert!(matches!(
            s.sink.events().last(),
            Some(SecurityEvent::SubscribeOutsideOrders { agent, filter, .. })
                if *agent == a && filter == bad
        ));
        still_publishes(&s, &healthy, h).await;
    }
}

#[tokio::test]
async fn malformed_or_out_of_place_packets_close_with_an_event() {
    let s = Server::start(config()).await;
    let a = new_agent();
    let h = new_agent();
    let (healthy, _) = s.agent(h).await;
    let cases: [(&str, Vec<u8>); 5] = [
        ("reserved packet type", vec![0x00, 0x00]),
        ("QoS 3 publish", vec![0x36, 0x03, 0x00, 0x01, b'a']),
        (
            "a second CONNECT",
            connect(&a.to_string(), 30).to_bytes().unwrap(),
        ),
        (
            "a CONNACK from the client",
            Packet::ConnAck {
                session_present: false,
                code: ConnectReturn::Accepted,
            }
            .to_bytes()
            .unwrap(),
        ),
        (
            "remaining length over four bytes",
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
        ),
    ];
    for (n, (what, bytes)) in cases.iter().enumerate() {
        let mut raw = s.raw_connected(&a.to_string(), 30).await;
        raw.send_raw(bytes).await;
        assert_eq!(raw.read().await, None, "{what}: closed");
        s.sink.until(what, |r| r.events.len() == n + 1).await;
        assert!(
            matches!(
                s.sink.events().last(),
                Some(SecurityEvent::MalformedPacket { agent: Some(x), .. }) if *x == a
            ),
            "{what}: {:?}",
            s.sink.events()
        );
        still_publishes(&s, &healthy, h).await;
    }
    // Anything but CONNECT first.
    let mut raw = s.raw(&a.to_string()).await;
    raw.send(&Packet::PingReq).await;
    assert_eq!(raw.read().await, None);
    s.sink.until("PINGREQ first", |r| r.events.len() == 6).await;
    assert!(matches!(
        s.sink.events().last(),
        Some(SecurityEvent::MalformedPacket { detail, .. }) if detail.contains("expected CONNECT")
    ));
    still_publishes(&s, &healthy, h).await;
}

#[tokio::test]
async fn connect_deadline() {
    let mut cfg = config();
    cfg.connect_timeout = Duration::from_millis(400);
    let s = Server::start(cfg).await;
    let a = new_agent();
    // TLS done, CONNECT never sent.
    let mut raw = s.raw(&a.to_string()).await;
    let started = tokio::time::Instant::now();
    assert_eq!(raw.read().await, None);
    assert!(started.elapsed() < BOUND);
    s.sink
        .until("deadline with TLS", |r| r.events.len() == 1)
        .await;
    assert!(matches!(
        s.sink.events()[0],
        SecurityEvent::ConnectDeadline { agent: Some(x), .. } if x == a
    ));
    // Not even TLS: a bare TCP connection that says nothing.
    let tcp = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let peer = tcp.local_addr().unwrap();
    s.sink
        .until("deadline without TLS", |r| r.events.len() == 2)
        .await;
    assert_eq!(
        s.sink.events()[1],
        SecurityEvent::ConnectDeadline { agent: None, peer }
    );
    assert_eq!(s.endpoint.stats().connections, 0);
}

#[tokio::test]
async fn keep_alive_is_enforced_at_one_and_a_half_times() {
    let s = Server::start(config()).await;
    let a = new_agent();
    // Pinging every 0.8 s keeps a 1 s keep-alive connection up.
    let mut raw = s.raw_connected(&a.to_string(), 1).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        raw.send(&Packet::PingReq).await;
        assert_eq!(raw.read().await, Some(Packet::PingResp));
    }
    // Silent with a 2 s keep-alive: still up after 2.2 s (more than 1×), closed by 3 s (1.5×)
    // plus a margin for a loaded machine.
    let mut raw = s.raw(&a.to_string()).await;
    raw.send(&Packet::Connect(Connect {
        client_id: a.to_string(),
        clean_session: true,
        keep_alive: 2,
        will: Some(Will {
            topic: TopicName::new(topic::state(&a)).unwrap(),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
        }),
        username: None,
        password: None,
    }))
    .await;
    assert!(matches!(
        raw.read().await,
        Some(Packet::ConnAck {
            code: ConnectReturn::Accepted,
            ..
        })
    ));
    let started = tokio::time::Instant::now();
    assert_eq!(
        raw.read_within(Duration::from_millis(2200)).await,
        None,
        "closed before 1.1 × the keep-alive"
    );
    assert_eq!(raw.read_within(Duration::from_secs(3)).await, Some(None));
    assert!(started.elapsed() < Duration::from_secs(5));
    // The last will is stored, and the agent is offline.
    s.sink
        .until("the will", |r| r.states.last() == Some(&(a, false)))
        .await;
    let state: Vec<_> = s
        .sink
        .log
        .lock()
        .unwrap()
        .batches
        .iter()
        .flatten()
        .filter(|m| m.channel == Channel::State)
        .map(|m| m.payload.clone())
        .collect();
    assert_eq!(state, vec![Bytes::from_static(b"offline")]);
    // No security event for a silent agent.
    assert!(s.sink.events().is_empty());
}

#[tokio::test]
async fn packets_over_the_maximum_close_the_connection() {
    let mut cfg = config();
    cfg.max_packet = 1024;
    let s = Server::start(cfg).await;
    let a = new_agent();
    let mut raw = s.raw_connected(&a.to_string(), 30).await;
    raw.send(&publish(&topic::telemetry(&a), Some(1), &[b'x'; 900]))
        .await;
    assert_eq!(raw.read().await, Some(Packet::PubAck(1)));
    // Only the header of a 2000-byte publish: refused before its body is buffered.
    raw.send_raw(&[0x32, 0xD0, 0x0F]).await;
    assert_eq!(raw.read().await, None);
    s.sink.until("too large", |r| r.events.len() == 1).await;
    assert!(matches!(
        s.sink.events()[0],
        SecurityEvent::PacketTooLarge { agent: Some(x), size: 2003, max: 1024, .. } if x == a
    ));
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_and_counted() {
    let mut cfg = config();
    cfg.max_connections = 2;
    let s = Server::start(cfg).await;
    let (a, b, c) = (new_agent(), new_agent(), new_agent());
    let (ca, _) = s.agent(a).await;
    let (_cb, _) = s.agent(b).await;
    let refused = MqttClient::connect(&s.options(c), &s.ca.identity(&c.to_string())).await;
    assert!(refused.is_err(), "{refused:?}");
    s.sink.until("the refusal", |r| r.events.len() == 1).await;
    assert!(matches!(
        s.sink.events()[0],
        SecurityEvent::ConnectionLimit { .. }
    ));
    assert_eq!(s.endpoint.stats().refused, 1);
    assert_eq!(s.endpoint.stats().connections, 2);
    // The two connected agents are unaffected; when one leaves, its slot is free again.
    ca.publish(
        &topic::telemetry(&a),
        Bytes::from_static(b"1"),
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    drop(ca);
    s.sink
        .until("a offline", |r| r.states.contains(&(a, false)))
        .await;
    let (cc, _) = s.agent(c).await;
    cc.publish(
        &topic::telemetry(&c),
        Bytes::from_static(b"2"),
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    assert_eq!(s.endpoint.stats().refused, 1);
}

#[tokio::test]
async fn an_order_is_delivered_and_its_future_resolves_on_the_puback() {
    let mut cfg = config();
    cfg.max_unacked_orders = 2;
    let s = Server::start(cfg).await;
    let (a, b) = (new_agent(), new_agent());
    assert_eq!(
        s.endpoint.send_order(&a, Bytes::from_static(b"o")).err(),
        Some(SendOrderError::NotConnected)
    );
    // Through the agent's client: delivered on its orders topic, acknowledged.
    let (client, mut orders) = s.agent(a).await;
    assert_eq!(
        client
            .subscribe(&[(&topic::orders(&a), QoS::AtLeastOnce)])
            .await
            .unwrap(),
        vec![Some(QoS::AtLeastOnce)]
    );
    let ack = s
        .endpoint
        .send_order(&a, Bytes::from_static(b"power on"))
        .unwrap();
    let got = within(orders.recv()).await.unwrap();
    assert_eq!(got.message.topic, topic::orders(&a));
    assert_eq!(&got.message.payload[..], b"power on");
    // The agent's client acknowledges only when told to (after its journal write).
    got.ack();
    within(ack).await.unwrap();
    // A raw agent: the future waits for the PUBACK, and only two may be unacknowledged.
    let mut raw = s.raw_connected(&b.to_string(), 30).await;
    let mut first = s.endpoint.send_order(&b, Bytes::from_static(b"1")).unwrap();
    let second = s.endpoint.send_order(&b, Bytes::from_static(b"2")).unwrap();
    assert_eq!(
        s.endpoint.send_order(&b, Bytes::from_static(b"3")).err(),
        Some(SendOrderError::TooManyUnacknowledged)
    );
    let Some(Packet::Publish(p1)) = raw.read().await else {
        panic!("an order")
    };
    let Some(Packet::Publish(p2)) = raw.read().await else {
        panic!("an order")
    };
    assert_eq!((&p1.payload[..], p1.qos), (&b"1"[..], QoS::AtLeastOnce));
    assert_eq!(p1.topic.as_str(), topic::orders(&b));
    assert_eq!(&p2.payload[..], b"2");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut first)
            .await
            .is_err(),
        "resolved before the PUBACK"
    );
    raw.send(&Packet::PubAck(p1.packet_id.unwrap())).await;
    within(first).await.unwrap();
    // Its place in the window is free again.
    let third = s.endpoint.send_order(&b, Bytes::from_static(b"3")).unwrap();
    // The connection ends before the other PUBACKs: those orders fail.
    drop(raw);
    assert_eq!(within(second).await, Err(OrderError::Closed));
    assert_eq!(within(third).await, Err(OrderError::Closed));
}

#[tokio::test]
async fn kick_closes_the_agents_connection_only() {
    let s = Server::start(config()).await;
    let (a, b) = (new_agent(), new_agent());
    let (ca, _) = s.agent(a).await;
    let (cb, _) = s.agent(b).await;
    s.sink.until("both online", |r| r.states.len() == 2).await;
    assert!(s.endpoint.kick(&a));
    within(ca.closed()).await;
    assert!(!ca.is_connected());
    s.sink
        .until("kicked", |r| r.states.contains(&(a, false)))
        .await;
    assert!(matches!(
        s.sink.events()[..],
        [SecurityEvent::Kicked { agent, .. }] if agent == a
    ));
    assert!(!s.endpoint.is_connected(&a));
    assert!(!s.endpoint.kick(&a));
    cb.publish(
        &topic::telemetry(&b),
        Bytes::from_static(b"still"),
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    assert!(s.endpoint.is_connected(&b));
}

#[tokio::test]
async fn a_second_connection_with_the_same_id_replaces_the_first() {
    let s = Server::start(config()).await;
    let a = new_agent();
    let (first, _) = s.agent(a).await;
    let (second, orders2) = s.agent(a).await;
    within(first.closed()).await;
    let mut orders = orders2;
    // Let the old connection finish its teardown: it must not touch the new registration.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(s.endpoint.is_connected(&a));
    let ack = s
        .endpoint
        .send_order(&a, Bytes::from_static(b"to the second"))
        .unwrap();
    let got = within(orders.recv()).await.unwrap();
    assert_eq!(&got.message.payload[..], b"to the second");
    got.ack();
    within(ack).await.unwrap();
    second
        .publish(
            &topic::telemetry(&a),
            Bytes::from_static(b"x"),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    drop(second);
    s.sink.until("offline", |r| r.states.len() == 3).await;
    // The replaced connection reports nothing: online, online, offline.
    assert_eq!(
        s.sink.log.lock().unwrap().states,
        vec![(a, true), (a, true), (a, false)]
    );
    assert!(s.sink.events().is_empty());
}

/// A connected agent (online recorded) with commits held from now on, and a function that
/// publishes the one-byte payload `n` at QoS 1 and returns its pending PUBACK.
async fn held_agent(
    s: &Server,
) -> (
    AgentId,
    impl Fn(u8) -> std::pin::Pin<Box<dyn std::future::Future<Output = PendingAck> + Send>> + use<>,
) {
    let a = new_agent();
    let (client, _) = s.agent(a).await;
    s.sink
        .until("online", |r| r.states.contains(&(a, true)))
        .await;
    s.sink.hold();
    let send = move |n: u8| {
        let client = client.clone();
        Box::pin(async move {
            client
                .send_publish(
                    &topic::telemetry(&a),
                    Bytes::from(vec![n]),
                    QoS::AtLeastOnce,
                    false,
                )
                .await
                .unwrap()
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = PendingAck> + Send>>
    };
    (a, send)
}

/// Saturated (a full batch waiting), the next batch is prepared while one commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_batch_is_prepared_while_one_commits_and_commits_after_it() {
    let mut c = config();
    c.max_batch = 2;
    let mut s = Server::start(c).await;
    let (a, send) = held_agent(&s).await;
    let mut acks = vec![Box::pin(send(0).await.acked())];
    // The first commit is held by the sink …
    within(s.commits.recv()).await.unwrap();
    for n in 1..6u8 {
        acks.push(Box::pin(send(n).await.acked()));
    }
    // … and the next batch is prepared meanwhile, but neither committed nor acknowledged.
    s.sink
        .until("the next batch prepared", |r| {
            r.prepared.iter().filter(|m| m.agent == a).count() >= 2
        })
        .await;
    assert!(s.sink.payloads(a).is_empty());
    for ack in &mut acks {
        assert!(
            tokio::time::timeout(Duration::from_millis(200), ack.as_mut())
                .await
                .is_err(),
            "a PUBACK came before its commit"
        );
    }
    s.sink.release();
    for ack in acks {
        within(ack).await.unwrap();
    }
    // Committed in the order received, each batch in the order it was prepared.
    let got: Vec<u8> = s.sink.payloads(a).iter().map(|p| p[0]).collect();
    assert_eq!(got, (0..6u8).collect::<Vec<_>>());
    let log = s.sink.log.lock().unwrap();
    let prepared: Vec<u8> = log.prepared.iter().map(|m| m.payload[0]).collect();
    assert_eq!(prepared, got);
    drop(log);
    let stats = s.endpoint.stats();
    assert_eq!(stats.committed, 6);
    assert!(stats.batches >= 2, "{stats:?}");
}

/// Below capacity, what arrives during a commit goes into the very next commit, all of it: a
/// message waits for one commit besides its own, not two (it is not left behind a batch that
/// was prepared early with only what had arrived at that moment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_arrives_during_a_commit_is_all_in_the_next_commit() {
    let mut s = Server::start(config()).await;
    let (a, send) = held_agent(&s).await;
    let mut acks = vec![Box::pin(send(0).await.acked())];
    // The first commit is held by the sink; five more arrive one by one meanwhile.
    assert_eq!(within(s.commits.recv()).await, Some(1));
    for n in 1..6u8 {
        acks.push(Box::pin(send(n).await.acked()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    no_puback_until_released(&s, a, acks, Duration::from_millis(100)).await;
    // The five that waited are one commit, the next one.
    assert_eq!(within(s.commits.recv()).await, Some(5));
    let got: Vec<u8> = s.sink.payloads(a).iter().map(|p| p[0]).collect();
    assert_eq!(got, (0..6u8).collect::<Vec<_>>());
    let stats = s.endpoint.stats();
    assert_eq!((stats.committed, stats.batches), (6, 2), "{stats:?}");
}

/// The writer commits on a thread of its own unless told otherwise; either way the messages
/// are committed and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_commits_on_its_own_thread_unless_told_otherwise() {
    for own in [true, false] {
        let mut c = config();
        c.own_writer_thread = own;
        let s = Server::start(c).await;
        let a = new_agent();
        let (client, _) = s.agent(a).await;
        let ack = client
            .send_publish(
                &topic::telemetry(&a),
                Bytes::from_static(b"m"),
                QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
        within(ack.acked()).await.unwrap();
        let threads = s.sink.log.lock().unwrap().commit_threads.clone();
        let on_own = threads
            .iter()
            .all(|t| t.as_deref() == Some("epmc-ingest-writer"));
        assert_eq!(on_own, own, "{threads:?}");
        s.endpoint.shutdown().await;
    }
}

/// Connections that come while the writer is busy have their presence recorded together,
/// in the order they came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_changes_waiting_together_are_handed_over_together() {
    let mut s = Server::start(config()).await;
    let first = new_agent();
    let (client, _) = s.agent(first).await;
    s.sink.hold();
    let ack = client
        .send_publish(
            &topic::telemetry(&first),
            Bytes::from_static(b"m"),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    within(s.commits.recv()).await.unwrap();
    // While that commit is held, five more agents connect.
    let agents: Vec<_> = (0..5).map(|_| new_agent()).collect();
    let mut clients = Vec::new();
    for a in &agents {
        clients.push(s.agent(*a).await);
    }
    s.sink.release();
    within(ack.acked()).await.unwrap();
    s.sink
        .until("every agent online", |r| r.states.len() == 6)
        .await;
    let log = s.sink.log.lock().unwrap();
    let online: Vec<_> = log.states.iter().map(|(a, _)| *a).collect();
    let mut expected = vec![first];
    expected.extend(&agents);
    assert_eq!(online, expected);
    assert!(log.states.iter().all(|(_, on)| *on));
    assert_eq!(log.state_batches.iter().sum::<usize>(), 6);
    assert!(
        log.state_batches.iter().any(|n| *n >= 2),
        "{:?}",
        log.state_batches
    );
}

/// Presence changes that come while the writer lingers are one commit, and a message ends the
/// linger: with a linger of an hour, three agents' connections wait together, and the first
/// message (acknowledged only after its commit) hands them over with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_changes_linger_together_until_a_message_comes() {
    let mut c = config();
    c.presence_linger = Duration::from_secs(3600);
    let s = Server::start(c).await;
    let agents: Vec<_> = (0..3).map(|_| new_agent()).collect();
    let mut clients = Vec::new();
    for a in &agents {
        clients.push(s.agent(*a).await);
    }
    let ack = clients[0]
        .0
        .send_publish(
            &topic::telemetry(&agents[0]),
            Bytes::from_static(b"m"),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    within(ack.acked()).await.unwrap();
    s.sink
        .until("every agent online", |r| r.states.len() == 3)
        .await;
    let log = s.sink.log.lock().unwrap();
    let online: Vec<_> = log.states.iter().map(|(a, _)| *a).collect();
    assert_eq!(online, agents);
    assert_eq!(log.state_batches, vec![3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_agents_share_commits() {
    const AGENTS: usize = 20;
    const EACH: usize = 10;
    let mut s = Server::start(config()).await;
    let mut clients = Vec::new();
    for _ in 0..AGENTS {
        let a = new_agent();
        clients.push((a, s.agent(a).await.0));
    }
    s.sink.hold();
    let mut tasks = Vec::new();
    for (a, c) in &clients {
        let (a, c) = (*a, c.clone());
        tasks.push(tokio::spawn(async move {
            let mut pending = Vec::new();
            for n in 0..EACH {
                pending.push(
                    c.send_publish(
                        &topic::telemetry(&a),
                        Bytes::from(vec![n as u8]),
                        QoS::AtLeastOnce,
                        false,
                    )
                    .await
                    .unwrap(),
                );
            }
            for p in pending {
                p.acked().await.unwrap();
            }
        }));
    }
    within(s.commits.recv()).await.unwrap();
    // While the first commit is held, the rest queue up behind it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.sink.release();
    for t in tasks {
        within(t).await.unwrap();
    }
    let stats = s.endpoint.stats();
    assert_eq!(stats.committed, (AGENTS * EACH) as u64);
    assert!(
        stats.batches < stats.committed,
        "{} batches for {} messages",
        stats.batches,
        stats.committed
    );
    // Each agent's messages are stored in its order.
    for (a, _) in &clients {
        let got: Vec<u8> = s.sink.payloads(*a).iter().map(|p| p[0]).collect();
        assert_eq!(got, (0..EACH as u8).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn a_slow_reader_is_closed_without_blocking_the_server() {
    // Either bound alone closes an agent that never reads: the bytes queued for it, or the
    // time one write takes.
    for (max_outgoing_bytes, write_timeout) in [
        (8 * 1024 * 1024, Duration::from_secs(3600)),
        (1024 * 1024 * 1024, Duration::from_millis(500)),
    ] {
        let mut cfg = config();
        cfg.max_packet = 4 * 1024 * 1024;
        cfg.max_unacked_orders = 16;
        cfg.max_outgoing_bytes = max_outgoing_bytes;
        cfg.write_timeout = write_timeout;
        cfg.shutdown_grace = Duration::from_millis(100);
        let s = Server::start(cfg).await;
        let (a, b) = (new_agent(), new_agent());
        // Connected, then never reads again.
        let raw = s.raw_connected(&a.to_string(), 0).await;
        let (healthy, _) = s.agent(b).await;
        let big = Bytes::from(vec![b'o'; 3 * 1024 * 1024]);
        let mut acks = Vec::new();
        for _ in 0..16 {
            acks.push(s.endpoint.send_order(&a, big.clone()).unwrap());
        }
        for ack in acks {
            assert_eq!(within(ack).await, Err(OrderError::Closed));
        }
        assert!(!s.endpoint.is_connected(&a));
        healthy
            .publish(
                &topic::telemetry(&b),
                Bytes::from_static(b"fine"),
                QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
        drop(raw);
    }
}

#[tokio::test]
async fn graceful_shutdown_lets_commits_in_flight_be_acknowledged() {
    let mut s = Server::start(config()).await;
    let a = new_agent();
    let (client, _) = s.agent(a).await;
    s.sink.hold();
    let pending = client
        .send_publish(
            &topic::telemetry(&a),
            Bytes::from_static(b"last"),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    within(s.commits.recv()).await.unwrap();
    let endpoint = s.endpoint.clone();
    let shutdown = tokio::spawn(async move { endpoint.shutdown().await });
    // Accepting has stopped.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = MqttClient::connect(&s.options(new_agent()), &s.ca.identity(&a.to_string())).await;
    assert!(late.is_err(), "{late:?}");
    s.sink.release();
    within(pending.acked()).await.unwrap();
    within(shutdown).await.unwrap();
    within(client.closed()).await;
    assert_eq!(s.sink.payloads(a), vec![Bytes::from_static(b"last")]);
    assert_eq!(s.endpoint.stats().connections, 0);
}

#[tokio::test]
async fn shutdown_with_a_stuck_sink_ends_in_bounded_time_without_a_puback() {
    let mut cfg = config();
    cfg.shutdown_grace = Duration::from_millis(300);
    cfg.write_timeout = Duration::from_millis(300);
    let mut s = Server::start(cfg).await;
    let a = new_agent();
    let (client, _) = s.agent(a).await;
    s.sink.hold();
    let pending = client
        .send_publish(
            &topic::telemetry(&a),
            Bytes::from_static(b"never committed"),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    within(s.commits.recv()).await.unwrap();
    // The sink never returns: shutdown still ends, and the message is not acknowledged.
    within(s.endpoint.shutdown()).await;
    assert!(within(pending.acked()).await.is_err());
    assert!(s.sink.payloads(a).is_empty());
    assert_eq!(s.endpoint.stats().committed, 0);
}

//! The MQTT/TLS client against a real Mosquitto with client certificates.

mod support;

use std::time::Duration;

use bytes::Bytes;
use std::sync::{Arc, Mutex};

use epmc_transport::client::{MqttClient, MqttError, TlsIdentity};
use epmc_transport::forward::Forwarder;
use epmc_transport::mqtt::{QoS, TopicName, Will};
use epmc_transport::outbox::{Limits, Outbox};
use epmc_transport::session::MqttSession;
use epmc_transport::{MessageId, OrderSource, OutboundMessage, Priority};
use support::{BOUND, Broker, Ca, Proxy, within};

const A: &str = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
const B: &str = "0b9e8d7c-6b5a-4f3e-8d2c-1b0a9f8e7d6c";

fn t(agent: &str, channel: &str) -> String {
    format!("epmc/v1/agents/{agent}/{channel}")
}

#[tokio::test]
async fn publish_subscribe_round_trip_over_mtls() {
    let broker = Broker::start();
    let id = broker.ca.identity(A);
    let (c, _, mut incoming) = within(MqttClient::connect(&broker.options(A), &id))
        .await
        .unwrap();
    let granted = within(c.subscribe(&[(&t(A, "orders"), QoS::AtLeastOnce)]))
        .await
        .unwrap();
    assert_eq!(granted, vec![Some(QoS::AtLeastOnce)]);
    within(c.publish(
        &t(A, "orders"),
        Bytes::from_static(b"hello"),
        QoS::AtLeastOnce,
        false,
    ))
    .await
    .unwrap();
    let got = within(incoming.recv()).await.unwrap();
    assert_eq!(got.topic, t(A, "orders"));
    assert_eq!(&got.payload[..], b"hello");
}

#[tokio::test]
async fn refused_without_a_valid_certificate_or_name() {
    let broker = Broker::start();
    // A certificate from a foreign CA: the broker refuses the handshake.
    let foreign = Ca::new("Foreign CA");
    let (cert, key) = foreign.client(A);
    let bad =
        TlsIdentity::from_pem(broker.ca.pem.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap();
    let err = within(MqttClient::connect(&broker.options(A), &bad))
        .await
        .unwrap_err();
    assert!(
        matches!(err, MqttError::Io(_) | MqttError::Closed),
        "{err:?}"
    );
    // Pinning the wrong CA: our side refuses the server.
    let (cert, key) = broker.ca.client(A);
    let wrong_ca =
        TlsIdentity::from_pem(foreign.pem.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap();
    let err = within(MqttClient::connect(&broker.options(A), &wrong_ca))
        .await
        .unwrap_err();
    assert!(matches!(err, MqttError::Io(_)), "{err:?}");
    // A server name the certificate does not carry.
    let mut opts = broker.options(A);
    opts.server_name = "broker.example".into();
    let err = within(MqttClient::connect(&opts, &broker.ca.identity(A)))
        .await
        .unwrap_err();
    assert!(matches!(err, MqttError::Io(_)), "{err:?}");
    // Without a client certificate the broker ends the handshake: a raw TLS client with no
    // certificate cannot complete a CONNECT.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(broker.ca.pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let outcome = within(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await?;
        let connect = epmc_transport::mqtt::Packet::Connect(epmc_transport::mqtt::Connect {
            client_id: A.into(),
            clean_session: true,
            keep_alive: 30,
            will: None,
            username: None,
            password: None,
        });
        s.write_all(&connect.to_bytes().unwrap()).await?;
        let mut b = [0u8; 4];
        let n = s.read(&mut b).await?;
        Ok::<usize, std::io::Error>(n)
    })
    .await;
    assert!(
        matches!(outcome, Err(_) | Ok(0)),
        "no CONNACK without a certificate: {outcome:?}"
    );
}

/// Whether nothing arrives on `rx` for 300 ms.
async fn quiet(rx: &mut tokio::sync::mpsc::Receiver<epmc_transport::InboundMessage>) -> bool {
    tokio::time::timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_err()
}

/// The ACL limits each agent (user name = certificate CN) to its own prefix, both ways.
/// Mosquitto grants a subscription outside the prefix but delivers nothing on it; it
/// acknowledges a publish outside the prefix, drops it, and (2.0.11, Debian 12) then closes
/// the publisher's connection. So the checks are made at the subscribers.
#[tokio::test]
async fn an_agent_can_neither_read_nor_write_outside_its_prefix() {
    let broker = Broker::start();
    let connect = |agent: &'static str| {
        let (opts, id) = (broker.options(agent), broker.ca.identity(agent));
        async move { within(MqttClient::connect(&opts, &id)).await.unwrap() }
    };
    let (b, _, mut b_in) = connect(B).await;
    within(b.subscribe(&[(&t(B, "#"), QoS::AtLeastOnce)]))
        .await
        .unwrap();
    let (a, _, mut a_in) = connect(A).await;
    within(a.subscribe(&[
        (&t(A, "#"), QoS::AtLeastOnce),
        (&t(B, "#"), QoS::AtLeastOnce),
    ]))
    .await
    .unwrap();

    // Reading: B publishes in its own prefix; B gets it, A (subscribed there) does not.
    within(b.publish(
        &t(B, "telemetry"),
        Bytes::from_static(b"b-own"),
        QoS::AtLeastOnce,
        false,
    ))
    .await
    .unwrap();
    assert_eq!(&within(b_in.recv()).await.unwrap().payload[..], b"b-own");
    within(a.publish(
        &t(A, "telemetry"),
        Bytes::from_static(b"a-own"),
        QoS::AtLeastOnce,
        false,
    ))
    .await
    .unwrap();
    let first = within(a_in.recv()).await.unwrap();
    assert_eq!(&first.payload[..], b"a-own", "B's message must not reach A");
    assert!(quiet(&mut a_in).await);

    // Writing: A publishes into B's prefix; acknowledged, but B never sees it.
    within(a.publish(
        &t(B, "orders"),
        Bytes::from_static(b"forged"),
        QoS::AtLeastOnce,
        false,
    ))
    .await
    .unwrap();
    assert!(quiet(&mut b_in).await, "the forged order must not arrive");
    within(b.publish(
        &t(B, "telemetry"),
        Bytes::from_static(b"b-again"),
        QoS::AtLeastOnce,
        false,
    ))
    .await
    .unwrap();
    assert_eq!(&within(b_in.recv()).await.unwrap().payload[..], b"b-again");
}

#[tokio::test]
async fn last_will_and_persistent_session() {
    let broker = Broker::start();
    // The server side (standing in for epmc-server) watches the agent's state topic and
    // sends it an order; it uses the agent's identity because of the per-agent ACL.
    let mut server_opts = broker.options(&format!("{A}-server"));
    server_opts.clean_session = true;
    let (server, _, mut server_in) =
        within(MqttClient::connect(&server_opts, &broker.ca.identity(A)))
            .await
            .unwrap();
    within(server.subscribe(&[(&t(A, "state"), QoS::AtLeastOnce)]))
        .await
        .unwrap();

    let proxy = Proxy::start(broker.addr).await;
    let mut opts = broker.options(A);
    opts.addr = proxy.addr;
    opts.will = Some(Will {
        topic: TopicName::new(t(A, "state")).unwrap(),
        payload: Bytes::from_static(b"offline"),
        qos: QoS::AtLeastOnce,
        retain: false,
    });
    // The agent subscribes to its orders with a persistent session, then goes away cleanly.
    let (agent, _, _) = within(MqttClient::connect(&opts, &broker.ca.identity(A)))
        .await
        .unwrap();
    within(agent.subscribe(&[(&t(A, "orders"), QoS::AtLeastOnce)]))
        .await
        .unwrap();
    drop(agent); // DISCONNECT: no will
    tokio::time::sleep(Duration::from_millis(200)).await;
    // An order is published while the agent is offline.
    within(server.publish(
        &t(A, "orders"),
        Bytes::from_static(b"order-1"),
        QoS::AtLeastOnce,
        false,
    ))
    .await
    .unwrap();
    // The agent comes back: the session is resumed and the queued order arrives.
    let (agent, session_present, mut agent_in) =
        within(MqttClient::connect(&opts, &broker.ca.identity(A)))
            .await
            .unwrap();
    assert!(session_present);
    let got = within(agent_in.recv()).await.unwrap();
    assert_eq!(&got.payload[..], b"order-1");
    // Now the agent's connection dies without DISCONNECT: the broker publishes the will.
    proxy.cut();
    let will = within(server_in.recv()).await.unwrap();
    assert_eq!(will.topic, t(A, "state"));
    assert_eq!(&will.payload[..], b"offline");
    // And the client notices the dead connection.
    let err = within(agent.publish(&t(A, "events"), Bytes::new(), QoS::AtLeastOnce, false)).await;
    assert!(err.is_err());
}

/// A forwarder drains 3000 messages through an `MqttSession` (window 16, batches of 64) while
/// the broker is restarted in the middle of the run: every message arrives, once after
/// de-duplication, in order, and the outbox ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarder_loses_nothing_when_the_broker_restarts_mid_run() {
    const N: u16 = 3000;
    let mut broker = Broker::start();
    let watcher = tokio::spawn({
        let (addr, id, topic) = (broker.addr, broker.ca.identity(A), t(A, "telemetry"));
        let last = (N - 1).to_be_bytes();
        async move { support::collect_until(addr, id, &format!("{A}-watch"), &topic, &last).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await; // let the watcher subscribe
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(Mutex::new(
        Outbox::open(dir.path(), Limits::default()).unwrap(),
    ));
    for n in 0..N {
        let mut id = [0u8; 16];
        id[..2].copy_from_slice(&n.to_be_bytes());
        outbox
            .lock()
            .unwrap()
            .push(OutboundMessage {
                id: MessageId::from_bytes(id),
                topic: t(A, "telemetry"),
                payload: Bytes::copy_from_slice(&n.to_be_bytes()),
                priority: Priority::Routine,
            })
            .unwrap();
    }
    let mut opts = broker.options(A);
    opts.in_flight = 16;
    let session = Arc::new(MqttSession::start(opts, broker.ca.identity(A), &[]).unwrap());
    assert!(session.wait_connected(BOUND).await);
    let forwarder = Arc::new(Forwarder::new(outbox.clone(), session.clone()).with_window(64));
    let running = forwarder.spawn(Duration::from_millis(50));
    // Restart once a third has gone out, with publishes in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while outbox.lock().unwrap().stats().messages > usize::from(N) * 2 / 3 {
        assert!(tokio::time::Instant::now() < deadline, "nothing drained");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let left_at_restart = outbox.lock().unwrap().stats().messages;
    let broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .unwrap();
    while !outbox.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "outbox did not drain"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.stop().await;
    assert!(left_at_restart > 0, "the restart came mid-run");
    assert!(session.stats().connects >= 2, "{:?}", session.stats());
    let stats = forwarder.stats();
    assert!(
        stats.stalls >= 1,
        "the restart interrupted the run: {stats:?}"
    );
    assert_eq!(stats.rejected, 0);
    assert_eq!(stats.sent, u64::from(N));
    let got: Vec<u16> = tokio::time::timeout(Duration::from_secs(90), watcher)
        .await
        .expect("watcher ends")
        .unwrap()
        .iter()
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect();
    drop(broker);
    assert_eq!(
        got,
        (0..N).collect::<Vec<u16>>(),
        "every message once after de-duplication, in order"
    );
}

/// Orders keep arriving after the broker forgot every session: the session subscribes again
/// on each connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_resubscribes_after_the_broker_forgets_it() {
    let mut broker = Broker::start();
    let orders = t(A, "orders");
    let session = MqttSession::start(
        broker.options(A),
        broker.ca.identity(A),
        &[(&orders, QoS::AtLeastOnce)],
    )
    .unwrap();
    assert!(session.wait_connected(BOUND).await);
    let send_order = |addr, id: TlsIdentity, payload: &'static [u8]| {
        let orders = orders.clone();
        async move {
            let mut opts =
                epmc_transport::client::MqttOptions::new(addr, "localhost", &format!("{A}-server"));
            opts.clean_session = true;
            let (server, _, _) = MqttClient::connect(&opts, &id).await.unwrap();
            server
                .publish(
                    &orders,
                    Bytes::from_static(payload),
                    QoS::AtLeastOnce,
                    false,
                )
                .await
                .unwrap();
        }
    };
    within(send_order(broker.addr, broker.ca.identity(A), b"order-1")).await;
    let got = within(session.next_order()).await.unwrap();
    assert_eq!(&got.payload[..], b"order-1");

    // The broker dies and comes back with no saved state.
    let broker = tokio::task::spawn_blocking(move || {
        broker.restart_forgetting();
        broker
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + BOUND;
    while session.stats().connects < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            session.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !session.stats().session_present,
        "the broker forgot the session"
    );
    within(send_order(broker.addr, broker.ca.identity(A), b"order-2")).await;
    let got = within(session.next_order()).await.unwrap();
    assert_eq!(&got.payload[..], b"order-2");
    assert_eq!(got.topic, orders);
}

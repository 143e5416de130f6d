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
use epmc_transport::{MessageId, OrderSource, OutboundMessage, Priority, ReceivedOrder};
use support::{BOUND, Broker, Ca, Proxy, SERVER, within};

type Incoming = tokio::sync::mpsc::Receiver<ReceivedOrder>;

const A: &str = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
const B: &str = "0b9e8d7c-6b5a-4f3e-8d2c-1b0a9f8e7d6c";

fn t(agent: &str, channel: &str) -> String {
    format!("epmc/v1/agents/{agent}/{channel}")
}

/// A client of the test broker with this certificate CN and client id.
async fn connect_as(
    broker: &Broker,
    cn: &str,
    client_id: &str,
    clean_session: bool,
) -> (MqttClient, bool, Incoming) {
    let mut opts = broker.options(client_id);
    opts.clean_session = clean_session;
    within(MqttClient::connect(&opts, &broker.ca.identity(cn)))
        .await
        .unwrap()
}

async fn publish(c: &MqttClient, topic: &str, payload: &'static [u8]) {
    within(c.publish(topic, Bytes::from_static(payload), QoS::AtLeastOnce, false))
        .await
        .unwrap();
}

/// The next incoming payload, acknowledged.
async fn next_acked(rx: &mut Incoming) -> (String, Bytes) {
    let o = within(rx.recv()).await.expect("an incoming publish");
    let m = o.message.clone();
    o.ack();
    (m.topic, m.payload)
}

#[tokio::test]
async fn orders_and_telemetry_round_trip_over_mtls() {
    let broker = Broker::start();
    let (server, _, mut server_in) = connect_as(&broker, SERVER, SERVER, true).await;
    let granted = within(server.subscribe(&[(&t(A, "telemetry"), QoS::AtLeastOnce)]))
        .await
        .unwrap();
    assert_eq!(granted, vec![Some(QoS::AtLeastOnce)]);
    let (a, _, mut a_in) = connect_as(&broker, A, A, false).await;
    within(a.subscribe(&[(&t(A, "orders"), QoS::AtLeastOnce)]))
        .await
        .unwrap();
    publish(&server, &t(A, "orders"), b"order").await;
    let got = next_acked(&mut a_in).await;
    assert_eq!(got, (t(A, "orders"), Bytes::from_static(b"order")));
    publish(&a, &t(A, "telemetry"), b"hello").await;
    let got = next_acked(&mut server_in).await;
    assert_eq!(got, (t(A, "telemetry"), Bytes::from_static(b"hello")));
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
async fn quiet(rx: &mut Incoming) -> bool {
    tokio::time::timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_err()
}

/// The shipped ACL limits each agent (user name = certificate CN) to its own topics: it
/// writes hello/telemetry/events/results/state and reads its orders, nothing else; the
/// server's identity reads what agents send and writes their orders. Mosquitto grants a
/// subscription outside the rules but delivers nothing on it; it acknowledges a publish
/// outside them, drops it, and (2.0.11, Debian 12) then closes the publisher's connection.
/// So the checks are made at the subscribers.
#[tokio::test]
async fn an_agent_can_neither_read_nor_write_outside_its_topics() {
    let broker = Broker::start();
    let (server, _, mut server_in) = connect_as(&broker, SERVER, SERVER, true).await;
    within(server.subscribe(&[("epmc/v1/agents/#", QoS::AtLeastOnce)]))
        .await
        .unwrap();
    let (_b, _, mut b_in) = connect_as(&broker, B, B, true).await;
    within(_b.subscribe(&[(&t(B, "orders"), QoS::AtLeastOnce)]))
        .await
        .unwrap();
    let (a, _, mut a_in) = connect_as(&broker, A, A, true).await;
    within(a.subscribe(&[
        (&t(A, "#"), QoS::AtLeastOnce),
        (&t(B, "#"), QoS::AtLeastOnce),
    ]))
    .await
    .unwrap();

    // What an agent sends reaches the server, on each of its five channels.
    for channel in ["hello", "telemetry", "events", "results", "state"] {
        publish(&a, &t(A, channel), b"a").await;
        assert_eq!(next_acked(&mut server_in).await.0, t(A, channel));
    }
    // The server's order reaches its agent only: A, subscribed to B's prefix, gets nothing.
    publish(&server, &t(B, "orders"), b"for-b").await;
    assert_eq!(&next_acked(&mut b_in).await.1[..], b"for-b");
    publish(&server, &t(A, "orders"), b"for-a").await;
    let first = next_acked(&mut a_in).await;
    assert_eq!(
        first,
        (t(A, "orders"), Bytes::from_static(b"for-a")),
        "B's order must not reach A, and A must not read its own telemetry"
    );
    assert!(quiet(&mut a_in).await);
    // The server, subscribed to everything, receives its own orders too.
    assert_eq!(next_acked(&mut server_in).await.0, t(B, "orders"));
    assert_eq!(next_acked(&mut server_in).await.0, t(A, "orders"));

    // Writing what it may not (the server reads all of these, B its orders): each denied
    // publish closes A's connection, so one connection each.
    drop((a, a_in));
    for topic in [t(A, "orders"), t(B, "orders"), t(B, "telemetry")] {
        let (a, _, _) = connect_as(&broker, A, A, true).await;
        publish(&a, &topic, b"forged").await;
        assert!(quiet(&mut server_in).await, "{topic} reached the server");
        assert!(quiet(&mut b_in).await, "{topic} reached B");
    }
    // The readers still receive what they may.
    publish(&server, &t(B, "orders"), b"for-b-again").await;
    assert_eq!(&next_acked(&mut b_in).await.1[..], b"for-b-again");
}

#[tokio::test]
async fn last_will_and_persistent_session() {
    let broker = Broker::start();
    // The server side (standing in for epmc-server) watches the agent's state topic and
    // sends it an order; it uses the agent's identity because of the per-agent ACL.
    let (server, _, mut server_in) = connect_as(&broker, SERVER, SERVER, true).await;
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
    let got = next_acked(&mut agent_in).await;
    assert_eq!(&got.1[..], b"order-1");
    // Now the agent's connection dies without DISCONNECT: the broker publishes the will.
    proxy.cut();
    let will = next_acked(&mut server_in).await;
    assert_eq!(will, (t(A, "state"), Bytes::from_static(b"offline")));
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
        let (addr, id, topic) = (broker.addr, broker.ca.identity(SERVER), t(A, "telemetry"));
        let last = (N - 1).to_be_bytes();
        async move { support::collect_until(addr, id, &topic, &last).await }
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
            let mut opts = epmc_transport::client::MqttOptions::new(addr, "localhost", SERVER);
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
    within(send_order(
        broker.addr,
        broker.ca.identity(SERVER),
        b"order-1",
    ))
    .await;
    let got = within(session.next_order()).await.unwrap();
    assert_eq!(&got.message.payload[..], b"order-1");
    got.ack();

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
    within(send_order(
        broker.addr,
        broker.ca.identity(SERVER),
        b"order-2",
    ))
    .await;
    let got = within(session.next_order()).await.unwrap();
    assert_eq!(&got.message.payload[..], b"order-2");
    assert_eq!(got.message.topic, orders);
    got.ack();
}

/// An order received and not acknowledged comes again when the agent reconnects with its
/// persistent session (marked DUP by Mosquitto); once acknowledged it does not.
#[tokio::test]
async fn an_unacknowledged_order_comes_again_after_reconnecting_an_acknowledged_one_does_not() {
    let broker = Broker::start();
    let (server, _, _) = connect_as(&broker, SERVER, SERVER, true).await;
    let (agent, _, mut agent_in) = connect_as(&broker, A, A, false).await;
    within(agent.subscribe(&[(&t(A, "orders"), QoS::AtLeastOnce)]))
        .await
        .unwrap();
    publish(&server, &t(A, "orders"), b"order-1").await;
    let first = within(agent_in.recv()).await.unwrap();
    assert_eq!(&first.message.payload[..], b"order-1");
    assert!(!first.redelivered());
    drop(first); // not recorded: no acknowledgement
    drop(agent); // DISCONNECT
    drop(agent_in);

    let (agent, present, mut agent_in) = connect_as(&broker, A, A, false).await;
    assert!(present);
    let again = within(agent_in.recv())
        .await
        .expect("the order comes again");
    assert_eq!(&again.message.payload[..], b"order-1");
    assert!(again.redelivered(), "Mosquitto marks the redelivery DUP");
    again.ack();
    drop(agent);
    drop(agent_in);

    let (_agent, present, mut agent_in) = connect_as(&broker, A, A, false).await;
    assert!(present);
    publish(&server, &t(A, "orders"), b"order-2").await;
    let next = next_acked(&mut agent_in).await;
    assert_eq!(
        &next.1[..],
        b"order-2",
        "the acknowledged order-1 must not come again"
    );
    assert!(quiet(&mut agent_in).await);
}

/// The client id is bound to the certificate: A's certificate presenting B's client id does
/// not resume B's session, does not receive B's queued order, and does not disconnect a
/// connected B. Mosquitto (`use_username_as_clientid true`) does not refuse such a CONNECT:
/// it accepts it and replaces the client id with the certificate's CN, so the connection is
/// simply A's (it takes over A's own session, as a second connection of A would).
#[tokio::test]
async fn a_foreign_client_id_gets_nothing_of_the_other_agent() {
    let broker = Broker::start();
    let (server, _, _) = connect_as(&broker, SERVER, SERVER, true).await;
    // B has a persistent session and an order queued while it is offline.
    let (b, _, _) = connect_as(&broker, B, B, false).await;
    within(b.subscribe(&[(&t(B, "orders"), QoS::AtLeastOnce)]))
        .await
        .unwrap();
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish(&server, &t(B, "orders"), b"for-b").await;

    // A's certificate with B's client id: a fresh session (A has none), nothing of B's.
    let (impostor, present, mut impostor_in) = connect_as(&broker, A, B, false).await;
    assert!(!present, "B's session must not be resumed");
    assert!(
        quiet(&mut impostor_in).await,
        "B's queued order must not reach A's certificate"
    );
    assert!(impostor.is_connected(), "accepted, not refused");

    // B comes back: its session and its queued order are intact.
    let (b, present, mut b_in) = connect_as(&broker, B, B, false).await;
    assert!(present, "B's session survived");
    assert_eq!(&next_acked(&mut b_in).await.1[..], b"for-b");

    // Again while B is connected: B stays connected and keeps receiving. The second
    // impostor connection takes over the first one's session: both were given the id A.
    let (impostor_2, _, mut impostor_2_in) = connect_as(&broker, A, B, false).await;
    within(impostor.closed()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.is_connected(), "B must not be disconnected");
    publish(&server, &t(B, "orders"), b"for-b-2").await;
    assert_eq!(&next_acked(&mut b_in).await.1[..], b"for-b-2");
    assert!(quiet(&mut impostor_2_in).await);
    // It is A: it receives A's orders.
    within(impostor_2.subscribe(&[(&t(A, "orders"), QoS::AtLeastOnce)]))
        .await
        .unwrap();
    publish(&server, &t(A, "orders"), b"for-a").await;
    assert_eq!(&next_acked(&mut impostor_2_in).await.1[..], b"for-a");
}

/// A certificate on the CA's revocation list (`crlfile`) is refused once the broker restarts
/// with the new list, and the restart ends its open connection; other agents still connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused() {
    let mut broker = Broker::start();
    let (cert, key) = broker.ca.client_with_serial(A, Some(0x4242));
    let revoked =
        TlsIdentity::from_pem(broker.ca.pem.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap();
    let (a, _, _) = within(MqttClient::connect(&broker.options(A), &revoked))
        .await
        .expect("accepted before the revocation");
    broker.revoke(&[0x4242]);
    let broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .unwrap();
    within(a.closed()).await;
    let err = within(MqttClient::connect(&broker.options(A), &revoked))
        .await
        .unwrap_err();
    assert!(
        matches!(err, MqttError::Io(_) | MqttError::Closed),
        "{err:?}"
    );
    // A's other certificate (not revoked) and B still get in.
    let (_a2, _, _) = connect_as(&broker, A, A, true).await;
    let (b, _, _) = connect_as(&broker, B, B, true).await;
    assert!(b.is_connected());
}

/// A session's birth message goes out after every connection: the retained `online` is there
/// again after the broker restarted with no saved state, and the last will replaces it when
/// the connection dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_says_online_after_each_connection_and_its_will_says_offline() {
    let mut broker = Broker::start();
    let state = t(A, "state");
    let proxy = Proxy::start(broker.addr).await;
    let mut opts = broker.options(A);
    opts.addr = proxy.addr;
    let message = |payload: &'static [u8]| Will {
        topic: TopicName::new(state.clone()).unwrap(),
        payload: Bytes::from_static(payload),
        qos: QoS::AtLeastOnce,
        retain: true,
    };
    opts.will = Some(message(b"offline"));
    opts.birth = Some(message(b"online"));
    let session = MqttSession::start(opts, broker.ca.identity(A), &[]).unwrap();
    assert!(session.wait_connected(BOUND).await);
    // What a subscriber to the state topic finds (retained) now.
    let server_id = broker.ca.identity(SERVER);
    let retained = |addr| {
        let (id, state) = (server_id.clone(), state.clone());
        async move {
            let mut o = epmc_transport::client::MqttOptions::new(addr, "localhost", SERVER);
            o.clean_session = true;
            let (server, _, mut incoming) = MqttClient::connect(&o, &id).await.unwrap();
            server
                .subscribe(&[(&state, QoS::AtLeastOnce)])
                .await
                .unwrap();
            let got = next_acked(&mut incoming).await;
            assert_eq!(got.0, state);
            got.1
        }
    };
    assert_eq!(&within(retained(broker.addr)).await[..], b"online");

    // The broker dies and comes back with nothing retained; the session reconnects and says
    // `online` again.
    broker = tokio::task::spawn_blocking(move || {
        broker.restart_forgetting();
        broker
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + BOUND;
    while !(session.stats().connects >= 2 && session.client().is_some()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            session.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(&within(retained(broker.addr)).await[..], b"online");

    // The connection dies without DISCONNECT: the will replaces it.
    proxy.cut();
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let now = within(retained(broker.addr)).await;
        if &now[..] == b"offline" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

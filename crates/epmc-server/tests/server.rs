//! The whole server in-process on random loopback ports, as an agent sees it: enrollment over
//! HTTPS with a one-time token, MQTT over TLS with the issued certificate, telemetry into the
//! database, an order out and its result back, and revocation closing the connection.

use std::time::Duration;

use epmc_proto::model::{AgentHello, DeviceSnapshot};
use epmc_proto::order::{OrderAction, OrderOutcome, OrderResult};
use epmc_proto::topic::{self, AgentId, Channel};
use epmc_proto::{Envelope, Message, sample};
use epmc_server::ca::EnrollmentToken;
use epmc_server::datadir;
use epmc_server::server::EnrollResponse;
use epmc_server::server::{ServeConfig, Server};
use epmc_server::store::{OrderState, OrderTarget};
use epmc_transport::client::{MqttClient, MqttOptions, TlsIdentity};
use epmc_transport::mqtt::QoS;

const BOUND: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {BOUND:?}"))
}

struct Fixture {
    _dir: tempfile::TempDir,
    server: Server,
    ca_pem: String,
    http: reqwest::Client,
}

async fn start() -> Fixture {
    start_with(|_| {}).await
}

async fn start_with(configure: impl FnOnce(&mut ServeConfig)) -> Fixture {
    epmc_server::ca::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    datadir::init(&data, &[]).unwrap();
    let mut config = ServeConfig::new(&data);
    config.mqtt = "127.0.0.1:0".parse().unwrap();
    config.https = "127.0.0.1:0".parse().unwrap();
    config.poll = Duration::from_millis(100);
    configure(&mut config);
    let server = Server::start(config).await.unwrap();
    let ca_pem = datadir::load(&data).unwrap().ca.cert_pem();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    Fixture {
        _dir: dir,
        server,
        ca_pem,
        http,
    }
}

impl Fixture {
    fn url(&self, path: &str) -> String {
        format!(
            "https://localhost:{}{path}",
            self.server.https_addr().port()
        )
    }

    async fn token(&self, tenant: &str, valid_for: i64) -> String {
        let admin = self.server.store().admin();
        let tenant = match admin
            .tenants()
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.name == tenant)
        {
            Some(t) => t.id,
            None => admin.add_tenant(tenant).await.unwrap(),
        };
        let fp = datadir::load(&self.server_data()).unwrap().ca.fingerprint();
        let token = EnrollmentToken::generate(fp).unwrap();
        let expires = epmc_proto::bounded::Timestamp::from_unix(
            epmc_proto::bounded::Timestamp::now().unix() + valid_for,
        )
        .unwrap();
        admin
            .register_token(tenant, expires, &token.secret_hash().to_hex())
            .await
            .unwrap();
        token.to_token_string()
    }

    /// A new agent of tenant `acme`, enrolled with a token: the answer and its TLS identity.
    async fn enrolled(&self) -> (EnrollResponse, TlsIdentity) {
        let token = self.token("acme", 3600).await;
        let (csr, key) = make_csr();
        let answer: EnrollResponse = self.enroll(&token, &csr).await.json().await.unwrap();
        let tls = TlsIdentity::from_pem(
            answer.ca.as_bytes(),
            answer.certificate.as_bytes(),
            key.as_bytes(),
        )
        .unwrap();
        (answer, tls)
    }

    /// The latest security events, once `done` holds for them.
    async fn security_events_until(
        &self,
        done: impl Fn(&[epmc_server::store::SecurityEvent]) -> bool,
    ) -> Vec<epmc_server::store::SecurityEvent> {
        within("security events", async {
            loop {
                let events = self
                    .server
                    .store()
                    .admin()
                    .security_events(500)
                    .await
                    .unwrap();
                if done(&events) {
                    return events;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    fn server_data(&self) -> std::path::PathBuf {
        self._dir.path().join("data")
    }

    async fn enroll(&self, token: &str, csr: &str) -> reqwest::Response {
        self.http
            .post(self.url("/api/v1/enroll"))
            .json(&serde_json::json!({ "token": token, "csr": csr, "name": "test agent" }))
            .send()
            .await
            .unwrap()
    }
}

/// The agent says hello and reports one device (the sample snapshot); each PUBACK comes after
/// its commit.
async fn report_a_device(client: &MqttClient, agent: AgentId) {
    let Message::Hello(mut hello) = sample::sample(epmc_proto::Kind::Hello).message else {
        unreachable!()
    };
    hello.agent_id = agent.uuid();
    let hello: AgentHello = hello;
    let Message::Snapshot(snapshot) = sample::sample(epmc_proto::Kind::Snapshot).message else {
        unreachable!()
    };
    let snapshot: DeviceSnapshot = snapshot;
    for (channel, message) in [
        (Channel::Hello, Message::Hello(hello)),
        (Channel::Telemetry, Message::Snapshot(snapshot)),
    ] {
        let json = Envelope::new(message).to_json().unwrap();
        within(
            "publish",
            client.publish(
                &topic::topic(&agent, channel),
                json.into(),
                QoS::AtLeastOnce,
                false,
            ),
        )
        .await
        .unwrap();
    }
}

fn make_csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec!["ignored".into()])
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    (csr.pem().unwrap(), key.serialize_pem())
}

fn options(server: &Server, agent: &str) -> MqttOptions {
    let mut o = MqttOptions::new(
        server.mqtt_addr().expect("the embedded endpoint"),
        "localhost",
        agent,
    );
    o.keep_alive = Duration::from_secs(5);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_connect_publish_order_and_revoke() {
    let f = start().await;
    // The CA the server hands out is the one the token names.
    let ca = f.http.get(f.url("/api/v1/ca")).send().await.unwrap();
    assert_eq!(ca.text().await.unwrap(), f.ca_pem);

    let token = f.token("acme", 3600).await;
    let (csr, key) = make_csr();
    let answer = f.enroll(&token, &csr).await;
    assert_eq!(answer.status(), 200);
    let answer: EnrollResponse = answer.json().await.unwrap();
    assert_eq!(
        answer.mqtt_port,
        f.server.mqtt_addr().expect("the embedded endpoint").port()
    );
    let agent = AgentId::parse(&answer.agent_id).unwrap();

    // The token is single use.
    let (csr2, _) = make_csr();
    let again = f.enroll(&token, &csr2).await;
    assert_eq!(again.status(), 403, "a used token is refused");

    // Connect with the issued certificate and publish.
    let tls = TlsIdentity::from_pem(
        answer.ca.as_bytes(),
        answer.certificate.as_bytes(),
        key.as_bytes(),
    )
    .unwrap();
    let (client, _, mut orders) = within(
        "connect",
        MqttClient::connect(&options(&f.server, &answer.agent_id), &tls),
    )
    .await
    .unwrap();
    let orders_topic = topic::topic(&agent, Channel::Orders);
    within(
        "subscribe",
        client.subscribe(&[(&orders_topic, QoS::AtLeastOnce)]),
    )
    .await
    .unwrap();
    report_a_device(&client, agent).await;
    // PUBACK came after the commit: the device is in the database now.
    let devices = f.server.store().admin().devices().await.unwrap();
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0].key, "X8JK0000001");
    assert_eq!(devices[0].agent, agent);
    let agents = f.server.store().admin().agents(None).await.unwrap();
    assert_eq!(agents[0].version.as_deref(), Some("0.1.0"));

    // An order goes out, is acknowledged by the agent, and its result comes back.
    let order_id = f
        .server
        .store()
        .orders()
        .create(
            OrderTarget::Device(devices[0].id),
            &OrderAction::PowerOn,
            "test",
            epmc_proto::bounded::Timestamp::from_unix(
                epmc_proto::bounded::Timestamp::now().unix() + 600,
            )
            .unwrap(),
        )
        .await
        .unwrap();
    f.server.notify_orders();
    let received = within("order", orders.recv()).await.expect("an order");
    let envelope = Envelope::from_json(&received.message.payload).unwrap();
    let Message::Order(order) = envelope.message else {
        panic!("not an order: {envelope:?}")
    };
    assert_eq!(order.order_id, order_id);
    assert_eq!(order.action, OrderAction::PowerOn);
    received.ack();
    within("delivered", async {
        loop {
            let state = f.server.store().orders().get(order_id).await.unwrap().state;
            if state == OrderState::Delivered {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let result = Envelope::new(Message::OrderResult(OrderResult {
        order_id,
        at: epmc_proto::bounded::Timestamp::now(),
        outcome: OrderOutcome::Done,
        device_reply: None,
    }));
    within(
        "publish result",
        client.publish(
            &topic::topic(&agent, Channel::Results),
            result.to_json().unwrap().into(),
            QoS::AtLeastOnce,
            false,
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        f.server.store().orders().get(order_id).await.unwrap().state,
        OrderState::Done
    );

    // Revocation closes the open connection and refuses the next one.
    f.server
        .store()
        .admin()
        .revoke_agent(agent, "test")
        .await
        .unwrap();
    within("kicked", client.closed()).await;
    let refused = tokio::time::timeout(
        BOUND,
        MqttClient::connect(&options(&f.server, &answer.agent_id), &tls),
    )
    .await
    .expect("an answer in time");
    assert!(
        refused.is_err(),
        "a revoked certificate cannot connect again"
    );
    // The kick is recorded as the connection task ends, which may be just after the close;
    // the refused handshake names the revoked agent (its certificate is the CA's).
    let events = f
        .security_events_until(|e| {
            e.iter().any(|e| e.kind == "kicked")
                && e.iter().any(|e| e.kind == "tls_revoked_certificate")
        })
        .await;
    let refused = events
        .iter()
        .find(|e| e.kind == "tls_revoked_certificate")
        .unwrap_or_else(|| panic!("the revoked certificate's attempt is recorded: {events:?}"));
    assert_eq!(refused.agent.as_deref(), Some(answer.agent_id.as_str()));
    assert!(refused.detail.contains("serial"), "{refused:?}");
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_refuses_forged_expired_and_foreign_tokens() {
    let f = start().await;
    let (csr, _) = make_csr();

    // Expired.
    let expired = f.token("acme", -10).await;
    assert_eq!(f.enroll(&expired, &csr).await.status(), 403);

    // Well-formed, right CA, but never issued.
    let fp = datadir::load(&f.server_data()).unwrap().ca.fingerprint();
    let forged = EnrollmentToken::generate(fp).unwrap().to_token_string();
    assert_eq!(f.enroll(&forged, &csr).await.status(), 403);

    // Issued for another server's CA: the agent would refuse that server, and so does this one.
    let other = tempfile::tempdir().unwrap();
    datadir::init(other.path(), &[]).unwrap();
    let other_fp = datadir::load(other.path()).unwrap().ca.fingerprint();
    let foreign = EnrollmentToken::generate(other_fp)
        .unwrap()
        .to_token_string();
    let answer = f.enroll(&foreign, &csr).await;
    assert_eq!(answer.status(), 400);
    assert!(answer.text().await.unwrap().contains("token"));

    // Not a token, and a bad CSR: refused, and the good token is not used up by the bad CSR.
    assert_eq!(f.enroll("hello", &csr).await.status(), 400);
    let good = f.token("acme", 3600).await;
    let bad_csr = csr.replace('A', "B");
    assert_eq!(f.enroll(&good, &bad_csr).await.status(), 400);
    assert_eq!(
        f.enroll(&good, &csr).await.status(),
        200,
        "the token survived the bad CSR"
    );

    let events = f.server.store().admin().security_events(50).await.unwrap();
    let text = format!("{events:?}");
    assert!(text.contains("enroll_token_refused"), "{text}");
    assert!(text.contains("enroll_wrong_ca"), "{text}");
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_other_than_the_certificate_is_refused_and_recorded() {
    let f = start().await;
    let (answer, tls) = f.enrolled().await;
    let other = uuid::Uuid::new_v4().to_string();
    let refused = within(
        "connect",
        MqttClient::connect(&options(&f.server, &other), &tls),
    )
    .await;
    assert!(refused.is_err());
    let events = f.server.store().admin().security_events(50).await.unwrap();
    assert!(
        format!("{events:?}").contains("client_id_mismatch"),
        "{events:?}"
    );
    // The right id still works.
    let ok = within(
        "connect",
        MqttClient::connect(&options(&f.server, &answer.agent_id), &tls),
    )
    .await;
    assert!(ok.is_ok());
    f.server.shutdown().await;
}

/// The events of `kind` that the `suppressed` summaries among `events` counted.
fn counted(events: &[epmc_server::store::SecurityEvent], kind: &str) -> usize {
    let needle = format!(" {kind} ");
    events
        .iter()
        .filter(|e| e.kind == "suppressed")
        .filter_map(|e| {
            let at = e.detail.find(&needle)? + needle.len();
            let digits: String = e.detail[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse::<usize>().ok()
        })
        .sum()
}

/// A TLS handshake with the MQTT listener without a client certificate (refused by the server).
async fn handshake_without_certificate(server: &Server, ca_pem: &str) {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::AsyncReadExt;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.mqtt_addr().unwrap())
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    // With TLS 1.3 the server's refusal shows on the client's first read.
    if let Ok(mut tls) = within("handshake", connector.connect(name, tcp)).await {
        let mut rest = Vec::new();
        let _ = within("refusal", tls.read_to_end(&mut rest)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_is_counted_not_recorded_one_by_one_and_agents_events_still_are() {
    const FLOOD: usize = 20;
    let f = start_with(|config| {
        // Three at once and no refill: what is recorded does not depend on the machine's speed.
        config.security_events.burst = 3;
        config.security_events.per_second = 0.0;
        config.security_events.summary_every = Duration::from_millis(200);
    })
    .await;
    for _ in 0..FLOOD {
        handshake_without_certificate(&f.server, &f.ca_pem).await;
    }
    // An agent's own violation has a bucket of its own: the anonymous flood does not hide it.
    let (answer, tls) = f.enrolled().await;
    let wrong_id = uuid::Uuid::new_v4().to_string();
    let refused = within(
        "connect",
        MqttClient::connect(&options(&f.server, &wrong_id), &tls),
    )
    .await;
    assert!(refused.is_err());

    let events = f
        .security_events_until(|e| {
            counted(e, "tls_no_certificate") == FLOOD - 3
                && e.iter().any(|e| e.kind == "client_id_mismatch")
        })
        .await;
    let one_by_one = events
        .iter()
        .filter(|e| e.kind == "tls_no_certificate")
        .count();
    assert_eq!(one_by_one, 3, "the burst, then counted: {events:#?}");
    // The counts may be split over several summaries (one every 200 ms).
    for summary in events.iter().filter(|e| e.kind == "suppressed") {
        assert!(
            summary
                .detail
                .contains(" anonymous security events over the rate")
                && summary.detail.contains("from 127.0.0.1")
                && summary.agent.is_none(),
            "{summary:?}"
        );
    }
    let mismatch = events
        .iter()
        .find(|e| e.kind == "client_id_mismatch")
        .unwrap();
    assert_eq!(mismatch.agent.as_deref(), Some(answer.agent_id.as_str()));
    // Every refusal still counts in the endpoint's statistics.
    let stats = f.server.endpoint().unwrap().stats();
    assert_eq!(stats.violations, FLOOD as u64 + 1);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_online_and_last_will_are_its_presence_not_rejected_messages() {
    use epmc_server::store::AgentState;
    use epmc_transport::mqtt::{TopicName, Will};
    let f = start().await;
    let (answer, tls) = f.enrolled().await;
    let agent = AgentId::parse(&answer.agent_id).unwrap();
    let state_of = || async {
        let agents = f.server.store().admin().agents(None).await.unwrap();
        agents.iter().find(|a| a.id == agent).unwrap().state
    };
    let mut o = options(&f.server, &answer.agent_id);
    o.will = Some(Will {
        topic: TopicName::new(topic::state(&agent)).unwrap(),
        payload: bytes::Bytes::from_static(b"offline"),
        qos: QoS::AtLeastOnce,
        retain: true,
    });
    let (client, _, _orders) = within("connect", MqttClient::connect(&o, &tls))
        .await
        .unwrap();
    within(
        "online",
        client.publish(
            &topic::state(&agent),
            bytes::Bytes::from_static(b"online"),
            QoS::AtLeastOnce,
            true,
        ),
    )
    .await
    .unwrap();
    assert_eq!(state_of().await, AgentState::Online);

    // Ended without DISCONNECT (closed by the server, as for a revocation): the endpoint hands
    // the will over, then the agent is offline.
    let endpoint = f.server.endpoint().unwrap();
    assert!(endpoint.kick(&agent));
    within("closed", client.closed()).await;
    within("the will handled", async {
        while endpoint.stats().committed < 2 || state_of().await != AgentState::Offline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let rejected = f
        .server
        .store()
        .admin()
        .rejected_messages(10)
        .await
        .unwrap();
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(endpoint.stats().rejected, 0);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_for_an_offline_agent_wait_for_it_and_expired_ones_are_never_sent() {
    use epmc_server::store::AgentState;
    let f = start().await;
    let (answer, tls) = f.enrolled().await;
    let agent = AgentId::parse(&answer.agent_id).unwrap();
    let opts = options(&f.server, &answer.agent_id);

    // The agent reports a device, then goes away.
    let (client, _, _) = within("connect", MqttClient::connect(&opts, &tls))
        .await
        .unwrap();
    report_a_device(&client, agent).await;
    drop(client);
    let store = f.server.store();
    within("offline", async {
        loop {
            let agents = store.admin().agents(None).await.unwrap();
            if agents
                .iter()
                .any(|a| a.id == agent && a.state == AgentState::Offline)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // Two orders while it is offline: one with time to wait, one that expires first.
    let device = store.admin().devices().await.unwrap()[0].id;
    let in_secs = |s: i64| {
        epmc_proto::bounded::Timestamp::from_unix(epmc_proto::bounded::Timestamp::now().unix() + s)
            .unwrap()
    };
    let waits = store
        .orders()
        .create(
            OrderTarget::Device(device),
            &OrderAction::PowerOn,
            "test",
            in_secs(600),
        )
        .await
        .unwrap();
    let expires = store
        .orders()
        .create(
            OrderTarget::Device(device),
            &OrderAction::PowerOff,
            "test",
            in_secs(1),
        )
        .await
        .unwrap();
    f.server.notify_orders();
    within("expired", async {
        while store.orders().get(expires).await.unwrap().state != OrderState::Expired {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(
        store.orders().get(waits).await.unwrap().state,
        OrderState::Queued
    );

    // The agent comes back and subscribes: the waiting order arrives, the expired one never.
    let (client, _, mut orders) = within("reconnect", MqttClient::connect(&opts, &tls))
        .await
        .unwrap();
    within(
        "subscribe",
        client.subscribe(&[(&topic::orders(&agent), QoS::AtLeastOnce)]),
    )
    .await
    .unwrap();
    let received = within("the queued order", orders.recv())
        .await
        .expect("an order");
    let Message::Order(order) = Envelope::from_json(&received.message.payload)
        .unwrap()
        .message
    else {
        panic!("not an order")
    };
    assert_eq!(order.order_id, waits);
    received.ack();
    within("delivered", async {
        while store.orders().get(waits).await.unwrap().state != OrderState::Delivered {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Nothing else comes.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), orders.recv())
            .await
            .is_err(),
        "the expired order was sent"
    );
    assert_eq!(
        store.orders().get(expires).await.unwrap().state,
        OrderState::Expired
    );
    f.server.shutdown().await;
}

//! The MQTT/TLS client through an HTTP CONNECT proxy (a test proxy on loopback) to a real
//! Mosquitto: the tunnel carries the whole TLS session; credentials, refusals and broken
//! proxies give clear errors.

#[path = "support/http_proxy.rs"]
mod http_proxy;
mod support;

use std::time::Duration;

use bytes::Bytes;
use epmc_transport::client::{
    HttpProxy, MqttClient, MqttError, MqttOptions, ProxyCredentials, ProxyError,
};
use epmc_transport::mqtt::QoS;
use epmc_transport::session::MqttSession;
use epmc_transport::{OutboundMessage, Priority, Uplink};
use http_proxy::{Behaviour, ConnectProxy};
use support::{Broker, SERVER, within};

const A: &str = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
/// `Basic base64("agent:s3cret p@ss")`, computed independently of the client's encoder.
const AGENT_AUTH: &str = "Basic YWdlbnQ6czNjcmV0IHBAc3M=";

fn t(channel: &str) -> String {
    format!("epmc/v1/agents/{A}/{channel}")
}

fn via(broker: &Broker, proxy: &ConnectProxy, credentials: Option<(&str, &str)>) -> MqttOptions {
    let proxy = HttpProxy::new("127.0.0.1", proxy.addr.port()).with_credentials(
        credentials.map(|(u, p)| ProxyCredentials::new(u, p).expect("valid credentials")),
    );
    let mut o = MqttOptions::via_proxy(proxy, "localhost", broker.addr.port(), A);
    o.connect_timeout = Duration::from_secs(5);
    o
}

async fn connect_err(broker: &Broker, options: &MqttOptions) -> ProxyError {
    match within(MqttClient::connect(options, &broker.ca.identity(A))).await {
        Err(MqttError::Proxy(e)) => e,
        Err(other) => panic!("expected a proxy error, got {other}"),
        Ok(_) => panic!("connected through a proxy that should have failed"),
    }
}

#[tokio::test]
async fn publishes_through_a_tunnel_with_credentials() {
    let broker = Broker::start();
    let proxy = ConnectProxy::start(Behaviour::RequireAuth(AGENT_AUTH)).await;
    // The server identity reads the agent's telemetry directly.
    let server_opts = broker.options(SERVER);
    let (server, _, mut server_in) = within(MqttClient::connect(
        &server_opts,
        &broker.ca.identity(SERVER),
    ))
    .await
    .unwrap();
    within(server.subscribe(&[(&t("telemetry"), QoS::AtLeastOnce)]))
        .await
        .unwrap();

    let options = via(&broker, &proxy, Some(("agent", "s3cret p@ss")));
    let (agent, _, _) = within(MqttClient::connect(&options, &broker.ca.identity(A)))
        .await
        .expect("connects through the proxy");
    within(agent.publish(
        &t("telemetry"),
        Bytes::from_static(b"through the tunnel"),
        QoS::AtLeastOnce,
        false,
    ))
    .await
    .unwrap();
    let got = within(server_in.recv()).await.expect("a publish");
    assert_eq!(&got.message.payload[..], b"through the tunnel");
    got.ack();
    assert_eq!(proxy.tunnels(), 1);
    assert_eq!(
        proxy.requests(),
        [format!("CONNECT localhost:{} HTTP/1.1", broker.addr.port())]
    );
}

#[tokio::test]
async fn missing_or_wrong_credentials_are_named() {
    let broker = Broker::start();
    let proxy = ConnectProxy::start(Behaviour::RequireAuth(AGENT_AUTH)).await;
    let e = connect_err(&broker, &via(&broker, &proxy, Some(("agent", "wrong")))).await;
    assert!(
        matches!(&e, ProxyError::CredentialsRefused { username, .. } if username == "agent"),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains("refused the credentials of user \"agent\""),
        "{text}"
    );
    assert!(text.contains("407"), "{text}");
    assert!(!text.contains("wrong"), "the password is not shown: {text}");

    let e = connect_err(&broker, &via(&broker, &proxy, None)).await;
    assert!(
        matches!(e, ProxyError::AuthenticationRequired { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("requires authentication"), "{e}");
    assert_eq!(proxy.tunnels(), 0);
    assert_eq!(proxy.requests().len(), 2);
}

#[tokio::test]
async fn refusing_and_broken_proxies_are_clear_errors() {
    let broker = Broker::start();
    let proxy = ConnectProxy::start(Behaviour::Refuse("403 Forbidden")).await;
    let e = connect_err(&broker, &via(&broker, &proxy, None)).await;
    assert!(
        matches!(&e, ProxyError::Refused { status: 403, reason, .. } if reason == "Forbidden"),
        "{e:?}"
    );
    assert!(
        e.to_string().contains(&format!(
            "refused to connect to localhost:{}",
            broker.addr.port()
        )),
        "{e}"
    );

    let proxy = ConnectProxy::start(Behaviour::Garbage).await;
    let e = connect_err(&broker, &via(&broker, &proxy, None)).await;
    assert!(matches!(e, ProxyError::Garbage { .. }), "{e:?}");

    let proxy = ConnectProxy::start(Behaviour::Close).await;
    let e = connect_err(&broker, &via(&broker, &proxy, None)).await;
    assert!(matches!(e, ProxyError::Closed { .. }), "{e:?}");

    let proxy = ConnectProxy::start(Behaviour::EndlessHeader).await;
    let e = connect_err(&broker, &via(&broker, &proxy, None)).await;
    assert!(matches!(e, ProxyError::HeaderTooLarge { .. }), "{e:?}");

    // Nothing listens on the proxy's port.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut options = MqttOptions::via_proxy(
        HttpProxy::new("127.0.0.1", gone.port()),
        "localhost",
        broker.addr.port(),
        A,
    );
    options.connect_timeout = Duration::from_secs(5);
    let e = connect_err(&broker, &options).await;
    assert!(matches!(e, ProxyError::Unreachable { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&format!(
            "cannot reach the HTTP proxy 127.0.0.1:{}",
            gone.port()
        )),
        "{e}"
    );

    // A proxy that never answers: the tunnel gives up after its timeout.
    let proxy = ConnectProxy::start(Behaviour::Silent).await;
    let started = tokio::time::Instant::now();
    let e = within(
        HttpProxy::new("127.0.0.1", proxy.addr.port())
            .connect("localhost:1", Duration::from_millis(300)),
    )
    .await
    .expect_err("no answer");
    assert!(matches!(e, ProxyError::TimedOut { .. }), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_session_reconnects_through_the_proxy() {
    let broker = Broker::start();
    let proxy = ConnectProxy::start(Behaviour::Open).await;
    let session = MqttSession::start(
        via(&broker, &proxy, None),
        broker.ca.identity(A),
        &[(&t("orders"), QoS::AtLeastOnce)],
    )
    .unwrap();
    assert!(session.wait_connected(Duration::from_secs(10)).await);
    within(session.publish(&OutboundMessage {
        id: epmc_transport::MessageId::from_bytes([7; 16]),
        topic: t("events"),
        payload: Bytes::from_static(b"hello"),
        priority: Priority::Event,
    }))
    .await
    .expect("acknowledged through the tunnel");
    assert_eq!(proxy.tunnels(), 1);
    assert_eq!(session.stats().connects, 1);

    // A session whose proxy refuses reports why.
    let refusing = ConnectProxy::start(Behaviour::Refuse("403 Forbidden")).await;
    let session =
        MqttSession::start(via(&broker, &refusing, None), broker.ca.identity(A), &[]).unwrap();
    assert!(!session.wait_connected(Duration::from_millis(1500)).await);
    let stats = session.stats();
    assert!(stats.failures >= 1);
    let last = stats.last_error.unwrap_or_default();
    assert!(last.contains("403 Forbidden"), "{last}");
}

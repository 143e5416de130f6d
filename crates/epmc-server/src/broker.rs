//! Scale mode: instead of listening for agents, a replica consumes what they publish from an
//! external MQTT broker (Mosquitto with `deploy/scale/`), through shared subscriptions
//! (`$share/<group>/epmc/v1/agents/+/<channel>` for every agent → server channel), so several
//! replicas split the load.
//!
//! - What arrives goes through the same sink as the embedded endpoint's messages
//!   ([`crate::ingest::IngestSink`], the store's group commit): what is waiting is committed as
//!   one batch, and only then is each message of it acknowledged (PUBACK) to the broker. A
//!   failed commit acknowledges nothing: the connection is dropped, and the broker sends the
//!   messages again on the next one (the replica's session is persistent).
//! - The `state` channel carries `online` (retained, on connect) and `offline` (the last
//!   will): they set the agent's presence. Anything else on it is stored as a rejected
//!   message, as any malformed payload is.
//! - Orders are published on the agent's order topic at QoS 1
//!   ([`BrokerLink::send_order`]); the broker keeps them in the agent's persistent session
//!   while it is offline.
//! - The replica connects with a client certificate its own CA issues it
//!   (CN [`BrokerConfig::client_id`], which the broker's ACL names) and trusts only that CA
//!   for the broker's certificate. Each such certificate is recorded in the store before it
//!   is used (`AdminHandle::record_service_certificate`), so revocation (the CRL) and listing
//!   cover it as they cover agents' certificates; when it cannot be recorded the replica
//!   does not connect. It is reused for the next connections until a day before it expires
//!   or until it is revoked (`replica revoke`), then replaced by a new one (new key).
//!
//! The broker enforces identity and topic rules itself (client certificates, CN as client
//! id, per-agent ACL, the CRL the server writes, see [`write_crl`]); it does not tell the
//! server about violations, so in this mode no security events come from ingest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use epmc_proto::bounded::Timestamp;
use epmc_proto::topic::{self, AgentId, Channel};
use epmc_transport::ReceivedOrder;
use epmc_transport::client::{MqttClient, MqttOptions, PendingAck, ServerTrust, TlsIdentity};
use epmc_transport::mqtt::QoS;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use crate::ca::{CertSerial, CertificateAuthority};
use crate::ingest::{Inbound, IngestSink, stated_presence};
use crate::store::Store;

/// The agent → server channels a replica subscribes to.
pub const CONSUMED: [Channel; 5] = [
    Channel::Hello,
    Channel::Telemetry,
    Channel::Events,
    Channel::Results,
    Channel::State,
];

/// How long the client certificate issued for one broker connection is valid.
const CLIENT_CERT_VALIDITY: time::Duration = time::Duration::days(7);

/// The most incoming publishes a connection holds unacknowledged: all a broker can have
/// outstanding (packet ids are 16 bits). Mosquitto 2.0.11 sends a resumed session's whole
/// backlog at once, ignoring its in-flight limit, so a smaller window would end every
/// connection after an outage.
const INCOMING_WINDOW: usize = u16::MAX as usize;

/// Where the broker is and how to consume from it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// The broker's host name or address (also the name its certificate must carry).
    pub host: String,
    /// Its MQTT over TLS port.
    pub port: u16,
    /// This replica's client id and certificate CN (the broker's ACL grants the server's
    /// rights to it; each replica needs its own, e.g. `epmc-server-1`).
    pub client_id: String,
    /// The shared subscription group: replicas in one group split the messages.
    pub group: String,
    /// Most messages in one commit.
    pub max_batch: usize,
    /// MQTT keep-alive towards the broker.
    pub keep_alive: Duration,
    /// Where to write the CA's revocation list (PEM) for the broker to read (Mosquitto's
    /// `crlfile`); `None` writes none.
    pub crl_file: Option<PathBuf>,
}

/// A `--broker` value that is not `mqtts://HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: expected mqtts://HOST:PORT (MQTT over TLS)")]
pub struct BrokerUrlError(pub String);

impl BrokerConfig {
    /// Parses `mqtts://HOST:PORT` (the port defaults to 8883; `[::1]` for an IPv6 address)
    /// with client id `epmc-server`, group `epmc`, batches of 256, keep-alive 30 s, no CRL file.
    pub fn from_url(url: &str) -> Result<BrokerConfig, BrokerUrlError> {
        let err = || BrokerUrlError(url.to_owned());
        let rest = url.strip_prefix("mqtts://").ok_or_else(err)?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(err)?;
            match after {
                "" => (host, 8883),
                p => (
                    host,
                    p.strip_prefix(':')
                        .and_then(|p| p.parse().ok())
                        .ok_or_else(err)?,
                ),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| err())?),
                None => (rest, 8883),
            }
        };
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
        if !host_ok || port == 0 {
            return Err(err());
        }
        Ok(BrokerConfig {
            host: host.to_owned(),
            port,
            client_id: "epmc-server".into(),
            group: "epmc".into(),
            max_batch: 256,
            keep_alive: Duration::from_secs(30),
            crl_file: None,
        })
    }

    /// The shared subscription filter of `channel` for this replica's group.
    pub fn shared_filter(&self, channel: Channel) -> String {
        format!("$share/{}/{}", self.group, topic::all_agents(channel))
    }
}

/// Counters of a consumer since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Messages acknowledged to the broker after their commit (stored, duplicate or rejected).
    pub committed: u64,
    /// Commits.
    pub batches: u64,
    /// Connections made to the broker.
    pub connections: u64,
    /// Presence changes applied from the state channel.
    pub presence: u64,
    /// Publishes on topics that are not an agent's channel (acknowledged and dropped).
    pub foreign: u64,
}

#[derive(Default)]
struct Counters {
    committed: AtomicU64,
    batches: AtomicU64,
    connections: AtomicU64,
    presence: AtomicU64,
    foreign: AtomicU64,
}

/// Why an order could not be handed to the broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerSendError {
    /// No connection to the broker now.
    #[error("not connected to the broker")]
    NotConnected,
    /// The connection refused it or ended.
    #[error("broker: {0}")]
    Mqtt(#[from] epmc_transport::client::MqttError),
}

/// The consumer's connection as others use it: publishing orders, counters. Clones share it.
#[derive(Clone)]
pub struct BrokerLink {
    client: watch::Receiver<Option<MqttClient>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for BrokerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerLink")
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl BrokerLink {
    /// Whether the replica is connected to the broker now.
    pub fn is_connected(&self) -> bool {
        self.client
            .borrow()
            .as_ref()
            .is_some_and(MqttClient::is_connected)
    }

    /// Publishes an order at QoS 1 on the agent's order topic; the returned future resolves
    /// on the broker's PUBACK (the broker holds it for the agent from then on).
    pub async fn send_order(
        &self,
        agent: &AgentId,
        payload: Bytes,
    ) -> Result<PendingAck, BrokerSendError> {
        let client = self
            .client
            .borrow()
            .clone()
            .ok_or(BrokerSendError::NotConnected)?;
        Ok(client
            .send_publish(&topic::orders(agent), payload, QoS::AtLeastOnce, false)
            .await?)
    }

    /// The counters.
    pub fn stats(&self) -> BrokerStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BrokerStats {
            committed: get(&c.committed),
            batches: get(&c.batches),
            connections: get(&c.connections),
            presence: get(&c.presence),
            foreign: get(&c.foreign),
        }
    }
}

/// Starts the consumer task; it runs until `stop` turns `true`, finishing (and
/// acknowledging) the batch in progress.
pub(crate) fn start(
    config: BrokerConfig,
    ca: Arc<CertificateAuthority>,
    sink: Arc<dyn IngestSink>,
    store: Store,
    stop: watch::Receiver<bool>,
) -> (BrokerLink, tokio::task::JoinHandle<()>) {
    let (client_tx, client_rx) = watch::channel(None);
    let counters = Arc::new(Counters::default());
    let link = BrokerLink {
        client: client_rx,
        counters: counters.clone(),
    };
    let task = tokio::spawn(run(config, ca, sink, store, client_tx, counters, stop));
    (link, task)
}

async fn run(
    config: BrokerConfig,
    ca: Arc<CertificateAuthority>,
    sink: Arc<dyn IngestSink>,
    store: Store,
    client_tx: watch::Sender<Option<MqttClient>>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut issued: Option<Issued> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        match connect(&config, &ca, &store, &mut issued).await {
            Ok((client, rx)) => {
                backoff = Duration::from_millis(100);
                counters.connections.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    broker = %format!("{}:{}", config.host, config.port),
                    client_id = %config.client_id,
                    group = %config.group,
                    "consuming from the broker"
                );
                client_tx.send_replace(Some(client.clone()));
                let ended = consume(&config, &*sink, &counters, rx, &mut stop).await;
                client_tx.send_replace(None);
                drop(client);
                match ended {
                    Ended::Stopped => return,
                    Ended::Lost(why) => tracing::warn!(%why, "broker connection lost"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect to the broker"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The client certificate this replica presents to the broker, with its serial and expiry.
struct Issued {
    cert: crate::ca::ServerCertificate,
    serial: CertSerial,
    not_after: Timestamp,
}

/// A certificate is replaced when it has less than this left.
const CLIENT_CERT_RENEW_BEFORE: time::Duration = time::Duration::days(1);

/// The certificate to connect with: `current` while it has more than a day left and is not
/// revoked, otherwise a new one (new key), recorded in the store before it is used. Reusing
/// it keeps a replica that cannot reach its broker from recording one certificate per attempt.
async fn identity<'a>(
    config: &BrokerConfig,
    ca: &CertificateAuthority,
    store: &Store,
    current: &'a mut Option<Issued>,
) -> Result<&'a Issued, String> {
    let now = OffsetDateTime::now_utc();
    let keep = match current.as_ref() {
        Some(c)
            if c.not_after.unix() - now.unix_timestamp()
                > CLIENT_CERT_RENEW_BEFORE.whole_seconds() =>
        {
            !store
                .ingest()
                .is_certificate_revoked(&c.serial.to_hex())
                .await
                .map_err(|e| format!("checking this replica's certificate: {e}"))?
        }
        _ => false,
    };
    if !keep {
        *current = None;
        let cert = ca
            .issue_service_client(&config.client_id, CLIENT_CERT_VALIDITY, now)
            .map_err(|e| e.to_string())?;
        let (serial, not_after) = serial_and_expiry(&cert.cert_pem)?;
        store
            .admin()
            .record_service_certificate(&config.client_id, &serial.to_hex(), not_after)
            .await
            .map_err(|e| format!("recording this replica's certificate: {e}"))?;
        tracing::debug!(serial = %serial, client_id = %config.client_id, "replica certificate issued and recorded");
        *current = Some(Issued {
            cert,
            serial,
            not_after,
        });
    }
    current
        .as_ref()
        .ok_or_else(|| "no replica certificate".to_owned())
}

async fn connect(
    config: &BrokerConfig,
    ca: &CertificateAuthority,
    store: &Store,
    current: &mut Option<Issued>,
) -> Result<(MqttClient, mpsc::Receiver<ReceivedOrder>), String> {
    let issued = identity(config, ca, store, current).await?;
    let tls = TlsIdentity::new(
        ServerTrust::Pinned(ca.cert_pem().as_bytes()),
        issued.cert.cert_pem.as_bytes(),
        issued.cert.key_pem.as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    let addr = tokio::net::lookup_host((config.host.as_str(), config.port))
        .await
        .map_err(|e| format!("{}: {e}", config.host))?
        .next()
        .ok_or_else(|| format!("{}: no address", config.host))?;
    let mut options = MqttOptions::new(addr, &config.host, &config.client_id);
    options.clean_session = false;
    options.keep_alive = config.keep_alive;
    options.incoming_window = INCOMING_WINDOW;
    let (client, _resumed, rx) = MqttClient::connect(&options, &tls)
        .await
        .map_err(|e| e.to_string())?;
    let filters: Vec<String> = CONSUMED.iter().map(|c| config.shared_filter(*c)).collect();
    let asked: Vec<(&str, QoS)> = filters
        .iter()
        .map(|f| (f.as_str(), QoS::AtLeastOnce))
        .collect();
    let granted = client.subscribe(&asked).await.map_err(|e| e.to_string())?;
    if let Some((f, _)) = filters.iter().zip(&granted).find(|(_, g)| g.is_none()) {
        return Err(format!("the broker refused the subscription {f:?}"));
    }
    Ok((client, rx))
}

/// The serial and expiry of a certificate (PEM) this replica issued itself.
fn serial_and_expiry(cert_pem: &str) -> Result<(CertSerial, Timestamp), String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("the replica's certificate: {e}"))?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| format!("the replica's certificate: {e}"))?;
    let not_after = Timestamp::from_unix(cert.validity().not_after.timestamp())
        .map_err(|e| format!("the replica's certificate expiry: {e}"))?;
    Ok((CertSerial::from_der_bytes(cert.raw_serial()), not_after))
}

enum Ended {
    Stopped,
    Lost(String),
}

/// One received publish, sorted.
enum Item {
    Data(Inbound),
    Presence(AgentId, bool),
    Foreign(String),
}

fn classify(message: &epmc_transport::InboundMessage) -> Item {
    match topic::parse(&message.topic) {
        Some((_, Channel::Orders)) | None => Item::Foreign(message.topic.clone()),
        Some((agent, channel)) => match stated_presence(channel, &message.payload) {
            Some(online) => Item::Presence(agent, online),
            None => Item::Data(Inbound {
                agent,
                channel,
                payload: message.payload.clone(),
            }),
        },
    }
}

async fn consume(
    config: &BrokerConfig,
    sink: &dyn IngestSink,
    counters: &Counters,
    mut rx: mpsc::Receiver<ReceivedOrder>,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let max_batch = config.max_batch.max(1);
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = stop.wait_for(|s| *s) => return Ended::Stopped,
        };
        let Some(first) = first else {
            return Ended::Lost("the connection closed".into());
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut data = Vec::new();
        let mut presence = Vec::new();
        for m in &batch {
            match classify(&m.message) {
                Item::Data(i) => data.push(i),
                Item::Presence(a, online) => presence.push((a, online)),
                Item::Foreign(t) => {
                    counters.foreign.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(topic = %t, "a publish outside the agents' channels dropped");
                }
            }
        }
        // Every replica takes the rows of a batch's agents in the same order (agent id; a
        // stable sort keeps each agent's own order), so two replicas' commits wait for each
        // other instead of deadlocking.
        data.sort_by_key(|i| i.agent);
        let n = data.len();
        let started = std::time::Instant::now();
        if n > 0 {
            match sink.commit(data).await {
                Ok(outcomes) if outcomes.len() == n => {}
                Ok(outcomes) => {
                    return Ended::Lost(format!(
                        "{} outcome(s) for {n} message(s); nothing acknowledged",
                        outcomes.len()
                    ));
                }
                Err(e) => return Ended::Lost(format!("{e}; nothing acknowledged")),
            }
            counters.batches.fetch_add(1, Ordering::Relaxed);
        }
        for (agent, online) in presence {
            sink.agent_state(agent, online).await;
            counters.presence.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(
            messages = batch.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "batch committed; acknowledging"
        );
        counters
            .committed
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for m in batch {
            m.ack();
        }
    }
}

/// Writes the CA's revocation list for `revoked` (PEM) to `path` atomically (a temporary file
/// in the same directory, then a rename), so the broker never reads half a file.
pub fn write_crl(
    ca: &CertificateAuthority,
    revoked: &[crate::ca::RevokedCert],
    path: &Path,
) -> Result<(), String> {
    let der = ca
        .crl(revoked, OffsetDateTime::now_utc())
        .map_err(|e| format!("CRL: {e}"))?;
    let pem = crate::ca::encoding::pem("X509 CRL", der.as_ref());
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file path", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    // The process id keeps two writers (replicas on one machine) off each other's file.
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = match dir {
        Some(d) => d.join(&tmp_name),
        None => PathBuf::from(&tmp_name),
    };
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(d) = dir {
            std::fs::File::open(d)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn broker_urls() {
        let c = BrokerConfig::from_url("mqtts://broker.example:8884").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("broker.example", 8884));
        let c = BrokerConfig::from_url("mqtts://127.0.0.1").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8883));
        let c = BrokerConfig::from_url("mqtts://[::1]:9000/").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 9000));
        for bad in [
            "mqtt://h:1883",
            "mqtts://",
            "mqtts://h:0",
            "mqtts://h:x",
            "mqtts://h/x:1",
            "mqtts://u@h:1",
            "mqtts://[::1",
            "h:8883",
        ] {
            assert!(BrokerConfig::from_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            c.shared_filter(Channel::Telemetry),
            "$share/epmc/epmc/v1/agents/+/telemetry"
        );
    }

    #[tokio::test]
    async fn a_replica_reuses_its_certificate_until_revoked_or_near_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_data_dir(dir.path(), crate::store::StoreOptions::default())
            .await
            .unwrap();
        let ca = CertificateAuthority::generate("test CA", OffsetDateTime::now_utc()).unwrap();
        let mut config = BrokerConfig::from_url("mqtts://127.0.0.1:1").unwrap();
        config.client_id = "epmc-server-1".into();
        let admin = store.admin();
        let mut current = None;

        let first = identity(&config, &ca, &store, &mut current)
            .await
            .unwrap()
            .serial
            .clone();
        let again = identity(&config, &ca, &store, &mut current)
            .await
            .unwrap()
            .serial
            .clone();
        assert_eq!(first, again, "reused while valid and not revoked");
        let recorded = admin.service_certificates().await.unwrap();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].serial, first.to_hex());
        assert_eq!(recorded[0].name, "epmc-server-1");

        // Revoked (a leaked key): the next connection uses a new, recorded certificate.
        admin
            .revoke_service("epmc-server-1", "leaked")
            .await
            .unwrap();
        let second = identity(&config, &ca, &store, &mut current)
            .await
            .unwrap()
            .serial
            .clone();
        assert_ne!(second, first);
        let recorded = admin.service_certificates().await.unwrap();
        assert_eq!(recorded.len(), 2);
        assert!(
            recorded
                .iter()
                .any(|c| c.serial == second.to_hex() && c.revoked_at.is_none())
        );

        // Less than a day left: replaced.
        if let Some(c) = current.as_mut() {
            c.not_after =
                Timestamp::from_unix(OffsetDateTime::now_utc().unix_timestamp() + 3600).unwrap();
        }
        let third = identity(&config, &ca, &store, &mut current)
            .await
            .unwrap()
            .serial
            .clone();
        assert_ne!(third, second);
        assert_eq!(admin.service_certificates().await.unwrap().len(), 3);
        store.close().await;
    }

    #[test]
    fn a_replica_certificate_is_recorded_by_its_own_serial_and_expiry() {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let now = OffsetDateTime::now_utc();
        let ca = CertificateAuthority::generate("test CA", now).unwrap();
        let issued = ca
            .issue_service_client("epmc-server-1", time::Duration::days(7), now)
            .unwrap();
        let (serial, not_after) = super::serial_and_expiry(&issued.cert_pem).unwrap();
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let (_, cert) = X509Certificate::from_der(der.as_ref()).unwrap();
        assert_eq!(serial.as_bytes(), cert.raw_serial());
        assert_eq!(serial.to_hex().len(), 32);
        assert_eq!(
            not_after.unix(),
            (now + time::Duration::days(7)).unix_timestamp()
        );
        assert!(super::serial_and_expiry("not a certificate").is_err());
    }

    #[test]
    fn replica_certificates_are_client_certificates_named_as_asked() {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let now = OffsetDateTime::now_utc();
        let ca = CertificateAuthority::generate("test CA", now).unwrap();
        let issued = ca
            .issue_service_client("epmc-server-1", time::Duration::days(7), now)
            .unwrap();
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let (_, cert) = X509Certificate::from_der(der.as_ref()).unwrap();
        let cn: Vec<&str> = cert
            .subject()
            .iter_common_name()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(cn, vec!["epmc-server-1"]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!cert.is_ca());
        // An agent's CN (a UUID), and names the ACL could not hold, are refused.
        for bad in [
            "",
            "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f",
            "epmc server",
            "a/b",
            "+",
            &"x".repeat(65),
        ] {
            assert!(
                ca.issue_service_client(bad, time::Duration::days(7), now)
                    .is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn state_payloads_are_presence_and_orders_are_foreign() {
        let a = AgentId::new(uuid::Uuid::new_v4());
        let m = |t: String, p: &'static [u8]| epmc_transport::InboundMessage {
            topic: t,
            payload: Bytes::from_static(p),
        };
        assert!(matches!(
            classify(&m(topic::state(&a), b"offline")),
            Item::Presence(x, false) if x == a
        ));
        assert!(matches!(
            classify(&m(topic::state(&a), b"online\n")),
            Item::Presence(x, true) if x == a
        ));
        assert!(matches!(
            classify(&m(topic::state(&a), b"{}")),
            Item::Data(Inbound {
                channel: Channel::State,
                ..
            })
        ));
        assert!(matches!(
            classify(&m(topic::telemetry(&a), b"{}")),
            Item::Data(Inbound {
                channel: Channel::Telemetry,
                ..
            })
        ));
        assert!(matches!(
            classify(&m(topic::orders(&a), b"{}")),
            Item::Foreign(_)
        ));
        assert!(matches!(
            classify(&m("epmc/v1/agents/x/telemetry".into(), b"{}")),
            Item::Foreign(_)
        ));
    }
}

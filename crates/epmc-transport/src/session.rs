//! [`MqttSession`]: the agent's long-lived MQTT link. It keeps one [`MqttClient`] connected
//! in the background, reconnecting with exponential back-off and jitter, subscribes to the
//! order topics again on every connection (so orders keep arriving even when the broker lost
//! the persistent session), and is both the agent's [`Uplink`] and its [`OrderSource`].
//!
//! While it is disconnected, publishing fails at once with [`TransportError::Unavailable`]:
//! the caller's durable outbox keeps the message and a [`crate::forward::Forwarder`] tries
//! again later. Orders from every connection arrive, in order, on one stream.
//!
//! Each order is acknowledged (PUBACK) only when the reader calls [`ReceivedOrder::ack`]
//! after recording it; one dropped without `ack` is delivered again after a reconnection
//! (the session is persistent), possibly marked [`ReceivedOrder::redelivered`], so the agent
//! de-duplicates by order id. An `ack` for an order whose connection has since closed sends
//! nothing (that order comes again on the new connection). A slow reader never holds up a
//! connection: it keeps reading, answering and sending keep-alives, and each connection holds
//! at most [`MqttOptions::incoming_window`] unacknowledged orders besides the 256 the stream
//! holds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use crate::client::{MqttClient, MqttError, MqttOptions, TlsIdentity};
use crate::mqtt::{QoS, TopicFilter};
use crate::{OrderSource, OutboundMessage, PendingPublish, ReceivedOrder, TransportError, Uplink};

/// Back-off after `failures` consecutive failures: 0.5 s doubling to at most 60 s, plus up to
/// 25 % jitter (so a fleet of agents does not reconnect in step after a server restart).
pub fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1u32 << failures.min(7));
    let base = base.min(Duration::from_secs(60));
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + base.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

/// A connection that lasted this long resets the back-off.
const STABLE: Duration = Duration::from_secs(30);

/// What the session has been through, for the agent's own status report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Successful connections (CONNACK accepted and subscriptions granted).
    pub connects: u64,
    /// Failed attempts (TCP, TLS, CONNACK refusal, subscription refused).
    pub failures: u64,
    /// Whether the broker resumed a session on the latest connection.
    pub session_present: bool,
    /// The latest failure, as text.
    pub last_error: Option<String>,
}

struct Shared {
    stats: Mutex<SessionStats>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut SessionStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// A self-reconnecting MQTT session; see the [module docs](self).
pub struct MqttSession {
    current: watch::Receiver<Option<MqttClient>>,
    orders: tokio::sync::Mutex<mpsc::Receiver<ReceivedOrder>>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for MqttSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSession")
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl MqttSession {
    /// Starts connecting in the background (on the current tokio runtime). `subscriptions`
    /// are (re)subscribed on every connection; incoming publishes on them are read with
    /// [`OrderSource::next_order`]. Fails only for an invalid topic filter.
    pub fn start(
        options: MqttOptions,
        tls: TlsIdentity,
        subscriptions: &[(&str, QoS)],
    ) -> Result<MqttSession, MqttError> {
        let subscriptions: Vec<(String, QoS)> = subscriptions
            .iter()
            .map(|(f, q)| {
                TopicFilter::new(*f)
                    .map(|f| (f.as_str().to_owned(), *q))
                    .map_err(MqttError::Unsendable)
            })
            .collect::<Result<_, _>>()?;
        let (current_tx, current) = watch::channel(None);
        let (orders_tx, orders) = mpsc::channel(256);
        let shared = Arc::new(Shared {
            stats: Mutex::new(SessionStats::default()),
        });
        let task = tokio::spawn(supervise(
            options,
            tls,
            subscriptions,
            current_tx,
            orders_tx,
            shared.clone(),
        ));
        Ok(MqttSession {
            current,
            orders: tokio::sync::Mutex::new(orders),
            shared,
            task,
        })
    }

    /// The connected client now, if any.
    pub fn client(&self) -> Option<MqttClient> {
        self.current
            .borrow()
            .as_ref()
            .filter(|c| c.is_connected())
            .cloned()
    }

    /// Waits until connected (and subscribed), or until `timeout` passes. Returns whether it
    /// is connected.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.current.clone();
        tokio::time::timeout(
            timeout,
            rx.wait_for(|c| c.as_ref().is_some_and(MqttClient::is_connected)),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    /// Watches the connection: `Some` while connected (and subscribed), `None` between
    /// connections. Every new connection is a change, so a caller can greet the server (the
    /// agent's hello) on each one.
    pub fn watch_connection(&self) -> watch::Receiver<Option<MqttClient>> {
        self.current.clone()
    }

    /// What the session has been through.
    pub fn stats(&self) -> SessionStats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for MqttSession {
    fn drop(&mut self) {
        // Ends the supervisor; the client's last clone goes with it and sends DISCONNECT.
        self.task.abort();
    }
}

async fn supervise(
    options: MqttOptions,
    tls: TlsIdentity,
    subscriptions: Vec<(String, QoS)>,
    current: watch::Sender<Option<MqttClient>>,
    orders: mpsc::Sender<ReceivedOrder>,
    shared: Arc<Shared>,
) {
    let mut failures: u32 = 0;
    let mut previous_forward: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        if failures > 0 {
            tokio::time::sleep(backoff(failures - 1)).await;
        }
        let (client, session_present, mut incoming) =
            match MqttClient::connect(&options, &tls).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, failures, "MQTT connect failed");
                    failures = failures.saturating_add(1);
                    shared.update(|s| {
                        s.failures += 1;
                        s.last_error = Some(e.to_string());
                    });
                    continue;
                }
            };
        // Forward incoming publishes from the start: with a resumed session the broker may
        // deliver queued orders before the SUBACK, and the connection must not stall on them.
        // Each connection's forwarder first lets the previous one finish, so orders stay in
        // arrival order, and neither the supervisor nor the connection waits for a slow order
        // reader (the connection hands over without waiting; this task does the waiting).
        let forward = {
            let orders = orders.clone();
            let previous = previous_forward.take();
            tokio::spawn(async move {
                if let Some(previous) = previous {
                    let _ = previous.await;
                }
                while let Some(m) = incoming.recv().await {
                    if orders.send(m).await.is_err() {
                        return;
                    }
                }
            })
        };
        let filters: Vec<(&str, QoS)> = subscriptions
            .iter()
            .map(|(f, q)| (f.as_str(), *q))
            .collect();
        let subscribed = if filters.is_empty() {
            Ok(())
        } else {
            match tokio::time::timeout(options.connect_timeout, client.subscribe(&filters)).await {
                Ok(Ok(granted)) if granted.iter().all(Option::is_some) => Ok(()),
                Ok(Ok(_)) => Err("the broker refused a subscription".to_owned()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no SUBACK in time".to_owned()),
            }
        };
        let subscribed = match (subscribed, &options.birth) {
            (Ok(()), Some(birth)) => {
                let sent = client.publish(
                    birth.topic.as_str(),
                    birth.payload.clone(),
                    birth.qos,
                    birth.retain,
                );
                match tokio::time::timeout(options.connect_timeout, sent).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("the birth message: {e}")),
                    Err(_) => Err("the birth message: no PUBACK in time".to_owned()),
                }
            }
            (result, _) => result,
        };
        if let Err(e) = subscribed {
            tracing::warn!(error = %e, "MQTT session set-up failed");
            failures = failures.saturating_add(1);
            shared.update(|s| {
                s.failures += 1;
                s.last_error = Some(e);
            });
            drop(client);
            previous_forward = Some(forward);
            continue;
        }
        shared.update(|s| {
            s.connects += 1;
            s.session_present = session_present;
        });
        let _ = current.send(Some(client.clone()));
        let connected_at = tokio::time::Instant::now();
        client.closed().await;
        let _ = current.send(None);
        drop(client);
        previous_forward = Some(forward);
        shared.update(|s| s.last_error = Some("connection closed".into()));
        // After a connection that lasted, a short pause before the first retry; a broker
        // that keeps closing connections at once gets ever longer pauses.
        failures = if connected_at.elapsed() >= STABLE {
            1
        } else {
            failures.saturating_add(1)
        };
    }
}

#[async_trait]
impl Uplink for MqttSession {
    async fn publish(&self, message: &OutboundMessage) -> Result<(), TransportError> {
        self.start_publish(message).await?.await
    }

    async fn start_publish(
        &self,
        message: &OutboundMessage,
    ) -> Result<PendingPublish, TransportError> {
        let client = self.client().ok_or(TransportError::Unavailable)?;
        let ack = client
            .send_publish(
                &message.topic,
                message.payload.clone(),
                QoS::AtLeastOnce,
                false,
            )
            .await?;
        Ok(Box::pin(async move {
            ack.acked().await.map_err(TransportError::from)
        }))
    }

    fn is_connected(&self) -> bool {
        self.client().is_some()
    }
}

#[async_trait]
impl OrderSource for MqttSession {
    async fn next_order(&self) -> Result<ReceivedOrder, TransportError> {
        self.orders
            .lock()
            .await
            .recv()
            .await
            .ok_or(TransportError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_from_half_a_second_to_a_minute_with_up_to_a_quarter_of_jitter() {
        for (failures, base) in [(0, 500), (1, 1000), (2, 2000), (6, 32_000), (7, 60_000)] {
            let base = Duration::from_millis(base);
            for _ in 0..20 {
                let b = backoff(failures);
                assert!(b >= base && b <= base + base / 4, "{failures}: {b:?}");
            }
        }
        for failures in [8, 30, u32::MAX] {
            let b = backoff(failures);
            assert!(
                b >= Duration::from_secs(60) && b <= Duration::from_secs(75),
                "{b:?}"
            );
        }
    }
}

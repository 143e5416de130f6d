//! Transport for EPMC-rs: how agent telemetry reaches the server, and orders reach the agent.
//!
//! - Object-safe async traits ([`Uplink`], [`OrderSource`], [`ProjectorLink`]) so the agent's
//!   logic runs unchanged over MQTT/TLS in production and over [`memory`] transports in tests.
//! - [`storage`]: the file operations durable logs use, with a simulated file system that
//!   loses what was not synced, for power-loss tests.
//! - [`outbox`]: the durable store-and-forward queue: written and synced before publishing,
//!   removed only after the server's acknowledgement, replayed in order after a crash.
//! - [`forward`]: drains the outbox through an uplink, pipelined in order, removing only
//!   what the server acknowledged.
//! - [`mqtt`]: the MQTT 3.1.1 packet codec (sans-IO); [`client`]: one MQTT connection over
//!   TLS with a client certificate; [`session`]: the reconnecting session the agent uses as
//!   its uplink and order source.
//!
//! Payloads are opaque bytes here (the JSON contract lives in `epmc-proto`), and projector
//! commands are raw ESC/VP21 text (the agent adapts the `escvp` client to [`ProjectorLink`]).
//!
//! MQTT packets are encoded by our own codec rather than a library: `mqttbytes`, the one the
//! design first named, has had no release since its code moved into `rumqttc` in 2022, and
//! `rumqttc` pins a `rustls-webpki` with open advisories. The subset a QoS 1 client needs is
//! small; it is fuzzed and checked byte for byte against `rumqttc`'s codec in the tests (see
//! [`mqtt`]).
//!
//! # The agent's wiring
//!
//! ```no_run
//! # async fn wire() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use epmc_transport::client::{MqttOptions, TlsIdentity};
//! use epmc_transport::forward::Forwarder;
//! use epmc_transport::mqtt::QoS;
//! use epmc_transport::outbox::{Limits, Outbox};
//! use epmc_transport::session::MqttSession;
//! use epmc_transport::OrderSource;
//!
//! let agent = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
//! let tls = TlsIdentity::from_files("ca.crt", "agent.crt", "agent.key")?;
//! let options = MqttOptions::new("127.0.0.1:8883".parse()?, "epmc.example", agent);
//! let orders = format!("epmc/v1/agents/{agent}/orders");
//! let session = Arc::new(MqttSession::start(options, tls, &[(&orders, QoS::AtLeastOnce)])?);
//! let outbox = Arc::new(Mutex::new(Outbox::open("/var/lib/epmc/outbox", Limits::default())?));
//! let forwarder = Arc::new(Forwarder::new(outbox.clone(), session.clone()));
//! let wake = forwarder.waker();
//! let running = forwarder.spawn(Duration::from_secs(1)); // `running.stop().await` at shutdown
//! // Collectors push (synced to disk before `push` returns), then wake the forwarder:
//! // outbox.lock().unwrap().push(message)?; wake.notify_one();
//! # let _ = wake;
//! // Orders arrive on one stream across reconnections. Each is acknowledged to the server
//! // only once the agent has recorded it (redeliveries are possible: de-duplicate by id):
//! let order = session.next_order().await?;
//! // journal.record(&order.message)?;  // written and synced to disk first
//! order.ack(); // now the PUBACK goes out
//! # running.stop().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod forward;
pub mod memory;
pub mod mqtt;
pub mod outbox;
pub mod session;
pub mod storage;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

/// A 16-byte message id (the envelope's UUID), used for idempotent delivery.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId([u8; 16]);

impl MessageId {
    /// From the 16 bytes of a UUID.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        MessageId(bytes)
    }

    /// The bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// How much a message matters when the outbox is full (see [`outbox`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Periodic snapshots and collections: dropped first.
    Routine,
    /// Status-change events, alerts, exception logs.
    Event,
    /// Order results: never dropped.
    Critical,
}

/// A message for the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundMessage {
    /// The envelope id.
    pub id: MessageId,
    /// The MQTT topic.
    pub topic: String,
    /// The payload (JSON).
    pub payload: Bytes,
    /// Its priority class.
    pub priority: Priority,
}

/// A message from the server (an order), as carried inside a [`ReceivedOrder`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundMessage {
    /// The MQTT topic.
    pub topic: String,
    /// The payload (JSON).
    pub payload: Bytes,
}

/// Transport errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Not connected now; try again later (the outbox keeps the message).
    #[error("not connected")]
    Unavailable,
    /// The connection closed while waiting.
    #[error("connection closed")]
    Closed,
    /// The peer refused (e.g. MQTT CONNACK refusal, ACL).
    #[error("refused by the peer: {0}")]
    Refused(String),
    /// No answer in time.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// The caller passed something invalid (e.g. a topic with wildcards).
    #[error("bad input: {0}")]
    BadInput(String),
    /// I/O failure.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// A publish handed to an [`Uplink`]: resolves once the server acknowledged it.
pub type PendingPublish = Pin<Box<dyn Future<Output = Result<(), TransportError>> + Send>>;

/// Publishes messages to the server.
#[async_trait]
pub trait Uplink: Send + Sync {
    /// Publishes one message and returns once the server acknowledged it (QoS 1 PUBACK).
    async fn publish(&self, message: &OutboundMessage) -> Result<(), TransportError>;
    /// Hands a message over and returns without waiting for the server's acknowledgement,
    /// which the returned future resolves to; messages handed over one after another are
    /// sent in that order, so a caller can pipeline them. Waits while the uplink's in-flight
    /// window is full. The default publishes fully first, then returns a ready future.
    async fn start_publish(
        &self,
        message: &OutboundMessage,
    ) -> Result<PendingPublish, TransportError> {
        let result = self.publish(message).await;
        Ok(Box::pin(std::future::ready(result)))
    }
    /// Whether the uplink is connected now.
    fn is_connected(&self) -> bool;
}

/// An order handed over by an [`OrderSource`], not yet acknowledged to the server.
///
/// The agent records the order (its on-disk journal) and then calls [`ReceivedOrder::ack`],
/// which makes the transport acknowledge it (MQTT: the PUBACK). Dropping it without `ack`
/// acknowledges nothing: the server (or broker, with the persistent session) delivers the
/// order again after the next reconnection, possibly marked as a redelivery, possibly not. So
/// the same order can arrive more than once: the agent de-duplicates by the envelope's order
/// id, and acknowledges a duplicate too once it knows the order is recorded.
///
/// An `ack` after the connection that delivered the order has closed is a harmless no-op:
/// that connection can no longer acknowledge anything, and the order comes again on a later
/// one.
#[must_use = "an order is acknowledged only by `ack()`; dropping it leaves it to be delivered again"]
pub struct ReceivedOrder {
    /// The order as received.
    pub message: InboundMessage,
    redelivered: bool,
    ack: Box<dyn FnOnce() + Send + Sync>,
}

impl ReceivedOrder {
    /// An order whose acknowledgement runs `ack` (for [`OrderSource`] implementations).
    /// `redelivered`: the transport marked it as a possible duplicate (MQTT's DUP flag).
    pub fn new(
        message: InboundMessage,
        redelivered: bool,
        ack: impl FnOnce() + Send + Sync + 'static,
    ) -> Self {
        ReceivedOrder {
            message,
            redelivered,
            ack: Box::new(ack),
        }
    }

    /// Whether the transport marked it as a redelivery of an order sent before (MQTT's DUP
    /// flag). A hint only: a duplicate may also arrive unmarked, so de-duplicate by order id.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Acknowledges the order to the server: call once it is recorded. Does not wait for the
    /// acknowledgement to be written; a no-op when the delivering connection has closed.
    pub fn ack(self) {
        (self.ack)();
    }
}

impl fmt::Debug for ReceivedOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceivedOrder")
            .field("message", &self.message)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

/// Receives orders from the server.
#[async_trait]
pub trait OrderSource: Send + Sync {
    /// The next order, in arrival order; waits until one arrives or the source closes. The
    /// order is acknowledged to the server only by [`ReceivedOrder::ack`].
    async fn next_order(&self) -> Result<ReceivedOrder, TransportError>;
}

/// Errors talking to a projector.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The projector answered `ERR`.
    #[error("the projector refused the command")]
    Refused,
    /// No answer in time.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    /// The projector cannot be reached (connection refused, handshake refused, closed).
    #[error("projector unreachable: {0}")]
    Unreachable(String),
    /// The command text is not a valid ESC/VP21 command.
    #[error("bad command: {0}")]
    BadCommand(String),
}

/// What the agent uses to talk to one projector, in raw ESC/VP21 text.
#[async_trait]
pub trait ProjectorLink: Send + Sync {
    /// Runs a command such as `PWR?` or `PWR ON` and returns the value of a query (`"01"`) or
    /// an empty string for an acknowledged set.
    async fn execute(&self, command: &str, timeout: Duration) -> Result<String, LinkError>;
    /// The next unsolicited event line value (the text after `IMEVENT=`).
    async fn next_event(&self) -> Result<String, LinkError>;
}

//! What the ingest endpoint hands to the rest of the server: committed messages, agent
//! presence and security events, through one small trait so the store and the audit log can
//! be wired in without the endpoint knowing either.

use std::net::SocketAddr;

use bytes::Bytes;
use epmc_proto::topic::{AgentId, Channel};

/// One message an agent published, as the endpoint hands it to the sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inbound {
    /// The publishing agent (from its certificate, checked against the topic).
    pub agent: AgentId,
    /// The channel, parsed from the topic (never [`Channel::Orders`]).
    pub channel: Channel,
    /// The payload, unparsed: the sink decides whether it is a valid envelope.
    pub payload: Bytes,
}

/// The presence an agent states on its `state` channel: `online` (published, retained, when it
/// connects) is `Some(true)`, `offline` (its last will) `Some(false)`; anything else, or another
/// channel, `None`. Surrounding ASCII white space is ignored.
pub fn stated_presence(channel: Channel, payload: &[u8]) -> Option<bool> {
    match (channel, payload.trim_ascii()) {
        (Channel::State, b"online") => Some(true),
        (Channel::State, b"offline") => Some(false),
        _ => None,
    }
}

/// What the sink did with one message of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stored for the first time.
    Stored,
    /// Its id was already stored: acknowledged, not stored again.
    Duplicate,
    /// Kept as a rejected message with its reason (bad JSON, unknown kind, …); still
    /// acknowledged so a poison message cannot block an agent's outbox.
    Rejected(String),
}

/// The sink could not commit: nothing of the batch is acknowledged and the connections
/// that sent it are closed, so their agents retry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ingest sink failed: {0}")]
pub struct SinkError(pub String);

/// A violation of the identity or topic rules, a refused TLS handshake, or a limit reached:
/// recorded, never acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecurityEvent {
    /// TLS accepted the certificate but the identity extractor found no agent id in it.
    BadIdentity {
        /// Remote address.
        peer: SocketAddr,
        /// Why.
        detail: String,
    },
    /// The CONNECT client id differs from the certificate's agent id (CONNACK 0x02).
    ClientIdMismatch {
        /// The certificate's agent id.
        agent: AgentId,
        /// The client id the CONNECT carried.
        client_id: String,
        /// Remote address.
        peer: SocketAddr,
    },
    /// A PUBLISH (or the last will of a CONNECT) to a topic outside the agent's own
    /// publishable channels.
    PublishOutsidePrefix {
        /// The agent.
        agent: AgentId,
        /// The topic it tried.
        topic: String,
        /// Remote address.
        peer: SocketAddr,
    },
    /// A SUBSCRIBE to anything but the agent's own orders topic.
    SubscribeOutsideOrders {
        /// The agent.
        agent: AgentId,
        /// The filter it tried.
        filter: String,
        /// Remote address.
        peer: SocketAddr,
    },
    /// Bytes that are not a valid MQTT 3.1.1 packet, or a packet out of place (a second
    /// CONNECT, a packet only a server sends, anything before CONNECT).
    MalformedPacket {
        /// The agent, once its certificate was read.
        agent: Option<AgentId>,
        /// Remote address.
        peer: SocketAddr,
        /// What was wrong.
        detail: String,
    },
    /// A packet larger than the endpoint's maximum.
    PacketTooLarge {
        /// The agent, once its certificate was read.
        agent: Option<AgentId>,
        /// Remote address.
        peer: SocketAddr,
        /// Its announced size.
        size: usize,
        /// The maximum.
        max: usize,
    },
    /// The connection was closed by [`super::Endpoint::kick`] (e.g. a revoked certificate).
    Kicked {
        /// The agent.
        agent: AgentId,
        /// Remote address.
        peer: SocketAddr,
    },
    /// A TCP connection refused because the endpoint holds its maximum of connections.
    ConnectionLimit {
        /// Remote address.
        peer: SocketAddr,
    },
    /// TLS handshake and CONNECT did not complete before the CONNECT deadline.
    ConnectDeadline {
        /// The agent, if its TLS handshake completed.
        agent: Option<AgentId>,
        /// Remote address.
        peer: SocketAddr,
    },
    /// The TLS handshake failed: no client certificate, one the CA did not issue, an expired
    /// or revoked one, or a peer that does not speak TLS or refused the server. A peer that
    /// only goes away during the handshake (a port probe) is not an event.
    TlsRefused {
        /// Why.
        reason: TlsRefusal,
        /// The agent, when its certificate is the CA's (refused for its revocation).
        agent: Option<AgentId>,
        /// Remote address.
        peer: SocketAddr,
        /// What TLS said, and the refused certificate's serial and stated subject.
        detail: String,
    },
}

/// Why a TLS handshake was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsRefusal {
    /// The client presented no certificate.
    NoCertificate,
    /// The CA revoked the certificate.
    Revoked,
    /// The certificate is expired or not valid yet.
    Expired,
    /// The CA did not issue the certificate, or it is unusable (bad signature or encoding,
    /// wrong purpose).
    Untrusted,
    /// Anything else: not TLS, no common protocol version or suite, the client's own alert.
    Failed,
}

impl TlsRefusal {
    /// The refusal as a short machine-readable kind, e.g. `tls_revoked_certificate`.
    pub fn kind(self) -> &'static str {
        match self {
            TlsRefusal::NoCertificate => "tls_no_certificate",
            TlsRefusal::Revoked => "tls_revoked_certificate",
            TlsRefusal::Expired => "tls_expired_certificate",
            TlsRefusal::Untrusted => "tls_untrusted_certificate",
            TlsRefusal::Failed => "tls_failed",
        }
    }
}

/// A batch as [`IngestSink::prepare`] left it: what the sink made of its messages, opaque to
/// the endpoint.
pub struct Prepared {
    len: usize,
    work: Box<dyn std::any::Any + Send>,
}

impl Prepared {
    /// `work` made of `len` messages, in their order.
    pub fn new<T: std::any::Any + Send>(len: usize, work: T) -> Prepared {
        Prepared {
            len,
            work: Box::new(work),
        }
    }

    /// The messages as they came, nothing done yet.
    pub fn unprepared(batch: Vec<Inbound>) -> Prepared {
        Prepared::new(batch.len(), batch)
    }

    /// How many messages it holds (the commit returns as many outcomes).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no message.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The work, if it is a `T`.
    pub fn take<T: std::any::Any>(self) -> Result<T, SinkError> {
        self.work
            .downcast::<T>()
            .map(|b| *b)
            .map_err(|_| SinkError("a batch prepared by another sink".into()))
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Where the endpoint delivers what it receives. One writer task calls
/// [`IngestSink::commit_prepared`] at a time, in order (and [`IngestSink::prepare`] for the
/// next batch meanwhile); the other methods may be called from any connection.
#[async_trait::async_trait]
pub trait IngestSink: Send + Sync {
    /// Stores a batch durably and returns one outcome per message, in order. The endpoint
    /// acknowledges the batch's messages only after this returns `Ok`.
    async fn commit(&self, batch: Vec<Inbound>) -> Result<Vec<Outcome>, SinkError>;

    /// Does the work on a batch that needs no database (decoding, say). The endpoint calls
    /// it on a blocking thread while the batch before is still committing, and hands the
    /// result to [`IngestSink::commit_prepared`] once that commit is done. The default does
    /// nothing.
    fn prepare(&self, batch: Vec<Inbound>) -> Prepared {
        Prepared::unprepared(batch)
    }

    /// Commits a batch made by [`IngestSink::prepare`], with the promise of
    /// [`IngestSink::commit`]. The default commits the messages [`Prepared::unprepared`]
    /// holds and fails on anything else.
    async fn commit_prepared(&self, batch: Prepared) -> Result<Vec<Outcome>, SinkError> {
        let batch = batch.take::<Vec<Inbound>>()?;
        self.commit(batch).await
    }

    /// The agent connected (`true`) or went away (`false`). Calls for one agent arrive in
    /// the order of its connections (a replaced connection reports nothing).
    async fn agent_state(&self, agent: AgentId, online: bool);

    /// Several presence changes, in the order they happened. The default calls
    /// [`IngestSink::agent_state`] for each; a sink may record them together.
    async fn agent_states(&self, changes: Vec<(AgentId, bool)>) {
        for (agent, online) in changes {
            self.agent_state(agent, online).await;
        }
    }

    /// Records a security event.
    async fn security_event(&self, event: SecurityEvent);
}

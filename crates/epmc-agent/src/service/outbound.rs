//! Everything the agent sends goes through [`Publisher`]: the message is wrapped in an
//! envelope, put on the topic its kind belongs to (built from the agent's own id), written
//! durably to the outbox, and the forwarder is woken. The push is synced to disk before
//! `publish` returns, so once it returns the message survives a crash or a server outage.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use epmc_proto::topic::{self, AgentId, Channel};
use epmc_proto::{Envelope, Kind, Message, ProtoError};
use epmc_transport::outbox::{Outbox, OutboxError};
use epmc_transport::{MessageId, OutboundMessage, Priority};
use tokio::sync::Notify;

/// Why a message could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The message does not encode (a bug: bounded types should prevent it).
    #[error("cannot encode the message: {0}")]
    Encode(#[from] ProtoError),
    /// The outbox refused or failed.
    #[error("{0}")]
    Outbox(#[from] OutboxError),
    /// Orders go from the server to the agent, never back.
    #[error("an agent does not send orders")]
    NotSendable,
}

/// How much a kind of message matters when the outbox is full.
pub fn priority(kind: Kind) -> Option<Priority> {
    Some(match kind {
        Kind::Snapshot | Kind::Collection => Priority::Routine,
        Kind::Hello | Kind::Event | Kind::ExceptionLog => Priority::Event,
        Kind::OrderResult => Priority::Critical,
        Kind::Order => return None,
    })
}

/// Queues messages for the server; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Publisher {
    agent: AgentId,
    outbox: Arc<Mutex<Outbox>>,
    wake: Arc<Notify>,
}

impl Publisher {
    /// A publisher for `agent` over `outbox`, waking the forwarder through `wake`.
    pub fn new(agent: AgentId, outbox: Arc<Mutex<Outbox>>, wake: Arc<Notify>) -> Publisher {
        Publisher {
            agent,
            outbox,
            wake,
        }
    }

    /// The agent id its topics are built from.
    pub fn agent(&self) -> &AgentId {
        &self.agent
    }

    /// Wraps, stores durably and queues one message; returns its envelope id.
    pub async fn publish(&self, message: Message) -> Result<uuid::Uuid, PublishError> {
        let priority = priority(message.kind()).ok_or(PublishError::NotSendable)?;
        let envelope = Envelope::new(message);
        let payload = envelope.to_json()?;
        let topic = topic::topic(&self.agent, Channel::for_kind(envelope.kind()));
        let outbound = OutboundMessage {
            id: MessageId::from_bytes(envelope.id.into_bytes()),
            topic,
            payload: Bytes::from(payload),
            priority,
        };
        let outbox = self.outbox.clone();
        // The push syncs to disk: keep it off the async worker threads.
        tokio::task::spawn_blocking(move || {
            outbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(outbound)
        })
        .await
        .map_err(|e| OutboxError::Io(std::io::Error::other(e.to_string())))??;
        self.wake.notify_one();
        Ok(envelope.id)
    }

    /// Messages waiting for the server.
    pub fn pending(&self) -> usize {
        self.outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats()
            .messages
    }
}

//! Everything the agent sends goes through [`Publisher`]: the message is wrapped in an
//! envelope, put on the topic its kind belongs to (built from the agent's own id), written
//! durably to the outbox, and the forwarder is woken. The push is synced to disk before
//! `publish` returns, so once it returns the message survives a crash or a server outage.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use epmc_proto::topic::{self, AgentId, Channel};
use epmc_proto::{Envelope, Kind, Message, ProtoError};
use epmc_transport::outbox::{Outbox, OutboxError};
use epmc_transport::{MessageId, OutboundMessage, Priority};
use tokio::sync::Notify;

/// The first wait before trying again ([`until_done`]).
pub const RETRY_FIRST: Duration = Duration::from_millis(250);
/// The longest wait between two tries.
pub const RETRY_MAX: Duration = Duration::from_secs(10);

/// Whether an outbox error may pass: the disk failed or is full, or the outbox is full of
/// messages it may not drop (room comes as the server acknowledges them). Not an error of the
/// message itself, which trying again cannot cure.
pub fn passing(e: &OutboxError) -> bool {
    matches!(e, OutboxError::Io(_) | OutboxError::Full { .. })
}

/// Runs `attempt` until it succeeds, or fails with an error that `passing` says may not pass
/// (returned at once). Between tries it waits [`RETRY_FIRST`], doubling up to [`RETRY_MAX`].
/// `failed` is told of the first failure; later ones are logged at debug level, and a success
/// after failures at info level, naming `what`.
pub async fn until_done<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    what: &str,
    mut attempt: impl FnMut() -> F,
    passing: impl Fn(&E) -> bool,
    mut failed: impl FnMut(&E),
) -> Result<T, E> {
    let mut delay = RETRY_FIRST;
    let mut first = true;
    loop {
        match attempt().await {
            Ok(v) => {
                if !first {
                    tracing::info!(what, "done after all");
                }
                return Ok(v);
            }
            Err(e) if !passing(&e) => return Err(e),
            Err(e) if first => {
                failed(&e);
                first = false;
            }
            Err(e) => tracing::debug!(what, error = %e, "not done yet; trying again"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_MAX);
    }
}

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
        let (id, outbound) = self.outbound(message)?;
        self.push(outbound).await?;
        Ok(id)
    }

    /// [`Publisher::publish`] for a message that must not be lost while the agent runs (an
    /// order's result): while the outbox fails (a full disk) or is full, the same envelope is
    /// pushed again with back-off (every 250 ms, doubling up to every 10 s), so a push that
    /// failed but was kept is not stored twice. `failed` is told of the first failure. An
    /// error that trying again cannot cure (the envelope does not encode, or can never fit) is
    /// returned at once.
    pub async fn publish_persistently(
        &self,
        message: Message,
        mut failed: impl FnMut(&PublishError),
    ) -> Result<uuid::Uuid, PublishError> {
        let (id, outbound) = self.outbound(message)?;
        until_done(
            &format!("message {id}"),
            || self.push(outbound.clone()),
            |e| matches!(e, PublishError::Outbox(o) if passing(o)),
            &mut failed,
        )
        .await?;
        Ok(id)
    }

    /// The envelope of `message`, on the topic its kind belongs to.
    fn outbound(&self, message: Message) -> Result<(uuid::Uuid, OutboundMessage), PublishError> {
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
        Ok((envelope.id, outbound))
    }

    /// Stores one message durably and wakes the forwarder.
    async fn push(&self, outbound: OutboundMessage) -> Result<(), PublishError> {
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
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use epmc_proto::sample;
    use epmc_transport::outbox::Limits;
    use epmc_transport::storage::sim::{Fault, SimStorage};

    /// While the outbox's syncs fail, an order's result is pushed again until it is taken, and
    /// it is stored once: the same envelope every time, although the failed pushes wrote it.
    #[tokio::test]
    async fn a_result_is_pushed_again_until_the_outbox_takes_it_and_stored_once() {
        let sim = Arc::new(SimStorage::new());
        let outbox = Outbox::open_in(sim.clone(), "/state/outbox", Limits::default()).unwrap();
        let outbox = Arc::new(Mutex::new(outbox));
        let agent = AgentId::new(uuid::Uuid::new_v4());
        let publisher = Publisher::new(agent, outbox.clone(), Arc::new(Notify::new()));
        for _ in 0..3 {
            sim.inject(Fault::Sync);
        }
        let result = sample::sample(Kind::OrderResult).message;
        let mut failures = 0;
        let id = publisher
            .publish_persistently(result, |_| failures += 1)
            .await
            .expect("queued after all");
        assert_eq!(sim.pending_faults(), 0, "every injected failure was met");
        assert_eq!(failures, 1, "told of the first failure only");
        let outbox = outbox.lock().unwrap();
        let pending: Vec<_> = outbox.pending().map(|h| h.message.id).collect();
        assert_eq!(
            pending,
            vec![MessageId::from_bytes(id.into_bytes())],
            "the result, once"
        );
    }

    /// A message the outbox can never take is not tried again.
    #[tokio::test]
    async fn a_message_that_can_never_fit_is_refused_at_once() {
        let sim = Arc::new(SimStorage::new());
        let limits = Limits {
            max_bytes: 64,
            max_messages: 10,
        };
        let outbox = Outbox::open_in(sim, "/state/outbox", limits).unwrap();
        let agent = AgentId::new(uuid::Uuid::new_v4());
        let publisher =
            Publisher::new(agent, Arc::new(Mutex::new(outbox)), Arc::new(Notify::new()));
        let mut failures = 0;
        let queued = tokio::time::timeout(
            Duration::from_secs(5),
            publisher
                .publish_persistently(sample::sample(Kind::OrderResult).message, |_| failures += 1),
        )
        .await
        .expect("returned at once");
        assert!(
            matches!(queued, Err(PublishError::Outbox(OutboxError::TooLarge(_)))),
            "{queued:?}"
        );
        assert_eq!(failures, 0);
    }
}

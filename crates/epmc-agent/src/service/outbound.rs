//! Everything the agent sends goes through [`Publisher`]: the message is wrapped in an
//! envelope, put on the topic its kind belongs to (built from the agent's own id), written
//! durably to the outbox, and the forwarder is woken. The push is synced to disk before
//! `publish` returns, so once it returns the message survives a crash or a server outage.
//!
//! While the outbox cannot take a message for a reason that may pass (its disk is full or
//! failing, or it is full of messages it may not drop), the message is **held** in memory, in
//! order, and a task pushes what is held with back-off until the outbox takes it; later
//! messages queue behind it, so they reach the server in the order they were made. What is
//! held is bounded ([`HELD_MAX_MESSAGES`], [`HELD_MAX_BYTES`]): past that, the oldest of the
//! least important kind is dropped and logged. Held messages do not survive a restart.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
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

/// At most this many messages are held in memory while the outbox cannot take them.
pub const HELD_MAX_MESSAGES: usize = 1_000;
/// At most this many bytes of payload are held in memory.
pub const HELD_MAX_BYTES: usize = 4 << 20;

/// Why a message could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Not queued yet: the outbox could not take the message (or others are held before it),
    /// so it is held in memory and queued once the outbox takes it.
    #[error("message {id} held in memory until the outbox takes it ({reason})")]
    Held {
        /// The envelope id.
        id: uuid::Uuid,
        /// Why the outbox did not take it.
        reason: String,
    },
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

impl PublishError {
    /// Whether trying again may succeed: the outbox failed in a way that may pass
    /// ([`passing`]).
    fn may_pass(&self) -> bool {
        matches!(self, PublishError::Outbox(o) if passing(o))
    }
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
    held: Arc<Mutex<Held>>,
}

fn uuid(id: MessageId) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*id.as_bytes())
}

/// Messages the outbox could not take yet, oldest first.
#[derive(Debug, Default)]
struct Held {
    queue: VecDeque<OutboundMessage>,
    bytes: usize,
    /// Whether a task is pushing them.
    flushing: bool,
    /// Messages dropped to keep within the bounds, since the start.
    dropped: u64,
}

impl Held {
    /// Adds `message` behind the others; past the bounds drops the oldest of the least
    /// important kind (which may be `message` itself) and returns what it dropped.
    fn hold(&mut self, message: OutboundMessage) -> Vec<OutboundMessage> {
        self.bytes += message.payload.len();
        self.queue.push_back(message);
        let mut dropped = Vec::new();
        while self.queue.len() > HELD_MAX_MESSAGES || self.bytes > HELD_MAX_BYTES {
            let least = self.queue.iter().map(|m| m.priority).min();
            let Some(i) = self.queue.iter().position(|m| Some(m.priority) == least) else {
                break;
            };
            if let Some(m) = self.queue.remove(i) {
                self.bytes -= m.payload.len();
                self.dropped += 1;
                dropped.push(m);
            }
        }
        dropped
    }

    /// Removes the front message once it was pushed, unless the bounds dropped it meanwhile.
    fn pushed(&mut self, id: MessageId) {
        if self.queue.front().is_some_and(|m| m.id == id)
            && let Some(m) = self.queue.pop_front()
        {
            self.bytes -= m.payload.len();
        }
    }
}

impl Publisher {
    /// A publisher for `agent` over `outbox`, waking the forwarder through `wake`.
    pub fn new(agent: AgentId, outbox: Arc<Mutex<Outbox>>, wake: Arc<Notify>) -> Publisher {
        Publisher {
            agent,
            outbox,
            wake,
            held: Arc::default(),
        }
    }

    /// The agent id its topics are built from.
    pub fn agent(&self) -> &AgentId {
        &self.agent
    }

    /// Wraps, stores durably and queues one message; returns its envelope id. While the
    /// outbox cannot take it for a reason that may pass, or while other messages are held,
    /// the message is held in memory and [`PublishError::Held`] says so; it is queued later.
    /// Must be called within a Tokio runtime (holding starts a task).
    pub async fn publish(&self, message: Message) -> Result<uuid::Uuid, PublishError> {
        let (id, outbound) = self.outbound(message)?;
        if !self.lock_held().queue.is_empty() {
            self.hold(outbound);
            return Err(PublishError::Held {
                id,
                reason: "others are held before it".to_owned(),
            });
        }
        match self.push(outbound.clone()).await {
            Ok(()) => Ok(id),
            Err(PublishError::Outbox(e)) if passing(&e) => {
                self.hold(outbound);
                Err(PublishError::Held {
                    id,
                    reason: e.to_string(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Messages held in memory, not queued yet.
    pub fn held(&self) -> usize {
        self.lock_held().queue.len()
    }

    /// Messages dropped from what was held, to keep within its bounds, since the start.
    pub fn held_dropped(&self) -> u64 {
        self.lock_held().dropped
    }

    fn lock_held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hold(&self, message: OutboundMessage) {
        let start = {
            let mut held = self.lock_held();
            for m in held.hold(message) {
                tracing::warn!(id = %uuid(m.id), topic = %m.topic, priority = ?m.priority,
                    "held message dropped: too many held while the outbox cannot take them");
            }
            !std::mem::replace(&mut held.flushing, true)
        };
        if start {
            tokio::spawn(self.clone().flush());
        }
    }

    /// Pushes what is held, oldest first, each with back-off until the outbox takes it.
    async fn flush(self) {
        let mut sent = 0usize;
        loop {
            let front = {
                let mut held = self.lock_held();
                match held.queue.front() {
                    Some(m) => m.clone(),
                    None => {
                        held.flushing = false;
                        break;
                    }
                }
            };
            let id = front.id;
            let pushed = until_done(
                "held messages",
                || self.push(front.clone()),
                PublishError::may_pass,
                |_| {},
            )
            .await;
            if let Err(e) = pushed {
                tracing::error!(id = %uuid(id), error = %e, "held message dropped: the outbox refuses it");
            } else {
                sent += 1;
            }
            self.lock_held().pushed(id);
        }
        tracing::info!(messages = sent, "held messages queued");
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
            PublishError::may_pass,
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

    /// While the outbox fails, messages are held in memory; once it works again they are
    /// queued in the order they were made (those made meanwhile behind the first, although
    /// the outbox could have taken them), each once.
    #[tokio::test]
    async fn messages_the_outbox_cannot_take_are_held_then_queued_in_order_once() {
        let sim = Arc::new(SimStorage::new());
        let outbox = Outbox::open_in(sim.clone(), "/state/outbox", Limits::default()).unwrap();
        let outbox = Arc::new(Mutex::new(outbox));
        let agent = AgentId::new(uuid::Uuid::new_v4());
        let publisher = Publisher::new(agent, outbox.clone(), Arc::new(Notify::new()));
        let mut made = Vec::new();
        // One failed sync, then three in a row (the held messages are pushed again with
        // back-off until the outbox takes them).
        for (faults, kinds) in [
            (1, &[Kind::Event, Kind::Snapshot, Kind::Event][..]),
            (3, &[Kind::ExceptionLog, Kind::Event][..]),
        ] {
            for _ in 0..faults {
                sim.inject(Fault::Sync);
            }
            for &kind in kinds {
                match publisher.publish(sample::sample(kind).message).await {
                    Err(PublishError::Held { id, .. }) => made.push(id),
                    other => panic!("{kind:?}: held expected, got {other:?}"),
                }
            }
            assert_eq!(publisher.held(), kinds.len());
            tokio::time::timeout(Duration::from_secs(30), async {
                while publisher.held() > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("the held messages queued once the outbox works");
            assert_eq!(sim.pending_faults(), 0, "every injected failure was met");
        }
        // Later messages go straight to the outbox again.
        let after = publisher
            .publish(sample::sample(Kind::Event).message)
            .await
            .expect("queued at once");
        made.push(after);
        let queued: Vec<_> = outbox
            .lock()
            .unwrap()
            .pending()
            .map(|h| uuid(h.message.id))
            .collect();
        assert_eq!(queued, made, "each once, in the order made");
        assert_eq!(publisher.held_dropped(), 0);
    }

    /// What is held is bounded: past the bounds the oldest of the least important kind goes
    /// (a snapshot before any event), and an order's result is never the one dropped.
    #[test]
    fn what_is_held_is_bounded_dropping_the_oldest_of_the_least_important_first() {
        let message = |n: usize, priority: Priority, size: usize| OutboundMessage {
            id: MessageId::from_bytes((n as u128).to_be_bytes()),
            topic: String::new(),
            payload: Bytes::from(vec![0u8; size]),
            priority,
        };
        let ids = |h: &Held| h.queue.iter().map(|m| m.id).collect::<Vec<_>>();
        let mut held = Held::default();
        assert!(held.hold(message(0, Priority::Event, 10)).is_empty());
        assert!(held.hold(message(1, Priority::Routine, 10)).is_empty());
        for n in 2..HELD_MAX_MESSAGES {
            assert!(held.hold(message(n, Priority::Event, 10)).is_empty());
        }
        assert_eq!(held.queue.len(), HELD_MAX_MESSAGES);
        // One more: the snapshot goes, although it is not the oldest.
        let dropped = held.hold(message(HELD_MAX_MESSAGES, Priority::Critical, 10));
        assert_eq!(
            dropped.iter().map(|m| m.id).collect::<Vec<_>>(),
            [message(1, Priority::Routine, 0).id]
        );
        // Only events and a result left: the oldest event goes.
        let dropped = held.hold(message(HELD_MAX_MESSAGES + 1, Priority::Event, 10));
        assert_eq!(dropped[0].id, message(0, Priority::Event, 0).id);
        assert_eq!(held.queue.len(), HELD_MAX_MESSAGES);
        assert_eq!(held.dropped, 2);
        assert_eq!(held.bytes, 10 * HELD_MAX_MESSAGES);
        // A snapshot arriving now is itself the one to go.
        let dropped = held.hold(message(HELD_MAX_MESSAGES + 2, Priority::Routine, 10));
        assert_eq!(
            dropped[0].id,
            message(HELD_MAX_MESSAGES + 2, Priority::Routine, 0).id
        );
        assert!(ids(&held).contains(&message(HELD_MAX_MESSAGES, Priority::Critical, 0).id));
        // Bytes bound the queue too.
        let mut held = Held::default();
        held.hold(message(0, Priority::Event, HELD_MAX_BYTES / 2));
        held.hold(message(1, Priority::Event, HELD_MAX_BYTES / 2));
        let dropped = held.hold(message(2, Priority::Event, 1));
        assert_eq!(dropped.len(), 1);
        assert_eq!(
            ids(&held),
            [
                message(1, Priority::Event, 0).id,
                message(2, Priority::Event, 0).id
            ]
        );
        assert_eq!(held.bytes, HELD_MAX_BYTES / 2 + 1);
        // A pushed front leaves; an id no longer at the front (dropped meanwhile) changes nothing.
        held.pushed(message(2, Priority::Event, 0).id);
        assert_eq!(held.queue.len(), 2);
        held.pushed(message(1, Priority::Event, 0).id);
        assert_eq!(ids(&held), [message(2, Priority::Event, 0).id]);
        assert_eq!(held.bytes, 1);
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

//! The [`Forwarder`]: drains the durable [`Outbox`] through an [`Uplink`].
//!
//! Messages go out oldest first, a batch at a time through [`Uplink::publish_many`] (so MQTT
//! pipelines them within its in-flight window, in order), and each leaves the outbox only
//! once the server acknowledged it. After a failure the unacknowledged messages stay and the
//! next attempt starts again from the oldest one: delivery is at least once and in order
//! (the server de-duplicates by message id).
//!
//! A message the uplink can never send (larger than the MQTT maximum packet size, a topic
//! with wildcards) would block everything behind it forever: it is removed, logged at error
//! level with its id, and counted in [`ForwardStats::rejected`].

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::outbox::{Outbox, OutboxError};
use crate::{OutboundMessage, TransportError, Uplink};

/// Why a drain stopped early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The uplink failed (not connected, connection lost); the messages stay in the outbox.
    #[error("uplink: {0}")]
    Uplink(#[from] TransportError),
    /// Recording an acknowledgement in the outbox failed.
    #[error("outbox: {0}")]
    Outbox(#[from] OutboxError),
}

/// Counters since the forwarder was made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Messages the server acknowledged.
    pub sent: u64,
    /// Messages removed because the uplink can never send them.
    pub rejected: u64,
    /// Drains that stopped on an uplink failure.
    pub stalls: u64,
}

/// Drains an outbox through an uplink; see the [module docs](self).
pub struct Forwarder {
    outbox: Arc<Mutex<Outbox>>,
    uplink: Arc<dyn Uplink>,
    batch: usize,
    wake: Arc<Notify>,
    stats: Mutex<ForwardStats>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("batch", &self.batch)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Forwarder {
    /// A forwarder sending batches of 32.
    pub fn new(outbox: Arc<Mutex<Outbox>>, uplink: Arc<dyn Uplink>) -> Forwarder {
        Forwarder {
            outbox,
            uplink,
            batch: 32,
            wake: Arc::new(Notify::new()),
            stats: Mutex::new(ForwardStats::default()),
        }
    }

    /// Sets how many messages are handed to the uplink at once (at least 1).
    pub fn with_batch(mut self, batch: usize) -> Forwarder {
        self.batch = batch.max(1);
        self
    }

    /// A handle to wake [`Forwarder::run`] after pushing into the outbox.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// The counters.
    pub fn stats(&self) -> ForwardStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut ForwardStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Sends everything the outbox holds, oldest first, until it is empty (returns how many
    /// messages the server acknowledged) or the uplink fails.
    pub async fn drain(&self) -> Result<u64, ForwardError> {
        let mut sent = 0;
        loop {
            let batch = self.outbox().batch(0, self.batch);
            if batch.is_empty() {
                return Ok(sent);
            }
            let messages: Vec<OutboundMessage> = batch.iter().map(|h| h.message.clone()).collect();
            let results = self.uplink.publish_many(&messages).await;
            let mut failure = None;
            let (mut acked, mut rejected) = (0, 0);
            {
                let mut outbox = self.outbox();
                for (held, result) in batch.iter().zip(results) {
                    match result {
                        Ok(()) => {
                            outbox.ack(held.seq)?;
                            acked += 1;
                        }
                        Err(TransportError::BadInput(why)) => {
                            tracing::error!(id = ?held.message.id, topic = %held.message.topic, %why,
                                "the uplink can never send this message: removed from the outbox");
                            outbox.ack(held.seq)?;
                            rejected += 1;
                        }
                        Err(e) => {
                            failure.get_or_insert(e);
                        }
                    }
                }
            }
            sent += acked;
            self.count(|s| {
                s.sent += acked;
                s.rejected += rejected;
                s.stalls += u64::from(failure.is_some());
            });
            if let Some(e) = failure {
                return Err(e.into());
            }
        }
    }

    /// Drains whenever there is something to send, until `shutdown` completes: after a
    /// failure it waits `retry` (the MQTT session backs off on its own), and when the outbox
    /// is empty it waits for [`Forwarder::waker`] or `retry`, whichever comes first.
    pub async fn run(&self, retry: Duration, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            // Cancelling a drain is safe: what was not acknowledged stays in the outbox.
            let outcome = tokio::select! {
                r = self.drain() => r,
                _ = &mut shutdown => return,
            };
            let waited = async {
                match outcome {
                    Ok(_) => {
                        tokio::select! {
                            _ = self.wake.notified() => {}
                            _ = tokio::time::sleep(retry) => {}
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "outbox drain stalled");
                        tokio::time::sleep(retry).await;
                    }
                }
            };
            tokio::select! {
                _ = waited => {}
                _ = &mut shutdown => return,
            }
        }
    }
}

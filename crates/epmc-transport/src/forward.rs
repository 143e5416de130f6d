//! The [`Forwarder`]: drains the durable [`Outbox`] through an [`Uplink`].
//!
//! Messages go out oldest first through [`Uplink::start_publish`], which hands each over in
//! order without waiting for its acknowledgement, so up to a window of them are in flight at
//! once (the pipe never drains between batches); each leaves the outbox only once the server
//! acknowledged it. After a failure the unacknowledged messages stay and the next attempt
//! starts again from the oldest one: delivery is at least once and in order (the server
//! de-duplicates by message id).
//!
//! A message the uplink can never send (larger than the MQTT maximum packet size, a topic
//! with wildcards) would block everything behind it forever: it is removed, logged at error
//! level with its id, and counted in [`ForwardStats::rejected`].

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use crate::outbox::{Held, Outbox, OutboxError};
use crate::{PendingPublish, TransportError, Uplink};

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
    window: usize,
    wake: Arc<Notify>,
    stats: Mutex<ForwardStats>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("window", &self.window)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Forwarder {
    /// A forwarder keeping up to 64 messages in flight.
    pub fn new(outbox: Arc<Mutex<Outbox>>, uplink: Arc<dyn Uplink>) -> Forwarder {
        Forwarder {
            outbox,
            uplink,
            window: 64,
            wake: Arc::new(Notify::new()),
            stats: Mutex::new(ForwardStats::default()),
        }
    }

    /// Sets how many messages may wait for their acknowledgement at once (at least 1; the
    /// uplink's own window may be smaller).
    pub fn with_window(mut self, window: usize) -> Forwarder {
        self.window = window.max(1);
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
    /// messages the server acknowledged) or the uplink fails. Messages pushed meanwhile are
    /// sent too.
    pub async fn drain(&self) -> Result<u64, ForwardError> {
        let mut sent = 0;
        let mut next_seq = 0;
        let mut in_flight: VecDeque<(Held, PendingPublish)> = VecDeque::new();
        let mut failed = None;
        let outcome = loop {
            // Keep the window full, in outbox order, until something fails.
            while failed.is_none() && in_flight.len() < self.window {
                let Some(held) = self.outbox().batch(next_seq, 1).pop() else {
                    break;
                };
                next_seq = held.seq + 1;
                match self.uplink.start_publish(&held.message).await {
                    Ok(pending) => in_flight.push_back((held, pending)),
                    Err(TransportError::BadInput(why)) => self.reject(&held, &why)?,
                    Err(e) => failed = Some(e),
                }
            }
            // Those already handed over may still be acknowledged.
            let Some((held, pending)) = in_flight.pop_front() else {
                break failed.map_or(Ok(()), Err);
            };
            match pending.await {
                Ok(()) => {
                    self.outbox().ack(held.seq)?;
                    sent += 1;
                    self.count(|s| s.sent += 1);
                }
                Err(TransportError::BadInput(why)) => self.reject(&held, &why)?,
                Err(e) => break Err(e),
            }
        };
        // Whatever is still in flight stays in the outbox and goes again next time.
        drop(in_flight);
        match outcome {
            Ok(()) => Ok(sent),
            Err(e) => {
                self.count(|s| s.stalls += 1);
                Err(e.into())
            }
        }
    }

    fn reject(&self, held: &Held, why: &str) -> Result<(), ForwardError> {
        tracing::error!(id = ?held.message.id, topic = %held.message.topic, %why,
            "the uplink can never send this message: removed from the outbox");
        self.outbox().ack(held.seq)?;
        self.count(|s| s.rejected += 1);
        Ok(())
    }

    /// Runs [`Forwarder::run`] in a task of its own until [`Running::stop`].
    pub fn spawn(self: &Arc<Self>, retry: Duration) -> Running {
        let (stop, stopped) = oneshot::channel::<()>();
        let forwarder = self.clone();
        let task = tokio::spawn(async move {
            forwarder
                .run(retry, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Running { stop, task }
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

/// A forwarder running in its own task (see [`Forwarder::spawn`]).
#[derive(Debug)]
pub struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops it (between messages: what is in flight stays in the outbox) and waits.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

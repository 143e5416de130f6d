//! In-memory transports for tests: an uplink whose server side a test controls, an order
//! source a test feeds, and a scripted projector.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::{
    InboundMessage, LinkError, OrderSource, OutboundMessage, ProjectorLink, ReceivedOrder,
    TransportError, Uplink,
};

/// What the server side of a [`MemoryUplink`] receives: the message and a way to acknowledge
/// it (drop the [`Delivery`] to leave it unacknowledged, as a lost PUBACK would).
#[derive(Debug)]
pub struct Delivery {
    /// The message.
    pub message: OutboundMessage,
    ack: oneshot::Sender<()>,
}

impl Delivery {
    /// Sends the PUBACK.
    pub fn ack(self) {
        let _ = self.ack.send(());
    }
}

/// An uplink backed by a channel; see [`memory_uplink`].
#[derive(Clone, Debug)]
pub struct MemoryUplink {
    tx: mpsc::Sender<Delivery>,
    connected: Arc<AtomicBool>,
}

/// The test's side of a [`MemoryUplink`].
#[derive(Debug)]
pub struct MemoryServer {
    rx: mpsc::Receiver<Delivery>,
    connected: Arc<AtomicBool>,
}

/// A connected pair.
pub fn memory_uplink(capacity: usize) -> (MemoryUplink, MemoryServer) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let connected = Arc::new(AtomicBool::new(true));
    (
        MemoryUplink {
            tx,
            connected: connected.clone(),
        },
        MemoryServer { rx, connected },
    )
}

impl MemoryServer {
    /// The next delivery, if one arrives.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// Simulates a link going down (publishes fail with `Unavailable`) or up.
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::SeqCst);
    }
}

#[async_trait]
impl Uplink for MemoryUplink {
    async fn publish(&self, message: &OutboundMessage) -> Result<(), TransportError> {
        if !self.connected.load(Ordering::SeqCst) {
            return Err(TransportError::Unavailable);
        }
        let (ack, acked) = oneshot::channel();
        self.tx
            .send(Delivery {
                message: message.clone(),
                ack,
            })
            .await
            .map_err(|_| TransportError::Closed)?;
        // A dropped delivery is a lost PUBACK: the connection is considered gone.
        acked.await.map_err(|_| TransportError::Closed)
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst) && !self.tx.is_closed()
    }
}

/// An order source fed by a test, with the same acknowledgement contract as the MQTT
/// session: [`ReceivedOrder::ack`] is recorded ([`MemoryOrders::acked`]), an order handed
/// over and not acknowledged stays outstanding ([`MemoryOrders::unacked`]), and
/// [`MemoryOrders::reconnect`] delivers the outstanding ones again, as a broker does after a
/// reconnection.
#[derive(Clone, Debug)]
pub struct MemoryOrders {
    state: Arc<Mutex<OrdersState>>,
    notify: Arc<Notify>,
    closed: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct OrdersState {
    /// Waiting to be handed over, with whether each is a redelivery.
    queue: VecDeque<(InboundMessage, bool)>,
    /// Handed over, not acknowledged: delivery number and order, in delivery order.
    outstanding: Vec<(u64, InboundMessage)>,
    acked: Vec<InboundMessage>,
    next_delivery: u64,
}

impl Default for MemoryOrders {
    fn default() -> Self {
        MemoryOrders {
            state: Arc::default(),
            notify: Arc::new(Notify::new()),
            closed: Arc::default(),
        }
    }
}

impl MemoryOrders {
    fn state(&self) -> std::sync::MutexGuard<'_, OrdersState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an order.
    pub fn send(&self, order: InboundMessage) {
        self.state().queue.push_back((order, false));
        self.notify.notify_one();
    }

    /// Closes the source: `next_order` fails with `Closed` once the queue is empty.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// The orders acknowledged so far, in acknowledgement order.
    pub fn acked(&self) -> Vec<InboundMessage> {
        self.state().acked.clone()
    }

    /// The orders handed over and not acknowledged (held or dropped), in delivery order.
    pub fn unacked(&self) -> Vec<InboundMessage> {
        self.state()
            .outstanding
            .iter()
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Simulates a reconnection with a persistent session: every order handed over and not
    /// acknowledged is queued again, first and marked as a redelivery; acknowledging one of
    /// the earlier handles is then a no-op, as for a closed MQTT connection.
    pub fn reconnect(&self) {
        let mut state = self.state();
        let again: Vec<_> = state.outstanding.drain(..).map(|(_, m)| m).collect();
        for m in again.into_iter().rev() {
            state.queue.push_front((m, true));
        }
        drop(state);
        self.notify.notify_one();
    }
}

#[async_trait]
impl OrderSource for MemoryOrders {
    async fn next_order(&self) -> Result<ReceivedOrder, TransportError> {
        loop {
            let notified = self.notify.notified();
            {
                let mut state = self.state();
                if let Some((message, redelivered)) = state.queue.pop_front() {
                    let delivery = state.next_delivery;
                    state.next_delivery += 1;
                    state.outstanding.push((delivery, message.clone()));
                    let shared = Arc::downgrade(&self.state);
                    return Ok(ReceivedOrder::new(message, redelivered, move || {
                        let Some(shared) = shared.upgrade() else {
                            return;
                        };
                        let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(i) = state.outstanding.iter().position(|(d, _)| *d == delivery)
                        {
                            let (_, m) = state.outstanding.remove(i);
                            state.acked.push(m);
                        }
                    }));
                }
            }
            if self.closed.load(Ordering::SeqCst) {
                return Err(TransportError::Closed);
            }
            notified.await;
        }
    }
}

/// A projector that answers from a script: `command → reply`, where a reply of `ERR` is a
/// refusal and a missing command times out (after the given timeout, in virtual or real time).
#[derive(Clone, Debug, Default)]
pub struct ScriptedProjector {
    replies: Arc<Mutex<HashMap<String, String>>>,
    events: Arc<Mutex<VecDeque<String>>>,
    notify: Arc<Notify>,
    log: Arc<Mutex<Vec<String>>>,
}

impl ScriptedProjector {
    /// Sets the reply to `command`.
    pub fn on(&self, command: &str, reply: &str) -> &Self {
        self.replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(command.to_owned(), reply.to_owned());
        self
    }

    /// Queues an IMEVENT value.
    pub fn push_event(&self, value: &str) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(value.to_owned());
        self.notify.notify_one();
    }

    /// Commands executed so far.
    pub fn executed(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[async_trait]
impl ProjectorLink for ScriptedProjector {
    async fn execute(&self, command: &str, timeout: Duration) -> Result<String, LinkError> {
        if command.is_empty() || command.contains(['\r', '\n', ':']) {
            return Err(LinkError::BadCommand(command.to_owned()));
        }
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(command.to_owned());
        let reply = self
            .replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(command)
            .cloned();
        match reply.as_deref() {
            Some("ERR") => Err(LinkError::Refused),
            Some(r) => Ok(r.to_owned()),
            None => {
                tokio::time::sleep(timeout).await;
                Err(LinkError::TimedOut(timeout))
            }
        }
    }

    async fn next_event(&self) -> Result<String, LinkError> {
        loop {
            let notified = self.notify.notified();
            if let Some(e) = self
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()
            {
                return Ok(e);
            }
            notified.await;
        }
    }
}

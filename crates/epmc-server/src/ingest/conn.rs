//! One agent connection: TLS, identity, CONNECT, then packets until it ends.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use epmc_proto::topic::{self, AgentId, Channel};
use epmc_transport::mqtt::{Connect, ConnectReturn, Packet, PacketError, Publish, QoS, TopicName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use super::sink::{Inbound, SecurityEvent, TlsRefusal};
use super::writer::{CommitResult, Control, Pending};
use super::{CloseReason, OrderError, Registered, Shared};

type Tls = TlsStream<TcpStream>;

/// Most bytes taken from TLS in one read. They are read into a buffer on the stack of the poll
/// (not in the connection's state): an idle agent waits in a read, and a heap buffer held for
/// that wait counted for every idle agent (16 KiB, later 4 KiB, per connection; see
/// `benches/ingest_load.rs`). A larger packet takes several reads.
const CHUNK: usize = 4 * 1024;

/// How a connection ended.
enum End {
    /// The agent sent DISCONNECT.
    Disconnected,
    /// The agent closed, or the socket failed.
    Lost,
    /// Nothing heard for 1.5 × the keep-alive.
    KeepAlive,
    /// A rule was broken: recorded, closed without acknowledging.
    Violation(SecurityEvent),
    /// [`super::Endpoint::kick`].
    Kicked,
    /// A newer connection with the same client id.
    Replaced,
    /// A commit failed: close unacknowledged so the agent retries.
    CommitFailed,
    /// A write timed out or failed, or too much waits to be written: a slow reader.
    WriteFailed,
    /// The endpoint is shutting down.
    Shutdown,
}

fn packet_event(e: &PacketError, agent: Option<AgentId>, peer: SocketAddr) -> SecurityEvent {
    match e {
        PacketError::TooLarge { size, max } => SecurityEvent::PacketTooLarge {
            agent,
            peer,
            size: *size,
            max: *max,
        },
        other => SecurityEvent::MalformedPacket {
            agent,
            peer,
            detail: other.to_string(),
        },
    }
}

/// The security event of a failed TLS handshake; `None` when the peer only went away (a TCP
/// probe, a client that gave up): no TLS error, nothing to record.
fn tls_refusal(
    e: &std::io::Error,
    certificate: Option<crate::ca::RefusedCertificate>,
    peer: SocketAddr,
) -> Option<SecurityEvent> {
    use rustls::{CertificateError as C, Error as E};
    let error = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    let reason = match error {
        E::NoCertificatesPresented => TlsRefusal::NoCertificate,
        E::InvalidCertificate(C::Revoked) => TlsRefusal::Revoked,
        E::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => TlsRefusal::Expired,
        E::InvalidCertificate(_) => TlsRefusal::Untrusted,
        _ => TlsRefusal::Failed,
    };
    let mut detail = error.to_string();
    let mut agent = None;
    if let Some(c) = certificate {
        // A name is an agent's only in a certificate the CA issued (refused as revoked).
        agent = c
            .issued
            .then(|| c.subject.as_deref().and_then(|s| AgentId::parse(s).ok()))
            .flatten();
        detail.push_str(&format!("; certificate serial {}", c.serial));
        match &c.subject {
            Some(subject) if c.issued => detail.push_str(&format!(", subject {subject:?}")),
            Some(subject) => detail.push_str(&format!(", claimed subject {subject:?}")),
            None => {}
        }
    }
    Some(SecurityEvent::TlsRefused {
        reason,
        agent,
        peer,
        detail,
    })
}

enum ReadError {
    Packet(PacketError),
    Closed,
}

/// Reads one packet before the stream is split (the CONNECT).
async fn read_packet(tls: &mut Tls, buf: &mut Vec<u8>, max: usize) -> Result<Packet, ReadError> {
    let mut chunk = [0u8; 4096];
    // Each pass adds at least one byte and the packet is at most `max` bytes, so this ends.
    loop {
        match Packet::decode(buf, max) {
            Ok((p, used)) => {
                buf.drain(..used);
                return Ok(p);
            }
            Err(PacketError::Incomplete { .. }) => {}
            Err(e) => return Err(ReadError::Packet(e)),
        }
        match tls.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn write_now(tls: &mut Tls, p: &Packet, max: usize, limit: Duration) {
    let mut out = Vec::new();
    if p.encode(&mut out, max).is_ok() {
        let _ = tokio::time::timeout(limit, async {
            tls.write_all(&out).await?;
            tls.flush().await
        })
        .await;
    }
}

/// Refuses a CONNECT with `code`, then closes.
async fn refuse(tls: &mut Tls, code: ConnectReturn, max: usize, limit: Duration) {
    let connack = Packet::ConnAck {
        session_present: false,
        code,
    };
    write_now(tls, &connack, max, limit).await;
    let _ = tokio::time::timeout(limit, tls.shutdown()).await;
}

/// TLS handshake, identity and CONNECT, all before the CONNECT deadline.
async fn handshake(
    shared: &Shared,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(Tls, Vec<u8>, AgentId, Connect)> {
    let cfg = &shared.config;
    let deadline = Instant::now() + cfg.connect_timeout;
    let accept = crate::ca::noting_refused_certificate(acceptor.accept(tcp));
    let mut tls = match tokio::time::timeout_at(deadline, accept).await {
        Ok((Ok(tls), _)) => tls,
        Ok((Err(e), refused)) => {
            match tls_refusal(&e, refused, peer) {
                Some(event) => shared.violation(event).await,
                None => tracing::debug!(%peer, error = %e, "TLS handshake ended"),
            }
            return None;
        }
        Err(_) => {
            shared
                .violation(SecurityEvent::ConnectDeadline { agent: None, peer })
                .await;
            return None;
        }
    };
    let chain = tls.get_ref().1.peer_certificates().unwrap_or(&[]);
    let agent = match (shared.identity)(chain) {
        Ok(agent) => agent,
        Err(e) => {
            shared
                .violation(SecurityEvent::BadIdentity {
                    peer,
                    detail: e.to_string(),
                })
                .await;
            return None;
        }
    };
    let mut buf = Vec::new();
    let first = tokio::time::timeout_at(deadline, read_packet(&mut tls, &mut buf, cfg.max_packet));
    let connect = match first.await {
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(other)) => {
            let detail = format!("expected CONNECT, got {}", packet_name(&other));
            shared
                .violation(SecurityEvent::MalformedPacket {
                    agent: Some(agent),
                    peer,
                    detail,
                })
                .await;
            return None;
        }
        Ok(Err(ReadError::Packet(e))) => {
            shared.violation(packet_event(&e, Some(agent), peer)).await;
            return None;
        }
        Ok(Err(ReadError::Closed)) => return None,
        Err(_) => {
            shared
                .violation(SecurityEvent::ConnectDeadline {
                    agent: Some(agent),
                    peer,
                })
                .await;
            return None;
        }
    };
    if connect.client_id != agent.to_string() {
        shared
            .violation(SecurityEvent::ClientIdMismatch {
                agent,
                client_id: connect.client_id.clone(),
                peer,
            })
            .await;
        refuse(
            &mut tls,
            ConnectReturn::IdentifierRejected,
            cfg.max_packet,
            cfg.write_timeout,
        )
        .await;
        return None;
    }
    if let Some(will) = &connect.will
        && will.topic.as_str() != topic::state(&agent)
    {
        shared
            .violation(SecurityEvent::PublishOutsidePrefix {
                agent,
                topic: will.topic.as_str().to_owned(),
                peer,
            })
            .await;
        refuse(
            &mut tls,
            ConnectReturn::NotAuthorized,
            cfg.max_packet,
            cfg.write_timeout,
        )
        .await;
        return None;
    }
    Some((tls, buf, agent, connect))
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck { .. } => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::Subscribe(..) => "SUBSCRIBE",
        Packet::SubAck(..) => "SUBACK",
        Packet::Unsubscribe(..) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

/// What the connection's socket did ([`poll_io`]).
enum Io {
    /// Bytes were read and appended to the session's buffer.
    Read,
    /// The agent closed, or reading failed.
    Closed,
    /// The write in flight is written and flushed.
    Written,
    /// Writing failed.
    WriteFailed,
}

/// The bytes being written to the agent: one batch at a time, bounded by the write timeout.
#[derive(Default)]
struct Outgoing {
    bytes: Vec<u8>,
    done: usize,
    /// Set while a batch is in flight.
    deadline: Option<Instant>,
}

/// Drives the connection's one TLS stream in both directions from one task: writes the batch
/// in flight (then flushes it) and, when `reading`, reads what TLS has into `buf`. Ready with
/// the first thing that happened; the caller polls again for the rest.
fn poll_io(
    cx: &mut Context<'_>,
    tls: &mut Tls,
    reading: bool,
    buf: &mut Vec<u8>,
    out: &mut Outgoing,
) -> Poll<Io> {
    if out.deadline.is_some() {
        while out.done < out.bytes.len() {
            match Pin::new(&mut *tls).poll_write(cx, &out.bytes[out.done..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Io::WriteFailed),
                Poll::Ready(Ok(n)) => out.done += n,
                Poll::Pending => break,
            }
        }
        if out.done == out.bytes.len() {
            match Pin::new(&mut *tls).poll_flush(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Io::Written),
                Poll::Ready(Err(_)) => return Poll::Ready(Io::WriteFailed),
                Poll::Pending => {}
            }
        }
    }
    if reading {
        let mut chunk = [0u8; CHUNK];
        let mut read = ReadBuf::new(&mut chunk);
        match Pin::new(&mut *tls).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Io::Closed),
            Poll::Ready(Ok(())) => {
                buf.extend_from_slice(read.filled());
                return Poll::Ready(Io::Read);
            }
            Poll::Ready(Err(_)) => return Poll::Ready(Io::Closed),
            Poll::Pending => {}
        }
    }
    Poll::Pending
}

/// Serves one TCP connection; holds its connection slot and the endpoint's task count.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
    _running: mpsc::Sender<()>,
) {
    let _ = tcp.set_nodelay(true);
    let mut stop = shared.shutdown.subscribe();
    // Boxed: its state (the TLS handshake, the CONNECT read) is freed once it is done, not
    // kept in the connection task's future for the connection's whole life.
    let handshake = tokio::select! {
        h = Box::pin(handshake(&shared, acceptor, tcp, peer)) => h,
        _ = stop.wait_for(|s| *s) => None,
    };
    let Some((tls, buf, agent, connect)) = handshake else {
        return;
    };
    let Ok(orders_topic) = TopicName::new(topic::orders(&agent)) else {
        return;
    };
    let cfg = &shared.config;
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (close_tx, close_rx) = watch::channel(None);
    let unacked = cfg.max_unacked_orders.max(1);
    let (order_tx, order_rx) = mpsc::channel(unacked);
    {
        let mut registry = shared.registry();
        let old = registry.insert(
            agent,
            Registered {
                conn: conn_id,
                close: close_tx,
                orders: order_tx,
                order_window: Arc::new(Semaphore::new(unacked)),
            },
        );
        if let Some(old) = old {
            old.close.send_replace(Some(CloseReason::Replaced));
        }
        // Under the lock: presence reaches the writer in registration order.
        let _ = shared.control.send(Control::State(agent, true));
    }
    shared.counters.sessions.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, %agent, conn_id, "agent connected");

    let mut session = Session {
        shared: shared.clone(),
        agent,
        peer,
        orders_topic,
        buf,
        out: Vec::new(),
        acks: VecDeque::new(),
        next_seq: 0,
        orders: HashMap::new(),
        next_order_id: 1,
    };
    let (mut tls, mut close_rx, mut order_rx) = (tls, close_rx, order_rx);
    let accepted = Packet::ConnAck {
        session_present: false,
        code: ConnectReturn::Accepted,
    };
    write_now(&mut tls, &accepted, cfg.max_packet, cfg.write_timeout).await;
    let keep_alive = (connect.keep_alive > 0)
        .then(|| Duration::from_secs(connect.keep_alive.into()).mul_f32(1.5));
    let end = session
        .run(tls, keep_alive, &mut close_rx, &mut order_rx, &mut stop)
        .await;

    match &end {
        End::Violation(event) => shared.violation(event.clone()).await,
        End::Kicked => {
            shared
                .violation(SecurityEvent::Kicked { agent, peer })
                .await
        }
        _ => {}
    }
    let will = !matches!(end, End::Disconnected | End::Replaced);
    {
        let mut registry = shared.registry();
        if registry.get(&agent).is_some_and(|r| r.conn == conn_id) {
            registry.remove(&agent);
            if will && let Some(w) = connect.will {
                let _ = shared.control.send(Control::Will(Inbound {
                    agent,
                    channel: Channel::State,
                    payload: w.payload,
                }));
            }
            let _ = shared.control.send(Control::State(agent, false));
        }
    }
    tracing::debug!(%peer, %agent, conn_id, "agent connection closed");
    // Dropping the session fails the orders still waiting for a PUBACK (OrderError::Closed).
}

struct Session {
    shared: Arc<Shared>,
    agent: AgentId,
    peer: SocketAddr,
    orders_topic: TopicName,
    buf: Vec<u8>,
    /// Bytes to write, not yet handed to the writer task.
    out: Vec<u8>,
    /// Messages waiting for their commit, in order: sequence number and packet id (QoS 1).
    acks: VecDeque<(u64, Option<u16>)>,
    next_seq: u64,
    /// Orders sent and waiting for the agent's PUBACK.
    orders: HashMap<
        u16,
        (
            oneshot::Sender<Result<(), OrderError>>,
            OwnedSemaphorePermit,
        ),
    >,
    next_order_id: u16,
}

impl Session {
    async fn run(
        &mut self,
        mut tls: Tls,
        keep_alive: Option<Duration>,
        close_rx: &mut watch::Receiver<Option<CloseReason>>,
        order_rx: &mut mpsc::Receiver<Box<super::Order>>,
        stop: &mut watch::Receiver<bool>,
    ) -> End {
        let cfg = self.shared.config.clone();
        let window = cfg.max_in_flight.max(1);
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(u64, CommitResult)>();
        let mut sending = Outgoing::default();
        let mut last_heard = Instant::now();
        let mut draining: Option<Instant> = None;
        let far = Duration::from_secs(86_400);

        // Every pass waits for an event (bytes, an answer, an order, a timer), and every
        // timer ends the loop, so it ends.
        let end = 'conn: loop {
            // What is already buffered, while the window has room.
            while draining.is_none() && self.acks.len() < window {
                match Packet::decode(&self.buf, cfg.max_packet) {
                    Ok((packet, used)) => {
                        self.buf.drain(..used);
                        if let Some(end) = self.handle(packet, &ack_tx).await {
                            break 'conn end;
                        }
                    }
                    Err(PacketError::Incomplete { .. }) => break,
                    Err(e) => {
                        break 'conn End::Violation(packet_event(&e, Some(self.agent), self.peer));
                    }
                }
            }
            if self.buf.is_empty() && self.buf.capacity() > 0 {
                // Nothing partial: an idle connection holds no read buffer.
                self.buf = Vec::new();
            }
            if draining.is_some()
                && self.acks.is_empty()
                && self.out.is_empty()
                && sending.deadline.is_none()
            {
                break End::Shutdown;
            }
            if sending.deadline.is_none() && !self.out.is_empty() {
                sending = Outgoing {
                    bytes: std::mem::take(&mut self.out),
                    done: 0,
                    deadline: Some(Instant::now() + cfg.write_timeout),
                };
            }
            // What waits behind the write in flight: an agent that does not read.
            if self.out.len() > cfg.max_outgoing_bytes {
                break End::WriteFailed;
            }
            let reading = draining.is_none() && self.acks.len() < window;
            let writing = sending.deadline.is_some();
            let keep_alive_at = last_heard + keep_alive.unwrap_or(far);
            let drain_at = draining.unwrap_or_else(|| Instant::now() + far);
            let write_by = sending.deadline.unwrap_or_else(|| Instant::now() + far);
            let buf = &mut self.buf;
            tokio::select! {
                biased;
                changed = close_rx.changed() => {
                    match (changed, *close_rx.borrow()) {
                        (Ok(()), Some(CloseReason::Kicked)) => break End::Kicked,
                        (Ok(()), None) => {}
                        _ => break End::Replaced,
                    }
                }
                Some((seq, result)) = ack_rx.recv() => {
                    let Some((expected, packet_id)) = self.acks.pop_front() else {
                        break End::CommitFailed;
                    };
                    if expected != seq || result.is_err() {
                        break End::CommitFailed;
                    }
                    if let Some(id) = packet_id {
                        let _ = Packet::PubAck(id).encode(&mut self.out, cfg.max_packet);
                    }
                }
                Some(order) = order_rx.recv(), if draining.is_none() => self.send_order(*order),
                _ = stop.wait_for(|s| *s), if draining.is_none() => {
                    draining = Some(Instant::now() + cfg.shutdown_grace);
                }
                _ = tokio::time::sleep_until(drain_at), if draining.is_some() => break End::Shutdown,
                _ = tokio::time::sleep_until(write_by), if writing => break End::WriteFailed,
                io = std::future::poll_fn(|cx| poll_io(cx, &mut tls, reading, buf, &mut sending)),
                    if reading || writing => match io {
                    Io::Read => last_heard = Instant::now(),
                    Io::Closed => break End::Lost,
                    // Sent: nothing is kept for the next write.
                    Io::Written => sending = Outgoing::default(),
                    Io::WriteFailed => break End::WriteFailed,
                },
                _ = tokio::time::sleep_until(keep_alive_at), if reading && keep_alive.is_some() => {
                    break End::KeepAlive;
                }
            }
        };

        if matches!(end, End::Shutdown | End::Disconnected) {
            // The last PUBACKs, then a TLS close_notify, bounded as the writer task's were.
            let rest = std::mem::take(&mut self.out);
            let _ = tokio::time::timeout(cfg.write_timeout * 2, async {
                tls.write_all(&sending.bytes[sending.done..]).await?;
                tls.write_all(&rest).await?;
                tls.flush().await?;
                tls.shutdown().await
            })
            .await;
        }
        // Otherwise nothing more goes out: in particular no PUBACK after a violation.
        end
    }

    /// Handles one packet from the agent; `Some` ends the connection.
    async fn handle(
        &mut self,
        packet: Packet,
        ack_tx: &mpsc::UnboundedSender<(u64, CommitResult)>,
    ) -> Option<End> {
        let max = self.shared.config.max_packet;
        match packet {
            Packet::Publish(p) => self.publish(p, ack_tx).await,
            Packet::PubAck(id) => {
                // The permit goes with the entry: a place in the agent's order window opens.
                if let Some((done, _permit)) = self.orders.remove(&id) {
                    let _ = done.send(Ok(()));
                }
                None
            }
            Packet::Subscribe(id, filters) => {
                let own = self.orders_topic.as_str();
                if let Some((bad, _)) = filters.iter().find(|(f, _)| f.as_str() != own) {
                    return Some(End::Violation(SecurityEvent::SubscribeOutsideOrders {
                        agent: self.agent,
                        filter: bad.as_str().to_owned(),
                        peer: self.peer,
                    }));
                }
                let granted = filters.iter().map(|(_, q)| Some(*q)).collect();
                let _ = Packet::SubAck(id, granted).encode(&mut self.out, max);
                None
            }
            Packet::Unsubscribe(id, _) => {
                let _ = Packet::UnsubAck(id).encode(&mut self.out, max);
                None
            }
            Packet::PingReq => {
                let _ = Packet::PingResp.encode(&mut self.out, max);
                None
            }
            Packet::Disconnect => Some(End::Disconnected),
            other @ (Packet::Connect(_)
            | Packet::ConnAck { .. }
            | Packet::SubAck(..)
            | Packet::UnsubAck(_)
            | Packet::PingResp) => Some(End::Violation(SecurityEvent::MalformedPacket {
                agent: Some(self.agent),
                peer: self.peer,
                detail: format!("{} from a client after CONNECT", packet_name(&other)),
            })),
        }
    }

    async fn publish(
        &mut self,
        p: Publish,
        ack_tx: &mpsc::UnboundedSender<(u64, CommitResult)>,
    ) -> Option<End> {
        let channel = match topic::parse(p.topic.as_str()) {
            Some((agent, channel)) if agent == self.agent && channel != Channel::Orders => channel,
            _ => {
                return Some(End::Violation(SecurityEvent::PublishOutsidePrefix {
                    agent: self.agent,
                    topic: p.topic.as_str().to_owned(),
                    peer: self.peer,
                }));
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let pending = Pending {
            inbound: Inbound {
                agent: self.agent,
                channel,
                payload: p.payload,
            },
            seq,
            reply: ack_tx.clone(),
        };
        if self.shared.data.send(pending).await.is_err() {
            // The writer has stopped: nothing can be committed any more.
            return Some(End::CommitFailed);
        }
        // QoS 0 takes a place in the window too, and is answered without a PUBACK.
        let packet_id = match p.qos {
            QoS::AtLeastOnce => p.packet_id,
            QoS::AtMostOnce => None,
        };
        self.acks.push_back((seq, packet_id));
        None
    }

    fn send_order(&mut self, order: super::Order) {
        let Some(id) = self.free_order_id() else {
            let _ = order.done.send(Err(OrderError::Closed));
            return;
        };
        let publish = Packet::Publish(Publish {
            topic: self.orders_topic.clone(),
            qos: QoS::AtLeastOnce,
            packet_id: Some(id),
            retain: false,
            dup: false,
            payload: order.payload,
        });
        match publish.encode(&mut self.out, self.shared.config.max_packet) {
            Ok(()) => {
                self.orders.insert(id, (order.done, order.permit));
            }
            Err(e) => {
                let _ = order.done.send(Err(OrderError::Unsendable(e)));
            }
        }
    }

    /// A packet id not used by an order in flight (at most `max_unacked_orders` are).
    fn free_order_id(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            let id = self.next_order_id;
            self.next_order_id = self.next_order_id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.orders.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }
}

//! The in-memory transports behave like the real ones the agent will meet.

use std::time::Duration;

use bytes::Bytes;
use epmc_transport::memory::{MemoryOrders, ScriptedProjector, memory_uplink};
use epmc_transport::outbox::{Limits, Outbox};
use epmc_transport::{
    InboundMessage, LinkError, MessageId, OrderSource, OutboundMessage, Priority, ProjectorLink,
    TransportError, Uplink,
};

fn msg(n: u8) -> OutboundMessage {
    OutboundMessage {
        id: MessageId::from_bytes([n; 16]),
        topic: "epmc/v1/agents/x/telemetry".into(),
        payload: Bytes::from(vec![n]),
        priority: Priority::Routine,
    }
}

#[tokio::test]
async fn outbox_drains_through_an_uplink_only_on_ack() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = Outbox::open(dir.path(), Limits::default()).unwrap();
    for n in 0..5 {
        outbox.push(msg(n)).unwrap();
    }
    let (uplink, mut server) = memory_uplink(8);
    let uplink: std::sync::Arc<dyn Uplink> = std::sync::Arc::new(uplink);
    // The server acknowledges the first three, then "loses" the fourth PUBACK.
    let srv = tokio::spawn(async move {
        let mut got = Vec::new();
        for i in 0..4 {
            let d = server.recv().await.unwrap();
            got.push(d.message.payload[0]);
            if i < 3 {
                d.ack();
            }
        }
        got
    });
    for held in outbox.batch(0, 10) {
        match uplink.publish(&held.message).await {
            Ok(()) => {
                outbox.ack(held.seq).unwrap();
            }
            Err(TransportError::Closed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(srv.await.unwrap(), vec![0, 1, 2, 3]);
    // Unacknowledged messages stay, in order, for the next connection.
    let left: Vec<u8> = outbox.pending().map(|h| h.message.payload[0]).collect();
    assert_eq!(left, vec![3, 4]);
}

#[tokio::test]
async fn disconnected_uplink_is_unavailable() {
    let (uplink, server) = memory_uplink(1);
    server.set_connected(false);
    assert!(!uplink.is_connected());
    assert!(matches!(
        uplink.publish(&msg(1)).await,
        Err(TransportError::Unavailable)
    ));
}

fn order(payload: &'static [u8]) -> InboundMessage {
    InboundMessage {
        topic: "o".into(),
        payload: Bytes::from_static(payload),
    }
}

#[tokio::test]
async fn orders_arrive_in_order_and_close() {
    let orders = MemoryOrders::default();
    let source: &dyn OrderSource = &orders;
    orders.send(order(b"1"));
    orders.send(order(b"2"));
    let first = source.next_order().await.unwrap();
    assert_eq!(&first.message.payload[..], b"1");
    assert!(!first.redelivered());
    let second = source.next_order().await.unwrap();
    assert_eq!(&second.message.payload[..], b"2");
    second.ack();
    first.ack();
    assert_eq!(orders.acked(), vec![order(b"2"), order(b"1")]);
    orders.close();
    assert!(matches!(
        source.next_order().await,
        Err(TransportError::Closed)
    ));
}

/// Only `ack` acknowledges; what was handed over and not acknowledged (held or dropped) comes
/// again, first and marked, after a reconnection; an `ack` from before it is a no-op.
#[tokio::test]
async fn orders_are_acknowledged_only_by_ack_and_redelivered_after_a_reconnection() {
    let orders = MemoryOrders::default();
    let source: &dyn OrderSource = &orders;
    for p in [&b"1"[..], b"2", b"3", b"4"] {
        orders.send(InboundMessage {
            topic: "o".into(),
            payload: Bytes::from_static(p),
        });
    }
    let one = source.next_order().await.unwrap();
    let two = source.next_order().await.unwrap();
    drop(source.next_order().await.unwrap()); // 3: dropped without ack
    one.ack();
    assert_eq!(orders.acked(), vec![order(b"1")]);
    assert_eq!(orders.unacked(), vec![order(b"2"), order(b"3")]);
    orders.reconnect();
    two.ack(); // from before the reconnection: nothing
    assert_eq!(orders.acked(), vec![order(b"1")]);
    for expected in [&b"2"[..], b"3"] {
        let again = source.next_order().await.unwrap();
        assert_eq!(&again.message.payload[..], expected);
        assert!(again.redelivered());
        again.ack();
    }
    let four = source.next_order().await.unwrap();
    assert_eq!(&four.message.payload[..], b"4");
    assert!(!four.redelivered());
    assert_eq!(orders.acked(), vec![order(b"1"), order(b"2"), order(b"3")]);
    assert_eq!(orders.unacked(), vec![order(b"4")]);
}

#[tokio::test(start_paused = true)]
async fn scripted_projector_answers_refuses_and_times_out() {
    let p = ScriptedProjector::default();
    p.on("PWR?", "01").on("SOURCE 70", "ERR").on("PWR ON", "");
    let link: &dyn ProjectorLink = &p;
    assert_eq!(
        link.execute("PWR?", Duration::from_secs(3)).await.unwrap(),
        "01"
    );
    assert!(matches!(
        link.execute("SOURCE 70", Duration::from_secs(5)).await,
        Err(LinkError::Refused)
    ));
    assert!(matches!(
        link.execute("LAMP?", Duration::from_secs(3)).await,
        Err(LinkError::TimedOut(d)) if d == Duration::from_secs(3)
    ));
    assert!(matches!(
        link.execute("PWR?\rPWR OFF", Duration::from_secs(3)).await,
        Err(LinkError::BadCommand(_))
    ));
    p.push_event("0001 03 00000000 00000000 T1 F1");
    assert_eq!(
        link.next_event().await.unwrap(),
        "0001 03 00000000 00000000 T1 F1"
    );
    assert_eq!(p.executed(), vec!["PWR?", "SOURCE 70", "LAMP?"]);
}

mod forwarding {
    use super::*;
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use epmc_transport::forward::{ForwardError, Forwarder};

    fn outbox_with(n: u8) -> (tempfile::TempDir, Arc<Mutex<Outbox>>) {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), Limits::default()).unwrap();
        for i in 0..n {
            outbox.push(msg(i)).unwrap();
        }
        (dir, Arc::new(Mutex::new(outbox)))
    }

    fn left(outbox: &Mutex<Outbox>) -> Vec<u8> {
        outbox
            .lock()
            .unwrap()
            .pending()
            .map(|h| h.message.payload[0])
            .collect()
    }

    #[tokio::test]
    async fn drains_in_order_and_keeps_what_was_not_acknowledged() {
        let (_dir, outbox) = outbox_with(10);
        let (uplink, mut server) = memory_uplink(16);
        let forwarder = Forwarder::new(outbox.clone(), Arc::new(uplink)).with_window(4);
        // The server acknowledges six, then loses the seventh PUBACK.
        let srv = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(d) = server.recv().await {
                got.push(d.message.payload[0]);
                if got.len() <= 6 {
                    d.ack();
                } else {
                    return got;
                }
            }
            got
        });
        let err = forwarder.drain().await.unwrap_err();
        assert!(
            matches!(err, ForwardError::Uplink(TransportError::Closed)),
            "{err}"
        );
        assert_eq!(srv.await.unwrap(), vec![0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(left(&outbox), vec![6, 7, 8, 9]);
        let stats = forwarder.stats();
        assert_eq!((stats.sent, stats.stalls, stats.rejected), (6, 1, 0));
    }

    #[tokio::test]
    async fn a_disconnected_uplink_leaves_everything_in_place() {
        let (_dir, outbox) = outbox_with(3);
        let (uplink, server) = memory_uplink(4);
        server.set_connected(false);
        let forwarder = Forwarder::new(outbox.clone(), Arc::new(uplink));
        let err = forwarder.drain().await.unwrap_err();
        assert!(
            matches!(err, ForwardError::Uplink(TransportError::Unavailable)),
            "{err}"
        );
        assert_eq!(left(&outbox), vec![0, 1, 2]);
    }

    /// An uplink that can never send messages on the topic `poison`, and acknowledges the rest.
    struct Picky(Mutex<Vec<u8>>);

    #[async_trait]
    impl Uplink for Picky {
        async fn publish(&self, m: &OutboundMessage) -> Result<(), TransportError> {
            if m.topic == "poison" {
                return Err(TransportError::BadInput("too large".into()));
            }
            self.0.lock().unwrap().push(m.payload[0]);
            Ok(())
        }
        fn is_connected(&self) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn a_message_that_can_never_be_sent_does_not_block_the_rest() {
        let (_dir, outbox) = outbox_with(2);
        let mut poison = msg(9);
        poison.topic = "poison".into();
        poison.id = MessageId::from_bytes([0xEE; 16]);
        outbox.lock().unwrap().push(poison).unwrap();
        outbox.lock().unwrap().push(msg(3)).unwrap();
        let uplink = Arc::new(Picky(Mutex::new(Vec::new())));
        let forwarder = Forwarder::new(outbox.clone(), uplink.clone());
        assert_eq!(forwarder.drain().await.unwrap(), 3);
        assert_eq!(*uplink.0.lock().unwrap(), vec![0, 1, 3]);
        assert!(outbox.lock().unwrap().is_empty());
        assert_eq!(forwarder.stats().rejected, 1);
    }

    #[tokio::test]
    async fn run_sends_new_messages_when_woken_and_stops_on_shutdown() {
        let (_dir, outbox) = outbox_with(0);
        let uplink = Arc::new(Picky(Mutex::new(Vec::new())));
        let forwarder = Arc::new(Forwarder::new(outbox.clone(), uplink.clone()));
        let wake = forwarder.waker();
        // A retry interval of an hour: only the waker can make it send promptly.
        let running = forwarder.spawn(Duration::from_secs(3600));
        tokio::time::sleep(Duration::from_millis(20)).await;
        outbox.lock().unwrap().push(msg(42)).unwrap();
        wake.notify_one();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !outbox.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("sent after the wake-up");
        assert_eq!(*uplink.0.lock().unwrap(), vec![42]);
        tokio::time::timeout(Duration::from_secs(10), running.stop())
            .await
            .expect("stops on shutdown");
    }
}

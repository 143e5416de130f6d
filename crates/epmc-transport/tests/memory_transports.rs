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

#[tokio::test]
async fn orders_arrive_in_order_and_close() {
    let orders = MemoryOrders::default();
    let source: &dyn OrderSource = &orders;
    orders.send(InboundMessage {
        topic: "o".into(),
        payload: Bytes::from_static(b"1"),
    });
    orders.send(InboundMessage {
        topic: "o".into(),
        payload: Bytes::from_static(b"2"),
    });
    assert_eq!(&source.next_order().await.unwrap().payload[..], b"1");
    assert_eq!(&source.next_order().await.unwrap().payload[..], b"2");
    orders.close();
    assert!(matches!(
        source.next_order().await,
        Err(TransportError::Closed)
    ));
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

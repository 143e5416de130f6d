//! The server's background tasks and what they query: retention (`serve --retention-days`)
//! prunes old history and events periodically; order dispatch looks only at agents with
//! queued orders; in scale mode one replica at a time holds the dispatch lease (PostgreSQL
//! advisory lock, when `EPMC_TEST_POSTGRES_URL` is set).

mod pg;

use std::time::{Duration, Instant};

use epmc_proto::bounded::Timestamp;
use epmc_proto::model::{DeviceEvent, DeviceEventKind, PowerState};
use epmc_proto::order::OrderAction;
use epmc_proto::topic::{AgentId, Channel};
use epmc_proto::{Envelope, Message};
use epmc_server::datadir;
use epmc_server::server::{ServeConfig, Server};
use epmc_server::store::{IngestItem, IngestOutcome, OrderTarget, QueuedAgent, Store};

fn event(at: i64) -> Vec<u8> {
    Envelope::new(Message::Event(DeviceEvent {
        device_id: "X8JK0000042".try_into().unwrap(),
        at: Timestamp::from_unix(at).unwrap(),
        event: DeviceEventKind::StatusChange {
            power: Some(PowerState::On),
            warnings: Default::default(),
            alarms: Default::default(),
        },
    }))
    .to_json()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_old_events_periodically() {
    let dir = tempfile::tempdir().unwrap();
    datadir::init(dir.path(), &[]).unwrap();
    let mut config = ServeConfig::new(dir.path());
    config.mqtt = "127.0.0.1:0".parse().unwrap();
    config.https = "127.0.0.1:0".parse().unwrap();
    config.retention = Some(Duration::from_secs(2 * 86_400));
    config.prune_every = Duration::from_secs(1);
    let server = Server::start(config).await.unwrap();
    let store = server.store().clone();
    let tenant = store.admin().add_tenant("acme").await.unwrap();
    let agent = store.admin().create_agent(tenant, "a").await.unwrap();
    let now = Timestamp::now().unix();
    // Three days old, one day old, now: after the next prune only the last two remain.
    let items: Vec<IngestItem> = [now - 3 * 86_400, now - 86_400, now]
        .into_iter()
        .map(|at| IngestItem::new(agent, Channel::Events, event(at)))
        .collect();
    let outcomes = store.ingest().ingest_batch(&items).await.unwrap();
    assert!(
        outcomes.iter().all(|o| *o == IngestOutcome::Stored),
        "{outcomes:?}"
    );
    let device = store.admin().devices().await.unwrap()[0].id;
    let deadline = Instant::now() + Duration::from_secs(15);
    let remaining = loop {
        let events = store.tenant(tenant).events(device, 100).await.unwrap();
        if events.len() < 3 || Instant::now() >= deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut ats: Vec<i64> = remaining.iter().map(|e| e.at.unix()).collect();
    ats.sort();
    assert_eq!(
        ats,
        vec![now - 86_400, now],
        "the 3-day-old event was pruned"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn without_retention_nothing_is_pruned() {
    let dir = tempfile::tempdir().unwrap();
    datadir::init(dir.path(), &[]).unwrap();
    let mut config = ServeConfig::new(dir.path());
    config.mqtt = "127.0.0.1:0".parse().unwrap();
    config.https = "127.0.0.1:0".parse().unwrap();
    config.prune_every = Duration::from_secs(1);
    let server = Server::start(config).await.unwrap();
    let store = server.store().clone();
    let tenant = store.admin().add_tenant("acme").await.unwrap();
    let agent = store.admin().create_agent(tenant, "a").await.unwrap();
    let old = Timestamp::now().unix() - 3650 * 86_400;
    store
        .ingest()
        .ingest_batch(&[IngestItem::new(agent, Channel::Events, event(old))])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let device = store.admin().devices().await.unwrap()[0].id;
    assert_eq!(
        store.tenant(tenant).events(device, 10).await.unwrap().len(),
        1
    );
    server.shutdown().await;
}

async fn queue(store: &Store, agent: AgentId, expires_in: i64) {
    store
        .orders()
        .create(
            OrderTarget::Agent(agent),
            &OrderAction::CollectNow,
            "operator",
            Timestamp::from_unix(Timestamp::now().unix() + expires_in).unwrap(),
        )
        .await
        .unwrap();
}

async fn agents_with_queued_orders(store: Store) {
    let tenant = store.admin().add_tenant("acme").await.unwrap();
    let mut agents = Vec::new();
    for i in 0..4 {
        agents.push(
            store
                .admin()
                .create_agent(tenant, &format!("a{i}"))
                .await
                .unwrap(),
        );
    }
    let orders = store.orders();
    assert_eq!(
        orders.agents_with_queued(Timestamp::now()).await.unwrap(),
        vec![]
    );
    // a1: two queued orders; a2: one, and it has connected once; a3: one that expires.
    queue(&store, agents[1], 600).await;
    queue(&store, agents[2], 600).await;
    queue(&store, agents[1], 600).await;
    queue(&store, agents[3], 3).await;
    store
        .ingest()
        .set_online(agents[2], Timestamp::now())
        .await
        .unwrap();
    let now = Timestamp::now();
    assert_eq!(
        orders.agents_with_queued(now).await.unwrap(),
        vec![
            QueuedAgent {
                agent: agents[1],
                ever_connected: false
            },
            QueuedAgent {
                agent: agents[2],
                ever_connected: true
            },
            QueuedAgent {
                agent: agents[3],
                ever_connected: false
            },
        ],
        "agents with queued orders, oldest order first, each once"
    );
    let later = Timestamp::from_unix(now.unix() + 5).unwrap();
    assert_eq!(
        orders.agents_with_queued(later).await.unwrap().len(),
        2,
        "an expired order does not count"
    );
    // Delivered orders no longer count.
    for o in orders.queued_for_agent(agents[1], now).await.unwrap() {
        assert!(orders.mark_delivered(o.id).await.unwrap());
    }
    let left: Vec<AgentId> = orders
        .agents_with_queued(now)
        .await
        .unwrap()
        .into_iter()
        .map(|q| q.agent)
        .collect();
    assert_eq!(left, vec![agents[2], agents[3]]);
    store.close().await;
}

#[tokio::test]
async fn dispatch_looks_only_at_agents_with_queued_orders_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/epmc.db", dir.path().display()))
        .await
        .unwrap();
    agents_with_queued_orders(store).await;
}

#[tokio::test]
async fn dispatch_looks_only_at_agents_with_queued_orders_postgres() {
    if let Some(url) = pg::schema_url().await {
        agents_with_queued_orders(Store::open(&url).await.unwrap()).await;
    }
}

/// Two replicas (two stores on one database): one lease at a time; dropping it (or the
/// process dying, which closes its connection) lets the other take it.
#[tokio::test]
async fn one_replica_at_a_time_holds_the_dispatch_lease() {
    let Some(url) = pg::schema_url().await else {
        return;
    };
    let a = Store::open(&url).await.unwrap();
    let b = Store::open(&url).await.unwrap();
    let mut lease = a
        .orders()
        .try_dispatch_lease()
        .await
        .unwrap()
        .expect("the first replica takes the lease");
    assert!(lease.is_held().await);
    assert!(
        b.orders().try_dispatch_lease().await.unwrap().is_none(),
        "the second replica does not get it"
    );
    assert!(
        a.orders().try_dispatch_lease().await.unwrap().is_none(),
        "nor a second connection of the first"
    );
    drop(lease);
    let deadline = Instant::now() + Duration::from_secs(10);
    let taken = loop {
        if let Some(l) = b.orders().try_dispatch_lease().await.unwrap() {
            break l;
        }
        assert!(Instant::now() < deadline, "the lease was not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(taken);
    a.close().await;
    b.close().await;
}

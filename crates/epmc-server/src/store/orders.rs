//! Orders: created by operators and tenants, handed to agents, moved through their states.

use epmc_proto::bounded::Timestamp;
use epmc_proto::order::OrderAction;
use epmc_proto::topic::AgentId;
use sqlx::{AnyConnection, Connection, Row};
use uuid::Uuid;

use super::types::{agent_id, tenant_id, ts};
use super::{Backend, OrderRecord, OrderState, OrderTarget, Store, StoreError, TenantId, now_unix};

/// Order dispatch's handle.
#[derive(Clone, Debug)]
pub struct OrdersHandle {
    store: Store,
}

impl OrdersHandle {
    pub(super) fn new(store: Store) -> OrdersHandle {
        OrdersHandle { store }
    }

    /// Creates a queued order for any tenant's device or agent; returns its id.
    pub async fn create(
        &self,
        target: OrderTarget,
        action: &OrderAction,
        issued_by: &str,
        expires_at: Timestamp,
    ) -> Result<Uuid, StoreError> {
        create(&self.store, None, target, action, issued_by, expires_at).await
    }

    /// One order.
    pub async fn get(&self, order: Uuid) -> Result<OrderRecord, StoreError> {
        get(&self.store, None, order).await
    }

    /// The agent's queued orders that have not expired at `now`, oldest first.
    pub async fn queued_for_agent(
        &self,
        agent: AgentId,
        now: Timestamp,
    ) -> Result<Vec<OrderRecord>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{ORDER_SELECT} WHERE o.agent_id = $1 AND o.state = 'queued' AND o.expires_at > $2 \
             ORDER BY o.seq"
        )))
        .bind(agent.to_string())
        .bind(now.unix())
        .fetch_all(self.store.pool())
        .await?;
        rows.iter().map(record).collect()
    }

    /// The agents that have queued orders not expired at `now` (what dispatch looks at,
    /// instead of every agent), each with whether it has ever connected (an agent that never
    /// did has no session at a broker to queue its orders in).
    pub async fn agents_with_queued(&self, now: Timestamp) -> Result<Vec<QueuedAgent>, StoreError> {
        let rows = sqlx::query(
            "SELECT o.agent_id, CAST(CASE WHEN MAX(a.last_seen) IS NULL THEN 0 ELSE 1 END AS BIGINT) \
             FROM orders o JOIN agents a ON a.id = o.agent_id \
             WHERE o.state = 'queued' AND o.expires_at > $1 \
             GROUP BY o.agent_id ORDER BY MIN(o.seq)",
        )
        .bind(now.unix())
        .fetch_all(self.store.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(QueuedAgent {
                    agent: agent_id(&r.try_get::<String, _>(0)?)?,
                    ever_connected: r.try_get::<i64, _>(1)? != 0,
                })
            })
            .collect()
    }

    /// Tries to become the one replica that dispatches orders. On PostgreSQL this is a
    /// session advisory lock (keyed by the schema) held by a connection of its own: `Ok(None)` while another
    /// replica holds it; it is released when the [`DispatchLease`] is dropped or its
    /// connection (or process) dies, so another replica takes over at its next try. On SQLite
    /// (one machine) the lease is always granted.
    pub async fn try_dispatch_lease(&self) -> Result<Option<DispatchLease>, StoreError> {
        if self.store.backend() != Backend::Postgres {
            return Ok(Some(DispatchLease { conn: None }));
        }
        let mut conn = self.store.pool().acquire().await?.detach();
        // Advisory locks are per database: the schema is part of the key, so deployments in
        // two schemas of one database do not share the lease.
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT CAST(CASE WHEN pg_try_advisory_lock({DISPATCH_LOCK}, hashtext(current_schema())) \
             THEN 1 ELSE 0 END AS BIGINT)"
        )))
        .fetch_one(&mut conn)
        .await?;
        if row.try_get::<i64, _>(0)? == 1 {
            Ok(Some(DispatchLease { conn: Some(conn) }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// The order was handed to the agent's connection.
    pub async fn mark_delivered(&self, order: Uuid) -> Result<bool, StoreError> {
        self.transition(order, OrderState::Delivered, None).await
    }

    /// Puts a delivered order back in the queue (a replica claimed it for the broker, then
    /// could not publish it). `Ok(false)` when it is no longer delivered: the one move back,
    /// and only from `delivered`, so it never undoes the agent's answer.
    pub async fn requeue(&self, order: Uuid) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE orders SET state = 'queued', updated_at = $2 \
             WHERE id = $1 AND state = 'delivered'",
        )
        .bind(order.to_string())
        .bind(now_unix())
        .execute(self.store.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The agent recorded the order.
    pub async fn mark_accepted(&self, order: Uuid) -> Result<bool, StoreError> {
        self.transition(order, OrderState::Accepted, None).await
    }

    /// The order was carried out.
    pub async fn mark_done(
        &self,
        order: Uuid,
        result: Option<serde_json::Value>,
    ) -> Result<bool, StoreError> {
        self.transition(order, OrderState::Done, result).await
    }

    /// The order failed.
    pub async fn mark_failed(
        &self,
        order: Uuid,
        result: Option<serde_json::Value>,
    ) -> Result<bool, StoreError> {
        self.transition(order, OrderState::Failed, result).await
    }

    /// Moves an order to `to` when its current state allows ([`OrderState::may_become`]);
    /// `Ok(false)` when it does not, [`StoreError::NotFound`] for an unknown order. One
    /// conditional statement ([`advance`]), so it holds against other replicas too.
    pub async fn transition(
        &self,
        order: Uuid,
        to: OrderState,
        result: Option<serde_json::Value>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.store.pool().acquire().await?;
        let result = result.map(|v| v.to_string());
        if advance(&mut conn, order, None, to, result, now_unix()).await? {
            return Ok(true);
        }
        sqlx::query("SELECT state FROM orders WHERE id = $1")
            .bind(order.to_string())
            .fetch_optional(&mut *conn)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(false)
    }

    /// Expires overdue orders at `now`: queued or delivered ones become `expired`, accepted
    /// ones without a result `timed_out`. Returns how many of each.
    pub async fn expire_overdue(&self, now: Timestamp) -> Result<(u64, u64), StoreError> {
        let mut tx = self.store.begin_write().await?;
        let expired = sqlx::query(
            "UPDATE orders SET state = 'expired', updated_at = $1 \
             WHERE state IN ('queued', 'delivered') AND expires_at <= $1",
        )
        .bind(now.unix())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let timed_out = sqlx::query(
            "UPDATE orders SET state = 'timed_out', updated_at = $1 \
             WHERE state = 'accepted' AND expires_at <= $1",
        )
        .bind(now.unix())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok((expired, timed_out))
    }
}

/// The first key of order dispatch's PostgreSQL advisory lock (`pg_try_advisory_lock(int,
/// int)`, the second is the schema's hash): "EPMC".
const DISPATCH_LOCK: i32 = 0x4550_4d43;

/// An agent with queued orders ([`OrdersHandle::agents_with_queued`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueuedAgent {
    /// The agent.
    pub agent: AgentId,
    /// Whether it has ever connected.
    pub ever_connected: bool,
}

/// The right to dispatch orders ([`OrdersHandle::try_dispatch_lease`]); dropping it
/// releases it.
#[derive(Debug)]
pub struct DispatchLease {
    /// The connection holding the advisory lock (PostgreSQL only).
    conn: Option<AnyConnection>,
}

impl DispatchLease {
    /// Whether the lease still holds: its connection answers. `false` means it is lost
    /// (drop it and try again).
    pub async fn is_held(&mut self) -> bool {
        match &mut self.conn {
            None => true,
            Some(conn) => conn.ping().await.is_ok(),
        }
    }
}

/// Every order state.
const STATES: [OrderState; 7] = [
    OrderState::Queued,
    OrderState::Delivered,
    OrderState::Accepted,
    OrderState::Done,
    OrderState::Failed,
    OrderState::TimedOut,
    OrderState::Expired,
];

/// Moves an order to `to` from whatever state it is in now, if that state may become `to`
/// ([`OrderState::may_become`]); with `agent`, only that agent's order. `Ok(false)` when it
/// did not move (unknown, or its state does not allow).
///
/// One conditional `UPDATE`, never a read then a write: states only move forward (queued <
/// delivered < accepted < done, failed, timed out) whoever writes first. An agent's result may
/// overtake the dispatcher's `delivered` mark (it is applied to a queued order, and the late
/// mark then changes nothing); on PostgreSQL a writer waiting on the row re-checks the
/// condition against the committed state, so this holds across replicas.
pub(super) async fn advance(
    conn: &mut AnyConnection,
    order: Uuid,
    agent: Option<AgentId>,
    to: OrderState,
    result: Option<String>,
    now: i64,
) -> Result<bool, StoreError> {
    let from: Vec<String> = STATES
        .iter()
        .filter(|s| s.may_become(to))
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    if from.is_empty() {
        return Ok(false);
    }
    // The list holds this module's own constant names only.
    let sql = format!(
        "UPDATE orders SET state = $1, result = COALESCE($2, result), updated_at = $3 \
         WHERE id = $4 AND ($5 = '' OR agent_id = $5) AND state IN ({})",
        from.join(", ")
    );
    let r = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(to.as_str())
        .bind(result)
        .bind(now)
        .bind(order.to_string())
        .bind(agent.map(|a| a.to_string()).unwrap_or_default())
        .execute(&mut *conn)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Creates an order; with `tenant`, only for that tenant's device or agent.
pub(super) async fn create(
    store: &Store,
    tenant: Option<TenantId>,
    target: OrderTarget,
    action: &OrderAction,
    issued_by: &str,
    expires_at: Timestamp,
) -> Result<Uuid, StoreError> {
    if issued_by.is_empty() || issued_by.chars().count() > 64 {
        return Err(StoreError::Invalid(
            "issued_by must be 1 to 64 characters".into(),
        ));
    }
    let message = epmc_proto::order::Order {
        order_id: Uuid::nil(),
        device_id: None,
        action: action.clone(),
        issued_by: issued_by
            .try_into()
            .map_err(|e: epmc_proto::bounded::BoundError| StoreError::Invalid(e.to_string()))?,
        expires_at: Some(expires_at),
    };
    message
        .validate()
        .map_err(|e| StoreError::Invalid(e.into()))?;
    let mut tx = store.begin_write().await?;
    let (owner, agent, device): (String, String, Option<i64>) = match target {
        OrderTarget::Device(d) => {
            let row = sqlx::query("SELECT tenant_id, agent_id FROM devices WHERE id = $1")
                .bind(d)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
            (row.try_get(0)?, row.try_get(1)?, Some(d))
        }
        OrderTarget::Agent(a) => {
            let row = sqlx::query("SELECT tenant_id FROM agents WHERE id = $1")
                .bind(a.to_string())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
            (row.try_get(0)?, a.to_string(), None)
        }
    };
    if tenant.is_some_and(|t| t.to_string() != owner) {
        return Err(StoreError::NotFound);
    }
    let id = Uuid::new_v4();
    let now = now_unix();
    let action_json =
        serde_json::to_string(action).map_err(|e| StoreError::Invalid(e.to_string()))?;
    sqlx::query(
        "INSERT INTO orders (id, tenant_id, agent_id, device_id, action, issued_by, state, \
         created_at, expires_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $7)",
    )
    .bind(id.to_string())
    .bind(owner)
    .bind(agent)
    .bind(device)
    .bind(action_json)
    .bind(issued_by)
    .bind(now)
    .bind(expires_at.unix())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(id)
}

const ORDER_SELECT: &str = "SELECT o.id, o.tenant_id, o.agent_id, o.device_id, \
    COALESCE(d.serial, d.ip_key), o.action, o.issued_by, o.state, o.created_at, o.expires_at, \
    o.updated_at, o.result FROM orders o LEFT JOIN devices d ON d.id = o.device_id";

/// One order; with `tenant`, only that tenant's.
pub(super) async fn get(
    store: &Store,
    tenant: Option<TenantId>,
    order: Uuid,
) -> Result<OrderRecord, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{ORDER_SELECT} WHERE o.id = $1 AND ($2 = '' OR o.tenant_id = $2)"
    )))
    .bind(order.to_string())
    .bind(tenant.map(|t| t.to_string()).unwrap_or_default())
    .fetch_optional(store.pool())
    .await?
    .ok_or(StoreError::NotFound)?;
    record(&row)
}

fn record(r: &sqlx::any::AnyRow) -> Result<OrderRecord, StoreError> {
    let result: Option<String> = r.try_get(11)?;
    Ok(OrderRecord {
        id: super::types::uuid(&r.try_get::<String, _>(0)?)?,
        tenant: tenant_id(&r.try_get::<String, _>(1)?)?,
        agent: agent_id(&r.try_get::<String, _>(2)?)?,
        device: r.try_get(3)?,
        device_key: r.try_get(4)?,
        action: serde_json::from_str(&r.try_get::<String, _>(5)?).map_err(StoreError::corrupt)?,
        issued_by: r.try_get(6)?,
        state: OrderState::parse(&r.try_get::<String, _>(7)?)?,
        created_at: ts(r.try_get(8)?)?,
        expires_at: ts(r.try_get(9)?)?,
        updated_at: ts(r.try_get(10)?)?,
        result: result
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(StoreError::corrupt)?,
    })
}

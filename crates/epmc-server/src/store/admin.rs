//! The operator's handle: tenants, enrollment tokens, agents, certificates, every device,
//! retention, rejected messages and security events.

use epmc_proto::bounded::Timestamp;
use epmc_proto::topic::AgentId;
use sqlx::Row;
use uuid::Uuid;

use super::types::{agent_id, opt_ts, tenant_id, ts};
use super::{
    AgentRecord, AgentState, Backend, DeviceDetails, DeviceSummary, ExceptionRecord, OrdersHandle,
    PruneReport, RejectedMessage, SecurityEvent, Store, StoreError, Tenant, TenantId, devices,
    now_unix,
};

/// A client certificate a server replica issued itself for the broker (scale mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceCertificate {
    /// Its serial, lowercase hex.
    pub serial: String,
    /// The replica's name (the certificate's CN, its client id at the broker).
    pub name: String,
    /// When it was issued.
    pub issued_at: Timestamp,
    /// When it expires.
    pub not_after: Timestamp,
    /// When it was revoked.
    pub revoked_at: Option<Timestamp>,
}

/// Rows [`AdminHandle::prune`] deletes per transaction from the tables that grow with every
/// message.
pub const PRUNE_CHUNK: i64 = 10_000;

/// The admin handle (operator commands on the local command line).
#[derive(Clone, Debug)]
pub struct AdminHandle {
    store: Store,
}

impl AdminHandle {
    pub(super) fn new(store: Store) -> AdminHandle {
        AdminHandle { store }
    }

    /// Adds a tenant; [`StoreError::Conflict`] when the name is taken.
    pub async fn add_tenant(&self, name: &str) -> Result<TenantId, StoreError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 {
            return Err(StoreError::Invalid(
                "a tenant name has 1 to 64 characters".into(),
            ));
        }
        let id = TenantId::new(Uuid::new_v4());
        let r = sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(id.to_string())
            .bind(name)
            .bind(now_unix())
            .execute(self.store.pool())
            .await
            .map_err(StoreError::from);
        match r {
            Ok(_) => Ok(id),
            Err(e) if e.is_unique_violation() => Err(StoreError::Conflict("tenant")),
            Err(e) => Err(e),
        }
    }

    /// Every tenant, by name.
    pub async fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        sqlx::query("SELECT id, name, created_at FROM tenants ORDER BY name")
            .fetch_all(self.store.pool())
            .await?
            .iter()
            .map(|r| {
                Ok(Tenant {
                    id: tenant_id(&r.try_get::<String, _>(0)?)?,
                    name: r.try_get(1)?,
                    created_at: ts(r.try_get(2)?)?,
                })
            })
            .collect()
    }

    /// Records a one-time enrollment token made elsewhere (the CA's token format), by the
    /// lowercase hex SHA-256 of its secret; returns the token's row id.
    pub async fn register_token(
        &self,
        tenant: TenantId,
        expires_at: Timestamp,
        secret_sha256_hex: &str,
    ) -> Result<Uuid, StoreError> {
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, tenant_id, secret_hash, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id.to_string())
        .bind(tenant.to_string())
        .bind(secret_sha256_hex)
        .bind(now_unix())
        .bind(expires_at.unix())
        .execute(self.store.pool())
        .await
        .map_err(|e| foreign_key_to_not_found(e.into()))?;
        Ok(id)
    }

    /// Creates an agent of `tenant` (normally done by enrollment).
    pub async fn create_agent(&self, tenant: TenantId, name: &str) -> Result<AgentId, StoreError> {
        create_agent(&self.store, tenant, name).await
    }

    /// Records a certificate issued to an agent; it becomes the agent's current one.
    pub async fn record_certificate(
        &self,
        agent: AgentId,
        serial: &str,
        not_after: Timestamp,
    ) -> Result<(), StoreError> {
        record_certificate(&self.store, agent, serial, not_after).await
    }

    /// Every agent, or one tenant's.
    pub async fn agents(&self, tenant: Option<TenantId>) -> Result<Vec<AgentRecord>, StoreError> {
        agents(&self.store, tenant).await
    }

    /// Revokes an agent and all its certificates; returns the serials revoked now.
    pub async fn revoke_agent(
        &self,
        agent: AgentId,
        reason: &str,
    ) -> Result<Vec<String>, StoreError> {
        let now = now_unix();
        let mut tx = self.store.begin_write().await?;
        let r = sqlx::query(
            "UPDATE agents SET revoked_at = COALESCE(revoked_at, $2), state = 'offline' WHERE id = $1",
        )
        .bind(agent.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        let serials = sqlx::query(
            "UPDATE certificates SET revoked_at = $2, revocation_reason = $3 \
             WHERE agent_id = $1 AND revoked_at IS NULL RETURNING serial",
        )
        .bind(agent.to_string())
        .bind(now)
        .bind(reason)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<Vec<_>, _>>()?;
        tx.commit().await?;
        Ok(serials)
    }

    /// Records a client certificate a server replica issued itself for the broker (scale
    /// mode), under the replica's name (its CN), so that it can be listed and revoked.
    pub async fn record_service_certificate(
        &self,
        name: &str,
        serial: &str,
        not_after: Timestamp,
    ) -> Result<(), StoreError> {
        if serial.is_empty() || serial.len() > 128 || name.is_empty() || name.len() > 64 {
            return Err(StoreError::Invalid(
                "a serial has 1 to 128 characters, a replica name 1 to 64".into(),
            ));
        }
        sqlx::query(
            "INSERT INTO service_certificates (serial, name, issued_at, not_after) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(serial)
        .bind(name)
        .bind(now_unix())
        .bind(not_after.unix())
        .execute(self.store.pool())
        .await
        .map_err(|e| match StoreError::from(e) {
            e if e.is_unique_violation() => StoreError::Conflict("certificate serial"),
            e => e,
        })?;
        Ok(())
    }

    /// The certificates replicas issued themselves, newest first.
    pub async fn service_certificates(&self) -> Result<Vec<ServiceCertificate>, StoreError> {
        sqlx::query(
            "SELECT serial, name, issued_at, not_after, revoked_at FROM service_certificates \
             ORDER BY issued_at DESC, serial",
        )
        .fetch_all(self.store.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(ServiceCertificate {
                serial: r.try_get(0)?,
                name: r.try_get(1)?,
                issued_at: ts(r.try_get(2)?)?,
                not_after: ts(r.try_get(3)?)?,
                revoked_at: opt_ts(r.try_get(4)?)?,
            })
        })
        .collect()
    }

    /// Revokes every certificate issued so far to the replica `name`; returns the serials
    /// revoked now ([`StoreError::NotFound`] when it never had one). A running replica
    /// issues itself a new certificate (new key) at its next connection to the broker.
    pub async fn revoke_service(
        &self,
        name: &str,
        reason: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.store.begin_write().await?;
        let known: i64 = sqlx::query("SELECT COUNT(*) FROM service_certificates WHERE name = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if known == 0 {
            return Err(StoreError::NotFound);
        }
        let serials = sqlx::query(
            "UPDATE service_certificates SET revoked_at = $2, revocation_reason = $3 \
             WHERE name = $1 AND revoked_at IS NULL RETURNING serial",
        )
        .bind(name)
        .bind(now_unix())
        .bind(reason)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<Vec<_>, _>>()?;
        tx.commit().await?;
        Ok(serials)
    }

    /// Every revoked certificate serial: agents' and replicas'.
    pub async fn revoked_serials(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query(
            "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL \
             UNION SELECT serial FROM service_certificates WHERE revoked_at IS NOT NULL \
             ORDER BY serial",
        )
        .fetch_all(self.store.pool())
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<Vec<_>, _>>()?)
    }

    /// Every device of every tenant, with its latest status and last contact.
    pub async fn devices(&self) -> Result<Vec<DeviceSummary>, StoreError> {
        let mut conn = self.store.pool().acquire().await?;
        devices::list(&mut conn, None).await
    }

    /// An agent's latest exception-log entries, newest first.
    pub async fn exception_logs(
        &self,
        agent: AgentId,
        limit: u32,
    ) -> Result<Vec<ExceptionRecord>, StoreError> {
        sqlx::query(
            "SELECT at, severity, component, message FROM exception_logs WHERE agent_id = $1 \
             ORDER BY at DESC, id DESC LIMIT $2",
        )
        .bind(agent.to_string())
        .bind(i64::from(limit))
        .fetch_all(self.store.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(ExceptionRecord {
                at: ts(r.try_get(0)?)?,
                severity: r.try_get(1)?,
                component: r.try_get(2)?,
                message: r.try_get(3)?,
            })
        })
        .collect()
    }

    /// Any device with its collected info, settings and logs.
    pub async fn device_details(&self, device: i64) -> Result<DeviceDetails, StoreError> {
        let mut conn = self.store.pool().acquire().await?;
        devices::details(&mut conn, None, device)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// Order dispatch, for operator orders.
    pub fn orders(&self) -> OrdersHandle {
        self.store.orders()
    }

    /// Deletes what is older than `older_than`: history series that ended and events that
    /// happened before it, agents' exception-log entries from before it, the records of
    /// message ids received before it (a message repeated after that is stored again),
    /// rejected messages, and replicas' certificates that expired before it (an expired
    /// certificate needs no revocation-list entry either). Orders and security events stay.
    ///
    /// Exception-log entries, message ids and rejected messages go [`PRUNE_CHUNK`] rows per
    /// transaction (found by an index on their time), so that a first prune of a large
    /// database never holds the ingest's commits for long.
    pub async fn prune(&self, older_than: Timestamp) -> Result<PruneReport, StoreError> {
        let cut = older_than.unix();
        let mut tx = self.store.begin_write().await?;
        let history = sqlx::query("DELETE FROM history WHERE end_at < $1")
            .bind(cut)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let events = sqlx::query("DELETE FROM events WHERE at < $1")
            .bind(cut)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let service_certificates =
            sqlx::query("DELETE FROM service_certificates WHERE not_after < $1")
                .bind(cut)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        tx.commit().await?;
        let exception_logs = self.prune_in_chunks("exception_logs", "at", cut).await?;
        let message_ids = self
            .prune_in_chunks("ingested_messages", "received_at", cut)
            .await?;
        let rejected = self.prune_in_chunks("rejected_messages", "at", cut).await?;
        Ok(PruneReport {
            history,
            events,
            exception_logs,
            message_ids,
            rejected,
            service_certificates,
        })
    }

    /// Deletes the rows of `table` whose `time` is before `cut`, [`PRUNE_CHUNK`] per
    /// transaction, until a chunk comes back short; the rows deleted. Each chunk finds its
    /// rows through the index on `time` and deletes them by their physical address (SQLite's
    /// `rowid`, PostgreSQL's `ctid`): with `id IN (subquery)` PostgreSQL chose to hash the
    /// chunk and read the whole table for every chunk (126 ms against 14 ms on 300,000 rows).
    async fn prune_in_chunks(
        &self,
        table: &'static str,
        time: &'static str,
        cut: i64,
    ) -> Result<u64, StoreError> {
        let delete = match self.store.backend() {
            Backend::Sqlite => format!(
                "DELETE FROM {table} WHERE rowid IN \
                 (SELECT rowid FROM {table} WHERE {time} < $1 LIMIT $2)"
            ),
            Backend::Postgres => format!(
                "DELETE FROM {table} WHERE ctid = ANY \
                 (ARRAY(SELECT ctid FROM {table} WHERE {time} < $1 LIMIT $2))"
            ),
        };
        let mut total = 0;
        loop {
            let mut tx = self.store.begin_write().await?;
            let n = sqlx::query(sqlx::AssertSqlSafe(delete.as_str()))
                .bind(cut)
                .bind(PRUNE_CHUNK)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            total += n;
            if n < PRUNE_CHUNK.unsigned_abs() {
                return Ok(total);
            }
        }
    }

    /// How many messages were rejected.
    pub async fn rejected_count(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM rejected_messages")
            .fetch_one(self.store.pool())
            .await?
            .try_get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The latest rejected messages, newest first.
    pub async fn rejected_messages(&self, limit: u32) -> Result<Vec<RejectedMessage>, StoreError> {
        sqlx::query(
            "SELECT at, agent_id, topic, reason, raw, raw_len FROM rejected_messages \
             ORDER BY id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(self.store.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(RejectedMessage {
                at: ts(r.try_get(0)?)?,
                agent: r.try_get(1)?,
                topic: r.try_get(2)?,
                reason: r.try_get(3)?,
                raw: r.try_get(4)?,
                raw_len: u64::try_from(r.try_get::<i64, _>(5)?).unwrap_or(0),
            })
        })
        .collect()
    }

    /// Records a security event.
    pub async fn record_security_event(
        &self,
        kind: &str,
        agent: Option<AgentId>,
        peer: Option<&str>,
        detail: &str,
    ) -> Result<(), StoreError> {
        record_security_event(&self.store, kind, agent, peer, detail).await
    }

    /// The latest security events, newest first.
    pub async fn security_events(&self, limit: u32) -> Result<Vec<SecurityEvent>, StoreError> {
        sqlx::query(
            "SELECT at, kind, agent_id, peer, detail FROM security_events ORDER BY id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(self.store.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(SecurityEvent {
                at: ts(r.try_get(0)?)?,
                kind: r.try_get(1)?,
                agent: r.try_get(2)?,
                peer: r.try_get(3)?,
                detail: r.try_get(4)?,
            })
        })
        .collect()
    }
}

fn foreign_key_to_not_found(e: StoreError) -> StoreError {
    match &e {
        StoreError::Database(sqlx::Error::Database(d)) if d.is_foreign_key_violation() => {
            StoreError::NotFound
        }
        _ => e,
    }
}

pub(super) async fn create_agent(
    store: &Store,
    tenant: TenantId,
    name: &str,
) -> Result<AgentId, StoreError> {
    if name.chars().count() > 64 {
        return Err(StoreError::Invalid(
            "an agent name has at most 64 characters".into(),
        ));
    }
    let id = AgentId::new(Uuid::new_v4());
    sqlx::query("INSERT INTO agents (id, tenant_id, name, created_at) VALUES ($1, $2, $3, $4)")
        .bind(id.to_string())
        .bind(tenant.to_string())
        .bind(name)
        .bind(now_unix())
        .execute(store.pool())
        .await
        .map_err(|e| foreign_key_to_not_found(e.into()))?;
    Ok(id)
}

pub(super) async fn record_certificate(
    store: &Store,
    agent: AgentId,
    serial: &str,
    not_after: Timestamp,
) -> Result<(), StoreError> {
    if serial.is_empty() || serial.len() > 128 {
        return Err(StoreError::Invalid(
            "a serial has 1 to 128 characters".into(),
        ));
    }
    let mut tx = store.begin_write().await?;
    sqlx::query(
        "INSERT INTO certificates (serial, agent_id, issued_at, not_after) VALUES ($1, $2, $3, $4)",
    )
    .bind(serial)
    .bind(agent.to_string())
    .bind(now_unix())
    .bind(not_after.unix())
    .execute(&mut *tx)
    .await
    .map_err(|e| match foreign_key_to_not_found(e.into()) {
        e if e.is_unique_violation() => StoreError::Conflict("certificate serial"),
        e => e,
    })?;
    sqlx::query("UPDATE agents SET cert_serial = $2 WHERE id = $1")
        .bind(agent.to_string())
        .bind(serial)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn agents(
    store: &Store,
    tenant: Option<TenantId>,
) -> Result<Vec<AgentRecord>, StoreError> {
    sqlx::query(
        "SELECT id, tenant_id, name, agent_code, version, state, last_seen, cert_serial, \
         revoked_at FROM agents WHERE ($1 = '' OR tenant_id = $1) ORDER BY created_at, id",
    )
    .bind(tenant.map(|t| t.to_string()).unwrap_or_default())
    .fetch_all(store.pool())
    .await?
    .iter()
    .map(|r| {
        Ok(AgentRecord {
            id: agent_id(&r.try_get::<String, _>(0)?)?,
            tenant: tenant_id(&r.try_get::<String, _>(1)?)?,
            name: r.try_get(2)?,
            agent_code: r.try_get(3)?,
            version: r.try_get(4)?,
            state: AgentState::parse(&r.try_get::<String, _>(5)?)?,
            last_seen: opt_ts(r.try_get(6)?)?,
            cert_serial: r.try_get(7)?,
            revoked_at: opt_ts(r.try_get(8)?)?,
        })
    })
    .collect()
}

pub(super) async fn is_revoked(store: &Store, serial: &str) -> Result<bool, StoreError> {
    Ok(sqlx::query(
        "SELECT 1 FROM certificates WHERE serial = $1 AND revoked_at IS NOT NULL \
             UNION ALL SELECT 1 FROM service_certificates WHERE serial = $1 \
             AND revoked_at IS NOT NULL",
    )
    .bind(serial)
    .fetch_optional(store.pool())
    .await?
    .is_some())
}

pub(super) async fn record_security_event(
    store: &Store,
    kind: &str,
    agent: Option<AgentId>,
    peer: Option<&str>,
    detail: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO security_events (at, kind, agent_id, peer, detail) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(now_unix())
    .bind(kind)
    .bind(agent.map(|a| a.to_string()))
    .bind(peer)
    .bind(detail)
    .execute(store.pool())
    .await?;
    Ok(())
}

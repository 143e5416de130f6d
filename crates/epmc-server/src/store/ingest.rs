//! The ingest path: group commit of what the agents publish.

use std::collections::HashMap;
use std::fmt;

use bytes::Bytes;
use epmc_proto::bounded::Timestamp;
use epmc_proto::model::{
    AgentExceptionLog, AgentHello, DeviceEvent, DeviceEventKind, DeviceSnapshot, FullCollection,
    History, Series, Severity,
};
use epmc_proto::order::{OrderOutcome, OrderResult};
use epmc_proto::topic::{AgentId, Channel};
use epmc_proto::{Envelope, Kind, Message, ProtoError};
use sqlx::{AnyConnection, Connection, Row};

use super::types::tenant_id;
use super::{
    AgentAccess, AgentState, Backend, OrderState, Store, StoreError, TenantId, devices, now_unix,
};

/// One message as the connection layer received it.
#[derive(Clone, Debug)]
pub struct IngestItem {
    /// The publishing agent (from its certificate).
    pub agent: AgentId,
    /// The channel of the topic it was published on.
    pub channel: Channel,
    /// The payload, undecoded.
    pub payload: Bytes,
}

impl IngestItem {
    /// An item.
    pub fn new(agent: AgentId, channel: Channel, payload: impl Into<Bytes>) -> IngestItem {
        IngestItem {
            agent,
            channel,
            payload: payload.into(),
        }
    }
}

/// What became of one item of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Applied and committed.
    Stored,
    /// Its message id was stored before: not applied again.
    Duplicate,
    /// Not applied; kept as a rejected message with this reason and counted.
    Rejected(RejectReason),
}

/// Why a message was not applied.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// Larger than the protocol's maximum.
    TooLarge,
    /// A `kind` this build does not know.
    UnknownKind(String),
    /// A `schema` major version newer than this build's.
    UnsupportedSchema(u64),
    /// Not JSON, or a body that does not decode (the decoder's words).
    Invalid(String),
    /// A kind that does not belong on the topic's channel.
    WrongChannel {
        /// The message kind.
        kind: &'static str,
        /// The channel it came on.
        channel: &'static str,
    },
    /// The agent is not enrolled.
    UnknownAgent,
    /// The agent was revoked.
    RevokedAgent,
    /// A hello naming another agent.
    AgentMismatch,
    /// A result for an order this agent does not have.
    UnknownOrder,
    /// The database refused the data (a constraint).
    NotApplicable(String),
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::TooLarge => write!(f, "too large"),
            RejectReason::UnknownKind(k) => write!(f, "unknown kind {k:?}"),
            RejectReason::UnsupportedSchema(v) => write!(f, "unsupported schema version {v}"),
            RejectReason::Invalid(e) => write!(f, "invalid: {e}"),
            RejectReason::WrongChannel { kind, channel } => {
                write!(f, "kind {kind} not accepted on channel {channel}")
            }
            RejectReason::UnknownAgent => write!(f, "unknown agent"),
            RejectReason::RevokedAgent => write!(f, "revoked agent"),
            RejectReason::AgentMismatch => write!(f, "hello names another agent"),
            RejectReason::UnknownOrder => write!(f, "result for an unknown order"),
            RejectReason::NotApplicable(e) => write!(f, "not applicable: {e}"),
        }
    }
}

impl From<ProtoError> for RejectReason {
    fn from(e: ProtoError) -> RejectReason {
        match e {
            ProtoError::TooLarge { .. } => RejectReason::TooLarge,
            ProtoError::UnknownKind(k) => RejectReason::UnknownKind(k),
            ProtoError::UnsupportedSchema { found } => RejectReason::UnsupportedSchema(found),
            other => RejectReason::Invalid(other.to_string()),
        }
    }
}

/// The ingest path's handle: batches, agent state, access checks.
#[derive(Clone, Debug)]
pub struct IngestHandle {
    store: Store,
}

impl IngestHandle {
    pub(super) fn new(store: Store) -> IngestHandle {
        IngestHandle { store }
    }

    /// Applies a batch in ONE transaction and returns one outcome per item, in order. Invalid
    /// items are stored as rejected messages (they never fail the batch); an id stored before
    /// is [`IngestOutcome::Duplicate`]. Only an error of the database itself fails the whole
    /// batch, and then nothing of it is committed. The same as [`PreparedBatch::new`] and
    /// [`IngestHandle::ingest_prepared`].
    pub async fn ingest_batch(
        &self,
        items: &[IngestItem],
    ) -> Result<Vec<IngestOutcome>, StoreError> {
        self.ingest_prepared(&PreparedBatch::new(items.to_vec()))
            .await
    }

    /// [`IngestHandle::ingest_batch`] of a batch decoded beforehand (e.g. while the batch
    /// before was committing).
    pub async fn ingest_prepared(
        &self,
        batch: &PreparedBatch,
    ) -> Result<Vec<IngestOutcome>, StoreError> {
        let now = now_unix();
        let limit = self.store.inner.options.rejected_raw_limit;
        let backend = self.store.backend();
        let items = &batch.items;
        let decoded = &batch.decoded;
        let mut tx = self.store.begin_ingest().await?;
        let wanted: Vec<AgentId> = items
            .iter()
            .zip(decoded)
            .filter(|(_, d)| d.is_ok())
            .map(|(item, _)| item.agent)
            .collect();
        let agents = agents_access(&mut tx, backend, &wanted).await?;
        let mut outcomes: Vec<Option<IngestOutcome>> = vec![None; items.len()];
        // Consecutive snapshots are applied together (see `apply_snapshots`); any other
        // message first applies the snapshots before it, so the batch's order holds.
        let mut run: Vec<Snap<'_>> = Vec::new();
        for (i, (item, decoded)) in items.iter().zip(decoded).enumerate() {
            let envelope = match decoded {
                Err(reason) => {
                    outcomes[i] = Some(IngestOutcome::Rejected(reason.clone()));
                    continue;
                }
                Ok(envelope) => envelope,
            };
            let tenant = match agents.get(&item.agent).copied() {
                None | Some(AgentAccess::Unknown) => {
                    outcomes[i] = Some(IngestOutcome::Rejected(RejectReason::UnknownAgent));
                    continue;
                }
                Some(AgentAccess::Revoked) => {
                    outcomes[i] = Some(IngestOutcome::Rejected(RejectReason::RevokedAgent));
                    continue;
                }
                Some(AgentAccess::Active(tenant)) => tenant,
            };
            if let (Message::Snapshot(snapshot), Some(Ok(status))) =
                (&envelope.message, &batch.status[i])
            {
                run.push(Snap {
                    index: i,
                    tenant,
                    agent: item.agent,
                    envelope,
                    snapshot,
                    id: batch.ids[i].as_str(),
                    status,
                });
                continue;
            }
            flush_snapshots(&mut tx, backend, &mut run, &mut outcomes, now).await?;
            outcomes[i] =
                Some(apply_isolated(&mut tx, backend, tenant, item.agent, envelope, now).await?);
        }
        flush_snapshots(&mut tx, backend, &mut run, &mut outcomes, now).await?;
        let mut result = Vec::with_capacity(items.len());
        for (item, outcome) in items.iter().zip(outcomes) {
            let outcome = outcome.ok_or_else(|| {
                StoreError::Invalid("an item of the batch was not applied".into())
            })?;
            if let IngestOutcome::Rejected(reason) = &outcome {
                tracing::warn!(agent = %item.agent, channel = item.channel.as_str(), %reason, "message rejected");
                let raw = &item.payload[..item.payload.len().min(limit)];
                sqlx::query(
                    "INSERT INTO rejected_messages (at, agent_id, topic, reason, raw, raw_len) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(now)
                .bind(item.agent.to_string())
                .bind(epmc_proto::topic::topic(&item.agent, item.channel))
                .bind(reason.to_string())
                .bind(raw.to_vec())
                .bind(i64::try_from(item.payload.len()).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
            }
            result.push(outcome);
        }
        tx.commit().await?;
        Ok(result)
    }

    /// Marks an agent connected.
    pub async fn set_online(&self, agent: AgentId, at: Timestamp) -> Result<(), StoreError> {
        self.set_one_state(agent, true, at).await
    }

    /// Marks an agent disconnected.
    pub async fn set_offline(&self, agent: AgentId, at: Timestamp) -> Result<(), StoreError> {
        self.set_one_state(agent, false, at).await
    }

    /// Records several connections and disconnections (`true`: online), in order, in one
    /// transaction (one sync instead of one per change); all at `at`. Only each agent's last
    /// change matters (they all happen at `at`), so each agent is written once. Returns the
    /// agents that are not in the store, once each, in the order they first appear (nothing is
    /// recorded for them).
    pub async fn set_states(
        &self,
        changes: &[(AgentId, bool)],
        at: Timestamp,
    ) -> Result<Vec<AgentId>, StoreError> {
        // Each agent once, in the order it first appears, with its last state.
        let mut last: Vec<(AgentId, bool)> = Vec::with_capacity(changes.len());
        let mut index: HashMap<AgentId, usize> = HashMap::with_capacity(changes.len());
        for &(agent, online) in changes {
            match index.get(&agent) {
                Some(&i) => last[i].1 = online,
                None => {
                    index.insert(agent, last.len());
                    last.push((agent, online));
                }
            }
        }
        // One prepared single-row statement, kept by the connection: a burst is mostly a
        // few agents, and a multi-row statement of each size would be prepared anew.
        let mut unknown = Vec::new();
        let mut tx = self.store.begin_ingest().await?;
        for (agent, online) in last {
            let state = if online {
                AgentState::Online
            } else {
                AgentState::Offline
            };
            let r = sqlx::query("UPDATE agents SET state = $2, last_seen = $3 WHERE id = $1")
                .bind(agent.to_string())
                .bind(state.as_str())
                .bind(at.unix())
                .execute(&mut *tx)
                .await?;
            if r.rows_affected() == 0 {
                unknown.push(agent);
            }
        }
        tx.commit().await?;
        Ok(unknown)
    }

    /// [`IngestHandle::set_states`] of one change; [`StoreError::NotFound`] for an unknown
    /// agent.
    async fn set_one_state(
        &self,
        agent: AgentId,
        online: bool,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        if self.set_states(&[(agent, online)], at).await?.is_empty() {
            Ok(())
        } else {
            Err(StoreError::NotFound)
        }
    }

    /// Whether an agent may connect.
    pub async fn agent_access(&self, agent: AgentId) -> Result<AgentAccess, StoreError> {
        let mut conn = self.store.pool().acquire().await?;
        agent_access(&mut conn, agent).await
    }

    /// Whether a certificate serial was revoked.
    pub async fn is_certificate_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        super::admin::is_revoked(&self.store, serial).await
    }

    /// Records an identity or topic violation seen on a connection.
    pub async fn record_security_event(
        &self,
        kind: &str,
        agent: Option<AgentId>,
        peer: Option<&str>,
        detail: &str,
    ) -> Result<(), StoreError> {
        super::admin::record_security_event(&self.store, kind, agent, peer, detail).await
    }
}

/// Applies one message inside a savepoint, so a message whose data the database refuses is
/// rolled back alone and rejected. A unique violation means a concurrent writer (another
/// replica) created the same row first: the savepoint is retried (bounded), and then sees that
/// row. Only an error that blames the message's data ([`is_data_error`]: a data exception or
/// a constraint) rejects it; any other database error (lock, connection, a missing table or
/// column, a permission, an unknown code) says the server or its schema is broken: it fails
/// the whole batch, which is then not acknowledged and arrives again once that is fixed.
async fn apply_isolated(
    tx: &mut AnyConnection,
    backend: Backend,
    tenant: TenantId,
    agent: AgentId,
    envelope: &Envelope,
    now: i64,
) -> Result<IngestOutcome, StoreError> {
    const ATTEMPTS: u32 = 3;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut sp = tx.begin().await?;
        let result = apply(&mut sp, tenant, agent, envelope, now).await;
        match result {
            Ok(IngestOutcome::Rejected(r)) => {
                sp.rollback().await?;
                return Ok(IngestOutcome::Rejected(r));
            }
            Ok(o) => {
                sp.commit().await?;
                return Ok(o);
            }
            Err(e) if e.is_unique_violation() && attempt < ATTEMPTS => {
                sp.rollback().await?;
                tracing::debug!(
                    attempt,
                    "concurrent insert of the same row; retrying the message"
                );
            }
            Err(StoreError::Database(sqlx::Error::Database(e)))
                if is_data_error(backend, e.as_ref()) =>
            {
                sp.rollback().await?;
                return Ok(IngestOutcome::Rejected(RejectReason::NotApplicable(
                    e.message().chars().take(200).collect(),
                )));
            }
            Err(StoreError::Invalid(e)) => {
                sp.rollback().await?;
                return Ok(IngestOutcome::Rejected(RejectReason::NotApplicable(e)));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A snapshot of the batch waiting to be applied with its neighbours.
struct Snap<'a> {
    /// Its place in the batch.
    index: usize,
    tenant: TenantId,
    agent: AgentId,
    envelope: &'a Envelope,
    snapshot: &'a DeviceSnapshot,
    /// The message id as text.
    id: &'a str,
    /// The snapshot's status as JSON.
    status: &'a str,
}

/// A batch decoded, with the text the statements bind computed: all the work on it that
/// needs no database, so that it can be done while the batch before commits.
#[derive(Debug)]
pub struct PreparedBatch {
    items: Vec<IngestItem>,
    decoded: Vec<Result<Envelope, RejectReason>>,
    /// Each valid item's message id as text (empty for an invalid one).
    ids: Vec<String>,
    /// Each snapshot's status as JSON (`None` for the other items).
    status: Vec<Option<Result<String, String>>>,
}

impl PreparedBatch {
    /// Decodes `items` (no database needed).
    pub fn new(items: Vec<IngestItem>) -> PreparedBatch {
        let decoded: Vec<Result<Envelope, RejectReason>> = items.iter().map(decode).collect();
        let ids = decoded
            .iter()
            .map(|d| d.as_ref().map(|e| e.id.to_string()).unwrap_or_default())
            .collect();
        let status = decoded
            .iter()
            .map(|d| match d {
                Ok(Envelope {
                    message: Message::Snapshot(s),
                    ..
                }) => Some(serde_json::to_string(&s.status).map_err(|e| e.to_string())),
                _ => None,
            })
            .collect();
        PreparedBatch {
            items,
            decoded,
            ids,
            status,
        }
    }

    /// How many items it holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Most rows in one multi-row statement.
const MAX_ROWS: usize = 256;

/// Splits `n` rows into statement sizes: [`MAX_ROWS`] each, and one statement for the rest,
/// so a batch takes as few round trips to the database as it can. Only full statements are
/// kept prepared ([`persistent`]); the rest have a different size each time and would only
/// push those out of the connection's statement cache.
fn pieces(mut n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    while n > 0 {
        let size = n.min(MAX_ROWS);
        out.push(size);
        n -= size;
    }
    out
}

/// Whether a statement of `rows` rows is worth keeping prepared.
fn persistent(rows: usize) -> bool {
    rows == MAX_ROWS
}

/// Parameter `i` (from 1) of a statement where every parameter appears once, in order:
/// `$i` on PostgreSQL, `?` on SQLite. (SQLite finds a named parameter's number by a linear
/// search per bind, so binding a statement with hundreds of `$i` costs the square of that;
/// with plain `?` each bind is direct.)
fn param(backend: Backend, i: usize) -> String {
    match backend {
        Backend::Sqlite => "?".to_owned(),
        Backend::Postgres => format!("${i}"),
    }
}

/// `rows` groups of `width` parameters, `($1, $2), ($3, $4)`, numbered from `$first`.
fn placeholders(backend: Backend, first: usize, width: usize, rows: usize) -> String {
    let mut sql = String::with_capacity(rows * width * 6);
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..width {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&param(backend, first + r * width + c));
        }
        sql.push(')');
    }
    sql
}

// Look-ups by many keys join a `VALUES` list rather than testing `IN (…)`: PostgreSQL keeps
// a full-size statement's generic plan after five runs, and in a generic plan `IN ($1, …)` is
// an array searched element by element for every row the scan reads (12 ms per statement of
// 256 serials among 1,000 devices in the benchmark: half of the database's time), where a
// join hashes or looks its keys up.

/// The access of every agent named, with one query per [`MAX_ROWS`] agents.
async fn agents_access(
    conn: &mut AnyConnection,
    backend: Backend,
    agents: &[AgentId],
) -> Result<HashMap<AgentId, AgentAccess>, StoreError> {
    let mut distinct: Vec<AgentId> = agents.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let mut access: HashMap<AgentId, AgentAccess> = distinct
        .iter()
        .map(|a| (*a, AgentAccess::Unknown))
        .collect();
    let mut rest = distinct.as_slice();
    for n in pieces(distinct.len()) {
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let sql = format!(
            "SELECT agents.id, agents.tenant_id, agents.revoked_at FROM (VALUES {}) AS v \
             JOIN agents ON agents.id = v.column1",
            placeholders(backend, 1, 1, n)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(persistent(n));
        for a in chunk {
            q = q.bind(a.to_string());
        }
        for r in q.fetch_all(&mut *conn).await? {
            let agent = super::types::agent_id(&r.try_get::<String, _>(0)?)?;
            let a = if r.try_get::<Option<i64>, _>(2)?.is_some() {
                AgentAccess::Revoked
            } else {
                AgentAccess::Active(tenant_id(&r.try_get::<String, _>(1)?)?)
            };
            access.insert(agent, a);
        }
    }
    Ok(access)
}

/// Applies the snapshots waiting in `run` together, inside a savepoint. When the database
/// refuses them (a constraint, or a row another writer created at the same moment) the
/// savepoint is rolled back and each is applied alone ([`apply_isolated`]), so the outcome is
/// the same as one by one; a transient failure fails the batch.
async fn flush_snapshots(
    tx: &mut AnyConnection,
    backend: Backend,
    run: &mut Vec<Snap<'_>>,
    outcomes: &mut [Option<IngestOutcome>],
    now: i64,
) -> Result<(), StoreError> {
    if run.is_empty() {
        return Ok(());
    }
    let run = std::mem::take(run);
    let mut sp = tx.begin().await?;
    match apply_snapshots(&mut sp, backend, &run, now).await {
        Ok(applied) => {
            sp.commit().await?;
            for (index, outcome) in applied {
                outcomes[index] = Some(outcome);
            }
            Ok(())
        }
        Err(e) if falls_back(backend, &e) => {
            sp.rollback().await?;
            tracing::debug!(error = %e, n = run.len(), "snapshots applied one by one");
            for s in &run {
                outcomes[s.index] =
                    Some(apply_isolated(tx, backend, s.tenant, s.agent, s.envelope, now).await?);
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Inserts the run's message ids, [`MAX_ROWS`] per statement. With `skip_repeats`, an id
/// stored before is skipped and the ids inserted are returned; without, a repeat fails the
/// statement (a unique violation) and `None` is returned.
async fn insert_ids(
    conn: &mut AnyConnection,
    backend: Backend,
    run: &[Snap<'_>],
    agent_ids: &HashMap<AgentId, String>,
    now: i64,
    skip_repeats: bool,
) -> Result<Option<std::collections::HashSet<String>>, StoreError> {
    let mut fresh = skip_repeats.then(std::collections::HashSet::new);
    let mut offset = 0;
    for n in pieces(run.len()) {
        let sql = format!(
            "INSERT INTO ingested_messages (id, agent_id, kind, received_at) VALUES {}{}",
            placeholders(backend, 1, 4, n),
            if skip_repeats {
                " ON CONFLICT (id) DO NOTHING RETURNING id"
            } else {
                ""
            }
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(persistent(n));
        for s in &run[offset..offset + n] {
            q = q
                .bind(s.id)
                .bind(agent_ids[&s.agent].as_str())
                .bind(Kind::Snapshot.as_str())
                .bind(now);
        }
        match &mut fresh {
            Some(fresh) => {
                for r in q.fetch_all(&mut *conn).await? {
                    fresh.insert(r.try_get::<String, _>(0)?);
                }
            }
            None => {
                q.execute(&mut *conn).await?;
            }
        }
        offset += n;
    }
    Ok(fresh)
}

/// Whether applying messages one by one may get further than applying them together.
fn falls_back(backend: Backend, e: &StoreError) -> bool {
    match e {
        StoreError::Invalid(_) => true,
        StoreError::Database(sqlx::Error::Database(d)) => {
            d.is_unique_violation() || is_data_error(backend, d.as_ref())
        }
        _ => false,
    }
}

/// Applies consecutive snapshots with a few multi-row statements, with the same result as
/// [`apply`] on each in order: each new message id is recorded (a repeated one is a
/// duplicate and changes nothing); each device is found or created and its last contact is
/// the newest of its snapshots; its latest status is the newest snapshot's (among equal
/// times, the later one's) unless a newer one is stored; the agents' last-seen time is
/// `now`. Returns each snapshot's batch index and outcome.
async fn apply_snapshots(
    conn: &mut AnyConnection,
    backend: Backend,
    run: &[Snap<'_>],
    now: i64,
) -> Result<Vec<(usize, IngestOutcome)>, StoreError> {
    // 1. The message ids. Repeats are rare (an agent sending again what it was not sure
    //    was stored), so the ids are first inserted plainly, under a savepoint; only when one
    //    of them is already there is that undone and the insert made again skipping repeats
    //    and returning the ids that are new. (The plain insert costs PostgreSQL a third less
    //    than `ON CONFLICT … RETURNING`.)
    let agent_ids: HashMap<AgentId, String> =
        run.iter().map(|s| (s.agent, s.agent.to_string())).collect();
    let mut sp = conn.begin().await?;
    let plain = insert_ids(&mut sp, backend, run, &agent_ids, now, false).await;
    // `None`: every id is new (one twice in the run would have failed the plain insert too).
    let mut fresh: Option<std::collections::HashSet<String>> = match plain {
        Ok(_) => {
            sp.commit().await?;
            None
        }
        Err(StoreError::Database(sqlx::Error::Database(e))) if e.is_unique_violation() => {
            sp.rollback().await?;
            insert_ids(conn, backend, run, &agent_ids, now, true).await?
        }
        Err(e) => return Err(e),
    };
    let mut outcomes = Vec::with_capacity(run.len());
    let mut stored: Vec<&Snap<'_>> = Vec::with_capacity(run.len());
    for s in run {
        // An id twice in the run: the first is new, the second a duplicate.
        if fresh.as_mut().is_none_or(|f| f.remove(s.id)) {
            outcomes.push((s.index, IngestOutcome::Stored));
            stored.push(s);
        } else {
            outcomes.push((s.index, IngestOutcome::Duplicate));
        }
    }
    if stored.is_empty() {
        return Ok(outcomes);
    }

    // 2. The devices, once each: (agent, key) → first time and last position in the run.
    struct Device<'a> {
        tenant: TenantId,
        agent: AgentId,
        key: &'a str,
        /// The time of its first snapshot in the run (a new row's `first_seen`).
        first: i64,
        last: usize,
        row: Option<i64>,
    }
    let mut devices: Vec<Device<'_>> = Vec::new();
    let mut by_key: HashMap<(AgentId, &str), usize> = HashMap::new();
    let mut device_of: Vec<usize> = Vec::with_capacity(stored.len());
    for (pos, s) in stored.iter().enumerate() {
        let key = s.snapshot.device_id.as_str();
        let at = s.snapshot.observed_at.unix();
        let d = *by_key.entry((s.agent, key)).or_insert_with(|| {
            devices.push(Device {
                tenant: s.tenant,
                agent: s.agent,
                key,
                first: at,
                last: pos,
                row: None,
            });
            devices.len() - 1
        });
        let dev = &mut devices[d];
        dev.last = pos;
        device_of.push(d);
    }
    // Serial keys look their rows up together, per tenant; the rest (new devices, `ip:`
    // keys and their merges) go through `devices::resolve` one by one.
    // The agent each row looked up by serial has now (the rows `devices::resolve` returns
    // are left out: it may have just changed them).
    let mut current_agent: HashMap<i64, String> = HashMap::new();
    let mut tenants: Vec<TenantId> = devices.iter().map(|d| d.tenant).collect();
    tenants.sort_unstable();
    tenants.dedup();
    for tenant in tenants {
        let mut serials: Vec<&str> = devices
            .iter()
            .filter(|d| d.tenant == tenant && !d.key.starts_with(devices::IP_PREFIX))
            .map(|d| d.key)
            .collect();
        serials.sort_unstable();
        serials.dedup();
        let tenant_text = tenant.to_string();
        let mut rows: HashMap<String, (i64, String)> = HashMap::new();
        let mut rest = serials.as_slice();
        for n in pieces(serials.len()) {
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let sql = format!(
                "SELECT devices.id, devices.serial, devices.agent_id FROM (VALUES {}) AS v JOIN devices \
                 ON devices.tenant_id = v.column1 AND devices.serial = v.column2",
                placeholders(backend, 1, 2, n)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(persistent(n));
            for serial in chunk {
                q = q.bind(tenant_text.as_str()).bind(*serial);
            }
            for r in q.fetch_all(&mut *conn).await? {
                let row = r.try_get::<i64, _>(0)?;
                rows.insert(
                    r.try_get::<String, _>(1)?,
                    (row, r.try_get::<String, _>(2)?),
                );
            }
        }
        for d in devices.iter_mut().filter(|d| d.tenant == tenant) {
            if !d.key.starts_with(devices::IP_PREFIX)
                && let Some((row, agent)) = rows.get(d.key)
            {
                d.row = Some(*row);
                current_agent.insert(*row, agent.clone());
            }
        }
    }
    // The others one by one, in the order they first appear, with the time of their first
    // snapshot (a new row's first contact); then every row whose agent changed gets its new
    // agent, the one of each device's last snapshot, as `devices::resolve` does. The last
    // contact is not written here: a snapshot's time is its device's last contact through
    // `device_status` (`devices::last_contact!`), which step 3 writes anyway; one row per
    // snapshot instead of two.
    for dev in devices.iter_mut() {
        if dev.row.is_none() {
            let row = devices::resolve(conn, dev.tenant, dev.agent, dev.key, None, None, dev.first)
                .await?;
            dev.row = Some(row);
            current_agent.remove(&row);
        }
    }
    let mut order: Vec<usize> = (0..devices.len()).collect();
    order.sort_unstable_by_key(|&d| devices[d].last);
    let mut touch: Vec<(i64, AgentId)> = Vec::new();
    let mut touch_at: HashMap<i64, usize> = HashMap::new();
    for &d in &order {
        let dev = &devices[d];
        let row = dev
            .row
            .ok_or_else(|| StoreError::Invalid("a device was not resolved".into()))?;
        match touch_at.get(&row) {
            Some(&t) => touch[t].1 = dev.agent,
            None => {
                touch_at.insert(row, touch.len());
                touch.push((row, dev.agent));
            }
        }
    }
    // Only the rows whose agent changes (usually none: one statement less per 256 devices).
    touch.retain(|(row, agent)| {
        current_agent.get(row).map(String::as_str) != Some(agent_ids[agent].as_str())
    });
    let mut rest = touch.as_slice();
    for n in pieces(touch.len()) {
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let sql = format!(
            "UPDATE devices SET agent_id = v.column2 FROM (VALUES {}) AS v \
             WHERE devices.id = v.column1 AND devices.agent_id <> v.column2",
            placeholders(backend, 1, 2, n)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(persistent(n));
        for (row, agent) in chunk {
            q = q.bind(*row).bind(agent_ids[agent].as_str());
        }
        q.execute(&mut *conn).await?;
    }

    // 3. The latest status per device row: the newest snapshot, the later one among equals.
    let mut latest: Vec<(i64, i64, &str)> = Vec::new();
    let mut latest_at: HashMap<i64, usize> = HashMap::new();
    for (s, &d) in stored.iter().zip(&device_of) {
        let row = devices[d]
            .row
            .ok_or_else(|| StoreError::Invalid("a device was not resolved".into()))?;
        let at = s.snapshot.observed_at.unix();
        match latest_at.get(&row) {
            Some(&l) => {
                if at >= latest[l].1 {
                    latest[l] = (row, at, s.status);
                }
            }
            None => {
                latest_at.insert(row, latest.len());
                latest.push((row, at, s.status));
            }
        }
    }
    let mut rest = latest.as_slice();
    for n in pieces(latest.len()) {
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let sql = format!(
            "INSERT INTO device_status (device_id, observed_at, status) VALUES {} \
             ON CONFLICT (device_id) DO UPDATE SET observed_at = excluded.observed_at, \
             status = excluded.status WHERE device_status.observed_at <= excluded.observed_at",
            placeholders(backend, 1, 3, n)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(persistent(n));
        for (row, at, status) in chunk {
            q = q.bind(*row).bind(*at).bind(*status);
        }
        q.execute(&mut *conn).await?;
    }

    // 4. The agents' last-seen time (seconds): only rows it moves forward are written. An
    //    agent's row, with its info, is rewritten once a second at most instead of once per
    //    commit (SQLite would write the page again, PostgreSQL a new row version).
    let mut seen_agents: Vec<&str> = stored
        .iter()
        .map(|s| agent_ids[&s.agent].as_str())
        .collect();
    seen_agents.sort_unstable();
    seen_agents.dedup();
    let mut rest = seen_agents.as_slice();
    for n in pieces(seen_agents.len()) {
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let sql = format!(
            "UPDATE agents SET last_seen = {} FROM (VALUES {}) AS v WHERE agents.id = v.column1 \
             AND (agents.last_seen IS NULL OR agents.last_seen < {})",
            param(backend, 1),
            placeholders(backend, 2, 1, n),
            param(backend, 2 + n),
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .persistent(persistent(n))
            .bind(now);
        for agent in chunk {
            q = q.bind(*agent);
        }
        q.bind(now).execute(&mut *conn).await?;
    }
    Ok(outcomes)
}

/// A database error that blames the data of the message being applied: the message is
/// rejected (kept, counted, acknowledged) and the rest of the batch goes on. This is a positive
/// list: every other error, including a code this build does not know, fails the batch, since
/// acknowledging a message the server could not store for its own reasons would lose it.
fn is_data_error(backend: Backend, e: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = e.code() else {
        return false;
    };
    match backend {
        // SQLite (extended) result codes, by their primary code: TOOBIG (18), CONSTRAINT (19,
        // with its extended codes: NOT NULL, CHECK, UNIQUE, FOREIGN KEY, DATATYPE…), MISMATCH
        // (20), RANGE (25). Not ERROR (1: no such table or column), READONLY, CORRUPT, NOTADB,
        // SCHEMA, MISUSE, BUSY, LOCKED, IOERR, FULL…
        Backend::Sqlite => code
            .parse::<u32>()
            .is_ok_and(|n| matches!(n & 0xff, 18 | 19 | 20 | 25)),
        // PostgreSQL SQLSTATE classes 22 (data exception: a value out of range, too long, not
        // encodable) and 23 (integrity constraint violation), and 54000 (a value too large for
        // a limit, e.g. an index row: SQLite's TOOBIG; not the rest of class 54, which blames
        // the statement). Not 42 (syntax error, undefined table or column, insufficient
        // privilege), 0A, XX, 08, 40, 53, 57, 58…
        Backend::Postgres => {
            code.len() == 5 && (code.starts_with("22") || code.starts_with("23") || code == "54000")
        }
    }
}

pub(super) async fn agent_access(
    conn: &mut AnyConnection,
    agent: AgentId,
) -> Result<AgentAccess, StoreError> {
    let row = sqlx::query("SELECT tenant_id, revoked_at FROM agents WHERE id = $1")
        .bind(agent.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        None => AgentAccess::Unknown,
        Some(r) => {
            if r.try_get::<Option<i64>, _>(1)?.is_some() {
                AgentAccess::Revoked
            } else {
                AgentAccess::Active(tenant_id(&r.try_get::<String, _>(0)?)?)
            }
        }
    })
}

fn decode(item: &IngestItem) -> Result<Envelope, RejectReason> {
    let envelope = Envelope::from_json(&item.payload)?;
    let kind = envelope.kind();
    if Channel::for_kind(kind) != item.channel || item.channel == Channel::Orders {
        return Err(RejectReason::WrongChannel {
            kind: kind.as_str(),
            channel: item.channel.as_str(),
        });
    }
    Ok(envelope)
}

async fn apply(
    conn: &mut AnyConnection,
    tenant: TenantId,
    agent: AgentId,
    envelope: &Envelope,
    now: i64,
) -> Result<IngestOutcome, StoreError> {
    let fresh = sqlx::query(
        "INSERT INTO ingested_messages (id, agent_id, kind, received_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(envelope.id.to_string())
    .bind(agent.to_string())
    .bind(envelope.kind().as_str())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    if fresh.rows_affected() == 0 {
        return Ok(IngestOutcome::Duplicate);
    }
    let message_id = envelope.id.to_string();
    let outcome = match &envelope.message {
        Message::Hello(h) => hello(conn, tenant, agent, h, envelope.sent_at.unix()).await?,
        Message::Snapshot(s) => snapshot(conn, tenant, agent, s).await?,
        Message::Collection(c) => collection(conn, tenant, agent, c).await?,
        Message::Event(e) => event(conn, tenant, agent, e, &message_id).await?,
        Message::ExceptionLog(l) => exception_log(conn, agent, l, &message_id).await?,
        Message::OrderResult(r) => order_result(conn, agent, r, now).await?,
        Message::Order(_) => IngestOutcome::Rejected(RejectReason::WrongChannel {
            kind: "order",
            channel: Channel::Orders.as_str(),
        }),
    };
    sqlx::query(
        "UPDATE agents SET last_seen = $2 WHERE id = $1 AND (last_seen IS NULL OR last_seen < $2)",
    )
    .bind(agent.to_string())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(outcome)
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Invalid(e.to_string()))
}

async fn hello(
    conn: &mut AnyConnection,
    tenant: TenantId,
    agent: AgentId,
    h: &AgentHello,
    sent_at: i64,
) -> Result<IngestOutcome, StoreError> {
    if h.agent_id != agent.uuid() {
        return Ok(IngestOutcome::Rejected(RejectReason::AgentMismatch));
    }
    sqlx::query(
        "UPDATE agents SET agent_code = $2, version = $3, info = $4, hello_at = $5 WHERE id = $1",
    )
    .bind(agent.to_string())
    .bind(h.agent_code.as_str())
    .bind(h.version.as_str())
    .bind(json(h)?)
    .bind(sent_at)
    .execute(&mut *conn)
    .await?;
    for d in h.devices.as_slice() {
        let id = devices::resolve(
            conn,
            tenant,
            agent,
            d.device_id.as_str(),
            None,
            None,
            sent_at,
        )
        .await?;
        set_agent_settings(
            conn,
            id,
            d.display_name.as_ref().map(|n| n.as_str()),
            d.group_name.as_ref().map(|n| n.as_str()),
            d.comment.as_ref().map(|n| n.as_str()),
        )
        .await?;
    }
    Ok(IngestOutcome::Stored)
}

async fn set_agent_settings(
    conn: &mut AnyConnection,
    device: i64,
    display_name: Option<&str>,
    group_name: Option<&str>,
    comment: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE devices SET name = COALESCE($2, name), group_name = $3, comment = $4 WHERE id = $1",
    )
    .bind(device)
    .bind(display_name)
    .bind(group_name)
    .bind(comment)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn snapshot(
    conn: &mut AnyConnection,
    tenant: TenantId,
    agent: AgentId,
    s: &DeviceSnapshot,
) -> Result<IngestOutcome, StoreError> {
    let at = s.observed_at.unix();
    let id = devices::resolve(conn, tenant, agent, s.device_id.as_str(), None, None, at).await?;
    devices::upsert_status(conn, id, at, &s.status).await?;
    Ok(IngestOutcome::Stored)
}

async fn collection(
    conn: &mut AnyConnection,
    tenant: TenantId,
    agent: AgentId,
    c: &FullCollection,
) -> Result<IngestOutcome, StoreError> {
    let at = c.collected_at.unix();
    let address = c.settings.ip_address.map(|a| a.to_string());
    let id = devices::resolve(
        conn,
        tenant,
        agent,
        c.device_id.as_str(),
        c.info.serial_number.as_ref().map(|s| s.as_str()),
        address.as_deref(),
        at,
    )
    .await?;
    sqlx::query(
        "UPDATE devices SET info = $2, settings = $3, logs = $4, \
         name = COALESCE(name, $5) WHERE id = $1",
    )
    .bind(id)
    .bind(json(&c.info)?)
    .bind(json(&c.settings)?)
    .bind(json(&c.logs)?)
    .bind(c.settings.projector_name.as_ref().map(|n| n.as_str()))
    .execute(&mut *conn)
    .await?;
    if let Some(s) = &c.agent_settings {
        set_agent_settings(
            conn,
            id,
            s.display_name.as_ref().map(|n| n.as_str()),
            s.group_name.as_ref().map(|n| n.as_str()),
            s.comment.as_ref().map(|n| n.as_str()),
        )
        .await?;
    }
    devices::upsert_status(conn, id, at, &c.status).await?;
    history(conn, id, &c.history).await?;
    Ok(IngestOutcome::Stored)
}

async fn history(conn: &mut AnyConnection, device: i64, h: &History) -> Result<(), StoreError> {
    let series: [(&str, &Option<Series>); 3] = [
        ("usage_minutes", &h.usage_minutes),
        ("temperature_celsius", &h.temperature_celsius),
        ("ac_voltage_volts", &h.ac_voltage_volts),
    ];
    for (name, s) in series {
        let Some(s) = s else { continue };
        let n = s.values.len() as i64;
        if n == 0 {
            continue;
        }
        let start = s.start.unix();
        let interval = i64::from(s.interval_seconds);
        let end = start.saturating_add(interval.saturating_mul(n - 1));
        upsert_history(conn, device, name, start, end, interval, json(&s.values)?).await?;
    }
    for (name, records) in [("errors", &h.errors), ("warnings", &h.warnings)] {
        let records = records.as_slice();
        let (Some(start), Some(end)) = (
            records.iter().map(|r| r.at.unix()).min(),
            records.iter().map(|r| r.at.unix()).max(),
        ) else {
            continue;
        };
        upsert_history(conn, device, name, start, end, 0, json(&records)?).await?;
    }
    Ok(())
}

async fn upsert_history(
    conn: &mut AnyConnection,
    device: i64,
    series: &str,
    start: i64,
    end: i64,
    interval: i64,
    data: String,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO history (device_id, series, start_at, end_at, interval_seconds, data) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (device_id, series, start_at) DO UPDATE \
         SET end_at = excluded.end_at, interval_seconds = excluded.interval_seconds, \
         data = excluded.data",
    )
    .bind(device)
    .bind(series)
    .bind(start)
    .bind(end)
    .bind(interval)
    .bind(data)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn event_kind(e: &DeviceEventKind) -> &'static str {
    match e {
        DeviceEventKind::StatusChange { .. } => "status_change",
        DeviceEventKind::Warning { .. } => "warning",
        DeviceEventKind::Alarm { .. } => "alarm",
        DeviceEventKind::Reachable => "reachable",
        DeviceEventKind::Unreachable { .. } => "unreachable",
    }
}

async fn event(
    conn: &mut AnyConnection,
    tenant: TenantId,
    agent: AgentId,
    e: &DeviceEvent,
    message_id: &str,
) -> Result<IngestOutcome, StoreError> {
    let at = e.at.unix();
    let id = devices::resolve(conn, tenant, agent, e.device_id.as_str(), None, None, at).await?;
    sqlx::query(
        "INSERT INTO events (device_id, message_id, at, kind, body) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(message_id)
    .bind(at)
    .bind(event_kind(&e.event))
    .bind(json(&e.event)?)
    .execute(&mut *conn)
    .await?;
    match &e.event {
        DeviceEventKind::Reachable => devices::record_reach(conn, id, at, None).await?,
        DeviceEventKind::Unreachable { reason } => {
            devices::record_reach(conn, id, at, Some(reason.as_str())).await?;
        }
        _ => {}
    }
    if let DeviceEventKind::StatusChange {
        power,
        warnings,
        alarms,
    } = &e.event
    {
        let latest = devices::latest_status(conn, id).await?;
        if latest.as_ref().is_none_or(|(seen, _)| *seen <= at) {
            let mut status = latest.map(|(_, s)| s).unwrap_or_default();
            if power.is_some() {
                status.power = *power;
            }
            status.warnings = Some(warnings.clone());
            status.alarms = Some(alarms.clone());
            devices::upsert_status(conn, id, at, &status).await?;
        }
    }
    Ok(IngestOutcome::Stored)
}

async fn exception_log(
    conn: &mut AnyConnection,
    agent: AgentId,
    l: &AgentExceptionLog,
    message_id: &str,
) -> Result<IngestOutcome, StoreError> {
    for entry in l.entries.as_slice() {
        let severity = match entry.severity {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        sqlx::query(
            "INSERT INTO exception_logs (agent_id, message_id, at, severity, component, message) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(agent.to_string())
        .bind(message_id)
        .bind(entry.at.unix())
        .bind(severity)
        .bind(entry.component.as_str())
        .bind(entry.message.as_str())
        .execute(&mut *conn)
        .await?;
    }
    Ok(IngestOutcome::Stored)
}

async fn order_result(
    conn: &mut AnyConnection,
    agent: AgentId,
    r: &OrderResult,
    now: i64,
) -> Result<IngestOutcome, StoreError> {
    let target = match r.outcome {
        OrderOutcome::Accepted => OrderState::Accepted,
        OrderOutcome::Done => OrderState::Done,
        OrderOutcome::Failed { .. } => OrderState::Failed,
    };
    // One conditional update (never read then write): a result that overtook the
    // dispatcher's `delivered` mark is applied, a late mark then changes nothing.
    let result = Some(json(r)?);
    if super::orders::advance(conn, r.order_id, Some(agent), target, result, now).await? {
        return Ok(IngestOutcome::Stored);
    }
    let row = sqlx::query("SELECT state FROM orders WHERE id = $1 AND agent_id = $2")
        .bind(r.order_id.to_string())
        .bind(agent.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok(IngestOutcome::Rejected(RejectReason::UnknownOrder));
    };
    let current = OrderState::parse(&row.try_get::<String, _>(0)?)?;
    tracing::debug!(order = %r.order_id, from = current.as_str(), to = target.as_str(), "stale order result ignored");
    Ok(IngestOutcome::Stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database error with only a code, as the driver reports one.
    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "code {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn data(backend: Backend, code: &'static str) -> bool {
        is_data_error(backend, &Coded(code))
    }

    /// Only errors that blame the message reject it; the server's own trouble (a full disk, an
    /// I/O error, a lock, a missing table, a lost connection) fails the batch, so nothing is
    /// acknowledged that was not stored.
    #[test]
    fn only_the_datas_errors_reject_a_message() {
        use Backend::{Postgres, Sqlite};
        // TOOBIG, CONSTRAINT (NOT NULL 1299, UNIQUE 2067, FOREIGN KEY 787), MISMATCH, RANGE.
        for code in ["18", "19", "1299", "2067", "787", "20", "25"] {
            assert!(data(Sqlite, code), "SQLite {code} blames the data");
        }
        // ERROR, BUSY, LOCKED, READONLY, IOERR (and IOERR_FSYNC 1034), CORRUPT, FULL, CANTOPEN,
        // SCHEMA, MISUSE, NOTADB, a code this build does not know, and no number at all.
        for code in [
            "1", "5", "6", "8", "10", "1034", "11", "13", "14", "17", "21", "26", "99", "x",
        ] {
            assert!(!data(Sqlite, code), "SQLite {code} is the server's trouble");
        }
        // Data exceptions, integrity violations, a value too large for a limit.
        for code in ["22001", "22003", "22P02", "23505", "23503", "54000"] {
            assert!(data(Postgres, code), "PostgreSQL {code} blames the data");
        }
        // Disk full, out of memory, too many connections, syntax or privilege, connection
        // lost, serialization failure, admin shutdown, system I/O error, internal error, a
        // program limit other than a value's size.
        for code in [
            "53100", "53200", "53300", "42601", "42501", "08006", "40001", "57P01", "58030",
            "XX000", "54001", "22", "2300",
        ] {
            assert!(
                !data(Postgres, code),
                "PostgreSQL {code} is the server's trouble"
            );
        }
    }
}

//! Storage: one interface over SQLite (the default, one file in the data directory) and
//! PostgreSQL (for several server replicas), chosen once from the database URL.
//!
//! The SQL is written once, in the dialect both databases share, and runs through sqlx's
//! `Any` driver; the two schemas live in `migrations/sqlite` and `migrations/postgres`, are
//! applied by [`Store::open`] (forward only: a database newer than this build is refused) and
//! are kept equal by the storage test suite, which runs every test on both backends.
//!
//! Nothing outside this module touches the pool. Callers get role-limited handles:
//!
//! | handle | for | can |
//! |---|---|---|
//! | [`Store::ingest`] | the MQTT ingest path | group-commit batches, agent online/offline, agent access checks, security events |
//! | [`Store::orders`] | order dispatch | queued orders per agent, state changes, expiry |
//! | [`Store::enrollment`] | the enrollment endpoint | consume a token, create the agent, record its certificate |
//! | [`Store::admin`] | operator commands (CLI) | tenants, tokens, agents, revocation, every device, orders, retention, rejected messages |
//! | [`Store::tenant`] | a tenant's users | that tenant's devices and orders, nothing else |
//! | [`Store::accounts`] | `init`, account commands, the portal's login | accounts (admin or one tenant's user), generated passwords stored as argon2id hashes, password checks |
//!
//! ```no_run
//! # async fn demo() -> Result<(), epmc_server::store::StoreError> {
//! use epmc_server::store::Store;
//! let store = Store::open("sqlite:///var/lib/epmc/epmc.db").await?;
//! let tenant = store.admin().add_tenant("acme").await?;
//! let devices = store.tenant(tenant).devices().await?;
//! # let _ = devices; Ok(()) }
//! ```

mod accounts;
mod admin;
mod devices;
mod enroll;
mod error;
mod ingest;
mod migrate;
mod orders;
mod tenant;
mod types;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Connection, Executor};

pub use accounts::{Account, AccountRole, AccountsHandle, FIRST_ADMIN, GeneratedPassword};
pub use admin::{AdminHandle, PRUNE_CHUNK, ServiceCertificate};
pub use enroll::EnrollmentHandle;
pub use error::StoreError;
pub use ingest::{IngestHandle, IngestItem, IngestOutcome, PreparedBatch, RejectReason};
pub use migrate::SCHEMA_VERSION;
pub use orders::{DispatchLease, OrdersHandle, QueuedAgent};
pub use tenant::TenantHandle;
pub use types::{
    AgentAccess, AgentRecord, AgentState, DeviceDetails, DeviceSummary, EventRecord,
    ExceptionRecord, HistoryRecord, OrderRecord, OrderState, OrderTarget, PruneReport,
    RejectedMessage, SecurityEvent, Tenant, TenantId, Unreachable,
};

/// Which database a [`Store`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite: one file, WAL journal, `synchronous=FULL`, foreign keys on.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// Tunables of a [`Store`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StoreOptions {
    /// Most connections in the pool.
    pub max_connections: u32,
    /// How many bytes of a rejected payload are kept.
    pub rejected_raw_limit: usize,
    /// How long a connection is awaited (pool) and a SQLite lock is waited for.
    pub busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 8,
            rejected_raw_limit: 4096,
            busy_timeout: Duration::from_secs(10),
        }
    }
}

/// The store: cheap to clone, shared by every task of the server.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    pool: AnyPool,
    /// Where writes go: on SQLite a pool of one connection, on PostgreSQL `pool` itself.
    writer: AnyPool,
    /// Where the ingest path's commits go ([`Store::begin_ingest`]).
    ingest: IngestPool,
    backend: Backend,
    options: StoreOptions,
    /// SQLite: the background checkpoint copied the whole WAL as it found it, and the writer
    /// is to copy what was appended meanwhile before its next transaction, so that this one
    /// starts the WAL over (see [`Store::begin_on`]).
    wal_backfilled: std::sync::atomic::AtomicBool,
}

/// Where the ingest path's commits go.
enum IngestPool {
    /// SQLite: the writer's pool. A SQLite connection is a thread of its own that any runtime
    /// can talk to.
    Writer,
    /// PostgreSQL: see [`RuntimePool`].
    PerRuntime(Box<RuntimePool>),
}

/// PostgreSQL: a pool of the runtime that commits through it, normally the ingest writer's own
/// thread (`IngestConfig::own_writer_thread`), so that its sockets wake that thread directly.
/// Its connections are opened when first needed, on that runtime.
///
/// A socket belongs to the runtime it was opened on and fails once that runtime has ended (an
/// endpoint's writer thread, stopped; another one starts). The ping before each use does not
/// reliably tell: it succeeds while the socket's last known readiness still lets its write and
/// read through without waiting, and a statement of the transaction after it then fails with
/// "the Tokio context is being shut down". So a commit from another runtime than the pool's
/// gets a new pool, opened on its own runtime.
struct RuntimePool {
    options: AnyPoolOptions,
    connect: AnyConnectOptions,
    current: std::sync::Mutex<RuntimeSlot>,
}

/// The pool of [`RuntimePool`] and the runtime it belongs to.
#[derive(Default)]
struct RuntimeSlot {
    pool: Option<(tokio::runtime::Id, AnyPool)>,
    /// Set by [`Store::close`]: no new pool after it.
    closed: bool,
}

impl RuntimePool {
    /// The pool of the calling runtime; `None` once the store is closed.
    fn get(&self) -> Option<AnyPool> {
        let runtime = tokio::runtime::Handle::current().id();
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.closed {
            return None;
        }
        Some(match &current.pool {
            Some((id, pool)) if *id == runtime => pool.clone(),
            _ => {
                // Lazy: its connections are opened on this runtime, when first needed. The
                // pool it replaces, with its connections, goes when its last user lets it go.
                let pool = self.options.clone().connect_lazy_with(self.connect.clone());
                current.pool = Some((runtime, pool.clone()));
                pool
            }
        })
    }

    async fn close(&self) {
        let pool = {
            let mut current = self
                .current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            current.closed = true;
            current.pool.take()
        };
        if let Some((_, pool)) = pool {
            pool.close().await;
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.inner.backend)
            .finish_non_exhaustive()
    }
}

/// `url` with any password replaced by `***`, for logs and messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl Store {
    /// Opens the database a URL names (`sqlite://path`, `postgres://…`), applies pending
    /// migrations, and refuses a database whose schema is newer than this build.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        Store::open_with(url, StoreOptions::default()).await
    }

    /// The SQLite database `epmc.db` in `data_dir` (created if missing).
    pub async fn open_data_dir(
        data_dir: &Path,
        options: StoreOptions,
    ) -> Result<Store, StoreError> {
        let path = data_dir.join(crate::datadir::DATABASE);
        let path = path
            .to_str()
            .ok_or_else(|| StoreError::Invalid("the data directory path is not UTF-8".into()))?;
        Store::open_with(&format!("sqlite://{path}"), options).await
    }

    /// [`Store::open`] with options.
    pub async fn open_with(url: &str, options: StoreOptions) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if url.starts_with("sqlite:") {
            // Create the file when missing unless the URL says otherwise.
            let url = if url.contains("mode=") {
                url.to_owned()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            (Backend::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        let connect = AnyConnectOptions::from_str(&url)?;
        let pool_options = || {
            AnyPoolOptions::new()
                .max_connections(options.max_connections.max(1))
                .acquire_timeout(options.busy_timeout)
                // A SQLite connection is a thread of this process, not a socket that can
                // drop: no ping before each use (one round trip less per commit).
                .test_before_acquire(backend == Backend::Postgres)
                .after_release(|conn, _meta| Box::pin(release_check(conn)))
        };
        let (pool, writer, ingest) = match backend {
            Backend::Sqlite => {
                let busy_ms = options.busy_timeout.as_millis();
                // WAL is a property of the file: set it once on a first connection, then every
                // connection gets FULL sync, foreign keys and the lock wait.
                let mut first = sqlx::AnyConnection::connect_with(&connect).await?;
                first.execute("PRAGMA journal_mode = WAL").await?;
                first.close().await?;
                let pool = pool_options()
                    .after_connect(move |conn, _meta| Box::pin(sqlite_setup(conn, busy_ms)))
                    .connect_with(connect.clone())
                    .await?;
                // Writes take one connection of their own: SQLite has one writer at a time
                // anyway, and a connection keeps its page cache only while no other
                // connection writes, so the ingest commits find the pages they touch in
                // memory instead of reading them back every time.
                let writer = pool_options()
                    .max_connections(1)
                    .after_connect(move |conn, _meta| Box::pin(sqlite_setup(conn, busy_ms)))
                    .connect_with(connect)
                    .await?;
                (pool, writer, IngestPool::Writer)
            }
            Backend::Postgres => {
                let pool = pool_options().connect_with(connect.clone()).await?;
                let ingest = IngestPool::PerRuntime(Box::new(RuntimePool {
                    options: pool_options(),
                    connect,
                    current: std::sync::Mutex::default(),
                }));
                (pool.clone(), pool, ingest)
            }
        };
        let store = Store {
            inner: Arc::new(Inner {
                pool,
                writer,
                ingest,
                backend,
                options,
                wal_backfilled: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        migrate::run(&store).await?;
        if backend == Backend::Sqlite {
            tokio::spawn(checkpoint_loop(Arc::downgrade(&store.inner)));
        }
        tracing::info!(backend = ?backend, url = %redact_url(&url), "store opened");
        Ok(store)
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// The schema version of the open database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        migrate::current_version(&self.inner.pool).await
    }

    /// The value of a SQLite `PRAGMA` as seen by a pooled connection (`journal_mode`,
    /// `synchronous`, `foreign_keys`); `None` on PostgreSQL.
    pub async fn sqlite_pragma(&self, name: SqlitePragma) -> Result<Option<String>, StoreError> {
        if self.inner.backend != Backend::Sqlite {
            return Ok(None);
        }
        let sql = match name {
            SqlitePragma::JournalMode => "PRAGMA journal_mode",
            SqlitePragma::Synchronous => "PRAGMA synchronous",
            SqlitePragma::ForeignKeys => "PRAGMA foreign_keys",
        };
        let row = sqlx::query(sql).fetch_one(&self.inner.pool).await?;
        let value: String = match sqlx::Row::try_get::<String, _>(&row, 0) {
            Ok(s) => s,
            Err(_) => sqlx::Row::try_get::<i64, _>(&row, 0)?.to_string(),
        };
        Ok(Some(value))
    }

    /// The handle of the MQTT ingest path.
    pub fn ingest(&self) -> IngestHandle {
        IngestHandle::new(self.clone())
    }

    /// The handle of order dispatch.
    pub fn orders(&self) -> OrdersHandle {
        OrdersHandle::new(self.clone())
    }

    /// The handle of the enrollment endpoint.
    pub fn enrollment(&self) -> EnrollmentHandle {
        EnrollmentHandle::new(self.clone())
    }

    /// The handle for operator (admin) commands.
    pub fn admin(&self) -> AdminHandle {
        AdminHandle::new(self.clone())
    }

    /// The handle for accounts (people who log in).
    pub fn accounts(&self) -> AccountsHandle {
        AccountsHandle::new(self.clone())
    }

    /// A handle that sees only `tenant`'s devices and orders.
    pub fn tenant(&self, tenant: TenantId) -> TenantHandle {
        TenantHandle::new(self.clone(), tenant)
    }

    /// Closes the pool, waiting for connections to return.
    pub async fn close(&self) {
        if let IngestPool::PerRuntime(ingest) = &self.inner.ingest {
            ingest.close().await;
        }
        self.inner.writer.close().await;
        self.inner.pool.close().await;
    }

    fn pool(&self) -> &AnyPool {
        &self.inner.pool
    }

    /// A write transaction. On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`), so
    /// two writers queue on the busy timeout instead of failing on a lock upgrade.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        self.begin_on(&self.inner.writer).await
    }

    /// [`Store::begin_write`] for the ingest path's commits (batches, presence).
    async fn begin_ingest(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        let pool = match &self.inner.ingest {
            IngestPool::Writer => self.inner.writer.clone(),
            // Closed: the writer's pool, closed too, says so.
            IngestPool::PerRuntime(ingest) => {
                ingest.get().unwrap_or_else(|| self.inner.writer.clone())
            }
        };
        self.begin_on(&pool).await
    }

    /// A write transaction on `pool`.
    ///
    /// On SQLite the WAL starts over from its beginning (instead of growing) only when a write
    /// transaction begins with every frame of it copied into the database file. The
    /// background checkpoint rarely achieves that alone while the ingest commits every few
    /// milliseconds: by the time it has copied what it found, a commit has appended more. So
    /// after it has, the writer copies the rest itself (a few milliseconds of commits, against
    /// the second's worth the background copied) and the transaction that follows starts the
    /// WAL over. The WAL then holds about a second of commits, written into blocks the file
    /// already has. Without this it grew until a commit's own fallback checkpoint, at ~128 MiB
    /// (every 4 to 5 s at 5,000 snapshots/s), held that commit and every one behind it for as
    /// long as copying the whole WAL took.
    async fn begin_on(
        &self,
        pool: &AnyPool,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        use std::sync::atomic::Ordering;
        Ok(match self.inner.backend {
            Backend::Sqlite => {
                if self.inner.wal_backfilled.swap(false, Ordering::Relaxed)
                    && let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                        .fetch_optional(pool)
                        .await
                {
                    tracing::debug!(error = %e, "the writer's checkpoint failed");
                }
                pool.begin_with("BEGIN IMMEDIATE").await?
            }
            Backend::Postgres => pool.begin().await?,
        })
    }
}

/// How often the background task checkpoints the SQLite WAL.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// WAL pages (4 KiB) past which a commit checkpoints by itself: only when the background task
/// falls behind.
const FALLBACK_CHECKPOINT_PAGES: u32 = 32_000;

/// Copies the SQLite WAL into the database file every [`CHECKPOINT_EVERY`], on a connection
/// of the read pool, until the store is dropped or closed. A passive checkpoint waits for no
/// one and the writer goes on appending to the WAL meanwhile, so the commits (and the PUBACKs
/// behind them) no longer stop for the tens of milliseconds a checkpoint of thousands of pages
/// takes, as they did when the committing connection ran it.
async fn checkpoint_loop(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.pool.is_closed() {
            return;
        }
        // One row: whether it was blocked, the WAL's frames, and how many of them are now in
        // the database file.
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_optional(&inner.pool)
            .await
        {
            Ok(Some((0, frames, copied))) if frames > 0 && copied == frames => {
                inner
                    .wal_backfilled
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "background checkpoint failed; the next one retries");
            }
        }
    }
}

/// Whether a connection given back to the pool may be used again: not if it still counts a
/// transaction as open once the rollback its dropped transaction asked for has run.
///
/// SQLite ends a transaction itself on some errors (SQLITE_FULL, an I/O error): the ROLLBACK
/// that sqlx then sends fails ("no transaction is active"), and sqlx, still counting the
/// transaction as open, would refuse every later `BEGIN` on that connection ("non-zero
/// transaction depth"). The writer's pool has one connection, so one full disk would stop
/// every write for good, even after space came back. Such a connection is closed instead; the
/// pool opens a fresh one. A transaction that committed costs nothing here.
async fn release_check(conn: &mut sqlx::AnyConnection) -> Result<bool, sqlx::Error> {
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    // Answered after the rollback queued before it.
    conn.ping().await?;
    let reusable = !conn.is_in_transaction();
    if !reusable {
        tracing::warn!("a connection left in a transaction its database ended is closed");
    }
    Ok(reusable)
}

/// What every SQLite connection is set to (after `journal_mode = WAL` on the file).
async fn sqlite_setup(conn: &mut sqlx::AnyConnection, busy_ms: u128) -> Result<(), sqlx::Error> {
    conn.execute("PRAGMA synchronous = FULL").await?;
    conn.execute("PRAGMA foreign_keys = ON").await?;
    // Performance only (durability is `synchronous`'s): a page cache of up to 32 MiB instead
    // of 2 MiB, so the ingest commits find the index pages they touch without reading them
    // back from the file. Checkpoints (copying the WAL into the database file) are the
    // background task's (`checkpoint_loop`); a commit does one itself only if the WAL grows
    // past ~128 MiB anyway.
    conn.execute("PRAGMA cache_size = -32768").await?;
    conn.execute(sqlx::AssertSqlSafe(format!(
        "PRAGMA wal_autocheckpoint = {FALLBACK_CHECKPOINT_PAGES}"
    )))
    .await?;
    // Statement journals (what undoes one statement of a transaction) in memory: past 64 KiB
    // SQLite would spill each to a temporary file, created and deleted for every large
    // multi-row statement of an ingest commit.
    conn.execute("PRAGMA temp_store = MEMORY").await?;
    conn.execute(sqlx::AssertSqlSafe(format!(
        "PRAGMA busy_timeout = {busy_ms}"
    )))
    .await?;
    Ok(())
}

/// SQLite settings [`Store::sqlite_pragma`] can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqlitePragma {
    /// `journal_mode` (expected `wal`).
    JournalMode,
    /// `synchronous` (expected `2`, FULL).
    Synchronous,
    /// `foreign_keys` (expected `1`).
    ForeignKeys,
}

/// The current time, Unix seconds.
fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::{IngestItem, IngestOutcome, Store, redact_url};

    /// The WAL reaches the database file without any commit checkpointing (the commits' own
    /// threshold is far above what is written here).
    #[tokio::test]
    async fn the_background_task_checkpoints_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("epmc.db");
        let store = Store::open(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let size = || std::fs::metadata(&db).unwrap().len();
        let before = size();
        let wal = dir.path().join("epmc.db-wal");
        for i in 0..200 {
            store
                .admin()
                .add_tenant(&format!("tenant {i:03} {}", "x".repeat(50)))
                .await
                .unwrap();
        }
        assert!(std::fs::metadata(&wal).unwrap().len() > 200 * 4096);
        let grown = async {
            while size() <= before + 16 * 1024 {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), grown)
            .await
            .unwrap_or_else(|_| panic!("the database file stayed at {} bytes", size()));
        store.close().await;
    }

    /// With commits coming back to back, the WAL still starts over after the background
    /// checkpoints instead of growing: its header's checkpoint sequence number, which each
    /// restart increments, moves on while the writes go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_while_writes_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("epmc.db");
        let store = Store::open(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let wal = dir.path().join("epmc.db-wal");
        // Bytes 12..16 of the WAL header: the checkpoint sequence number.
        let sequence = || {
            use std::io::Read;
            let mut header = [0u8; 16];
            std::fs::File::open(&wal)
                .ok()?
                .read_exact(&mut header)
                .ok()?;
            Some(u32::from_be_bytes([
                header[12], header[13], header[14], header[15],
            ]))
        };
        let tenant = store.admin().add_tenant("acme").await.unwrap();
        let agent = store.admin().create_agent(tenant, "agent").await.unwrap();
        // Ingest commits (the path that checkpoints before it begins), one after the other,
        // until told to stop.
        let commits = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writes = {
            let (store, commits, stop) = (store.clone(), commits.clone(), stop.clone());
            tokio::spawn(async move {
                use std::sync::atomic::Ordering::Relaxed;
                while !stop.load(Relaxed) {
                    let batch: Vec<IngestItem> = (0..10)
                        .map(|d| {
                            let snapshot = epmc_proto::model::DeviceSnapshot {
                                device_id: format!("S{d}").as_str().try_into().unwrap(),
                                observed_at: epmc_proto::bounded::Timestamp::now(),
                                status: epmc_proto::sample::status(),
                            };
                            let envelope =
                                epmc_proto::Envelope::new(epmc_proto::Message::Snapshot(snapshot));
                            IngestItem::new(
                                agent,
                                epmc_proto::topic::Channel::Telemetry,
                                envelope.to_json().unwrap(),
                            )
                        })
                        .collect();
                    let out = store.ingest().ingest_batch(&batch).await.unwrap();
                    assert!(out.iter().all(|o| *o == IngestOutcome::Stored));
                    commits.fetch_add(1, Relaxed);
                }
            })
        };
        // Watch the sequence number, from the first commit on, until it moved twice (one restart
        // a second is expected; without the writer's part, none at all), noting how many
        // commits came in between.
        // The minute is only a bound for the failing case; no speed is asserted.
        let start = std::time::Instant::now();
        let mut seen: Vec<(u32, u32)> = Vec::new();
        while seen.len() < 3 && start.elapsed() < std::time::Duration::from_secs(60) {
            // From the first commit on: the set-up's writes may restart the WAL once before.
            let n = commits.load(std::sync::atomic::Ordering::Relaxed);
            if let Some(s) = sequence()
                && n > 0
                && seen.last().is_none_or(|(last, _)| *last != s)
            {
                seen.push((s, n));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writes.await.unwrap();
        assert!(
            seen.len() >= 3,
            "WAL checkpoint sequence numbers (and commits so far) seen in a minute of writes: {seen:?}"
        );
        // The writes went on between the two restarts: they did not wait for them. (Not
        // between the first observation and the first restart: a restart is seen as its
        // transaction begins, possibly with no commit completed since that observation.)
        assert!(
            seen[2].1 > seen[1].1,
            "commits between the restarts: {seen:?}"
        );
        store.close().await;
    }

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://epmc:s3cret@db.example:5432/epmc?sslmode=require"),
            "postgres://epmc:***@db.example:5432/epmc?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1:5432/x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(redact_url("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
    }
}

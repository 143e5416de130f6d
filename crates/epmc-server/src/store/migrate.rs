//! Embedded, forward-only migrations with a `epmc_schema_version` table.
//!
//! Each migration exists once per backend (`migrations/sqlite`, `migrations/postgres`); the
//! storage test suite runs on both, which keeps them equal. A database whose version is newer
//! than [`SCHEMA_VERSION`] is refused: this build would not understand it.

use sqlx::{AnyPool, Row};

use super::{Backend, Store, StoreError, now_unix};

struct Migration {
    version: i64,
    description: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "initial schema",
        sqlite: include_str!("../../migrations/sqlite/0001_initial.sql"),
        postgres: include_str!("../../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        description: "accounts",
        sqlite: include_str!("../../migrations/sqlite/0002_accounts.sql"),
        postgres: include_str!("../../migrations/postgres/0002_accounts.sql"),
    },
    Migration {
        version: 3,
        description: "service certificates",
        sqlite: include_str!("../../migrations/sqlite/0003_service_certificates.sql"),
        postgres: include_str!("../../migrations/postgres/0003_service_certificates.sql"),
    },
    Migration {
        version: 4,
        description: "room in the latest-status pages for updates in place",
        sqlite: include_str!("../../migrations/sqlite/0004_status_fillfactor.sql"),
        postgres: include_str!("../../migrations/postgres/0004_status_fillfactor.sql"),
    },
    Migration {
        version: 5,
        description: "message ids pruned by arrival time",
        sqlite: include_str!("../../migrations/sqlite/0005_prune_message_ids.sql"),
        postgres: include_str!("../../migrations/postgres/0005_prune_message_ids.sql"),
    },
    Migration {
        version: 6,
        description: "agents' exception logs pruned by time",
        sqlite: include_str!("../../migrations/sqlite/0006_prune_exception_logs.sql"),
        postgres: include_str!("../../migrations/postgres/0006_prune_exception_logs.sql"),
    },
    Migration {
        version: 7,
        description: "device reachability from the agents' events",
        sqlite: include_str!("../../migrations/sqlite/0007_device_reachability.sql"),
        postgres: include_str!("../../migrations/postgres/0007_device_reachability.sql"),
    },
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 7;

const CREATE_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS epmc_schema_version (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)";

/// Brings the schema up to [`SCHEMA_VERSION`] in one transaction, or refuses a newer one.
pub(super) async fn run(store: &Store) -> Result<(), StoreError> {
    debug_assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(SCHEMA_VERSION));
    let mut tx = store.begin_write().await?;
    if store.backend() == Backend::Postgres {
        // Several replicas may start at once: one migrates, the others wait and see it done.
        sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock(7079712467)) AS l")
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(CREATE_VERSION_TABLE).execute(&mut *tx).await?;
    let found: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM epmc_schema_version")
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > found) {
        let sql = match store.backend() {
            Backend::Sqlite => m.sqlite,
            Backend::Postgres => m.postgres,
        };
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO epmc_schema_version (version, description, applied_at) VALUES ($1, $2, $3)",
        )
        .bind(m.version)
        .bind(m.description)
        .bind(now_unix())
        .execute(&mut *tx)
        .await?;
        tracing::info!(version = m.version, "applied migration: {}", m.description);
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn current_version(pool: &AnyPool) -> Result<i64, StoreError> {
    Ok(
        sqlx::query("SELECT COALESCE(MAX(version), 0) FROM epmc_schema_version")
            .fetch_one(pool)
            .await?
            .try_get(0)?,
    )
}

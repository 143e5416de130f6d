//! A PostgreSQL schema of its own for one test, on the server `EPMC_TEST_POSTGRES_URL` names
//! (`scripts/test` starts one with `scripts/pg-test`). Shared by the test files that run on
//! PostgreSQL (`mod pg;`).

use sqlx::Connection;

/// The URL of a new, empty schema (tables land in it through `search_path`), so tests run in
/// parallel on one server. `None` when `EPMC_TEST_POSTGRES_URL` is unset: the PostgreSQL test
/// is skipped, except with `CI=true`, where it must run and this panics instead.
pub async fn schema_url() -> Option<String> {
    let Ok(base) = std::env::var("EPMC_TEST_POSTGRES_URL") else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI=true but EPMC_TEST_POSTGRES_URL is unset: the PostgreSQL tests must run in CI \
             (scripts/test starts a server with scripts/pg-test)"
        );
        eprintln!("EPMC_TEST_POSTGRES_URL unset: PostgreSQL test skipped");
        return None;
    };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&base)
        .await
        .expect("connect to EPMC_TEST_POSTGRES_URL");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut admin)
        .await
        .expect("create schema");
    admin.close().await.expect("close");
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

//! The enrollment endpoint's handle: a token is consumed once, then the agent is created and
//! its certificate recorded.

use epmc_proto::bounded::Timestamp;
use epmc_proto::topic::AgentId;
use sqlx::Row;

use super::types::tenant_id;
use super::{Store, StoreError, TenantId};

/// Enrollment's handle.
#[derive(Clone, Debug)]
pub struct EnrollmentHandle {
    store: Store,
}

impl EnrollmentHandle {
    pub(super) fn new(store: Store) -> EnrollmentHandle {
        EnrollmentHandle { store }
    }

    /// Uses an enrollment token, given by the lowercase hex SHA-256 of its secret (see
    /// [`super::AdminHandle::register_token`]): returns its tenant, exactly once, and only
    /// before it expires at `now`. One statement marks it used, so of two concurrent attempts
    /// one wins.
    pub async fn consume_token_hash(
        &self,
        secret_sha256_hex: &str,
        now: Timestamp,
    ) -> Result<TenantId, StoreError> {
        let row = sqlx::query(
            "UPDATE enrollment_tokens SET used_at = $2 \
             WHERE secret_hash = $1 AND used_at IS NULL AND expires_at > $2 RETURNING tenant_id",
        )
        .bind(secret_sha256_hex)
        .bind(now.unix())
        .fetch_optional(self.store.pool())
        .await?
        .ok_or(StoreError::TokenRefused)?;
        tenant_id(&row.try_get::<String, _>(0)?)
    }

    /// Creates the enrolling agent in `tenant`.
    pub async fn create_agent(&self, tenant: TenantId, name: &str) -> Result<AgentId, StoreError> {
        super::admin::create_agent(&self.store, tenant, name).await
    }

    /// Records the certificate issued to the agent.
    pub async fn record_certificate(
        &self,
        agent: AgentId,
        serial: &str,
        not_after: Timestamp,
    ) -> Result<(), StoreError> {
        super::admin::record_certificate(&self.store, agent, serial, not_after).await
    }
}

//! A tenant's handle: it sees that tenant's devices, agents and orders and nothing else.

use epmc_proto::bounded::Timestamp;
use epmc_proto::order::OrderAction;
use uuid::Uuid;

use super::{
    AgentRecord, DeviceDetails, DeviceSummary, EventRecord, HistoryRecord, OrderRecord,
    OrderTarget, Store, StoreError, TenantId,
};

/// The handle of one tenant.
#[derive(Clone, Debug)]
pub struct TenantHandle {
    store: Store,
    tenant: TenantId,
}

impl TenantHandle {
    pub(super) fn new(store: Store, tenant: TenantId) -> TenantHandle {
        TenantHandle { store, tenant }
    }

    /// The tenant.
    pub fn id(&self) -> TenantId {
        self.tenant
    }

    /// The tenant's devices with their latest status and last contact.
    pub async fn devices(&self) -> Result<Vec<DeviceSummary>, StoreError> {
        let mut conn = self.store.pool().acquire().await?;
        super::devices::list(&mut conn, Some(self.tenant)).await
    }

    /// One of the tenant's devices; [`StoreError::NotFound`] for another tenant's.
    pub async fn device(&self, device: i64) -> Result<DeviceSummary, StoreError> {
        let mut conn = self.store.pool().acquire().await?;
        super::devices::get(&mut conn, Some(self.tenant), device)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// One of the tenant's devices with its collected info, settings and logs.
    pub async fn device_details(&self, device: i64) -> Result<DeviceDetails, StoreError> {
        let mut conn = self.store.pool().acquire().await?;
        super::devices::details(&mut conn, Some(self.tenant), device)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// The latest events of one of the tenant's devices, newest first.
    pub async fn events(&self, device: i64, limit: u32) -> Result<Vec<EventRecord>, StoreError> {
        let mut conn = self.store.pool().acquire().await?;
        super::devices::events(&mut conn, Some(self.tenant), device, limit).await
    }

    /// The history series of one of the tenant's devices, oldest first.
    pub async fn history(&self, device: i64) -> Result<Vec<HistoryRecord>, StoreError> {
        let mut conn = self.store.pool().acquire().await?;
        super::devices::history(&mut conn, Some(self.tenant), device).await
    }

    /// The tenant's agents.
    pub async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        super::admin::agents(&self.store, Some(self.tenant)).await
    }

    /// An order for one of the tenant's devices or agents; [`StoreError::NotFound`] for
    /// another tenant's.
    pub async fn create_order(
        &self,
        target: OrderTarget,
        action: &OrderAction,
        issued_by: &str,
        expires_at: Timestamp,
    ) -> Result<Uuid, StoreError> {
        super::orders::create(
            &self.store,
            Some(self.tenant),
            target,
            action,
            issued_by,
            expires_at,
        )
        .await
    }

    /// One of the tenant's orders.
    pub async fn order(&self, order: Uuid) -> Result<OrderRecord, StoreError> {
        super::orders::get(&self.store, Some(self.tenant), order).await
    }
}

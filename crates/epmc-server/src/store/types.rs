//! Values the store hands out and takes.

use std::fmt;

use epmc_proto::bounded::Timestamp;
use epmc_proto::model::DeviceStatus;
use epmc_proto::order::OrderAction;
use epmc_proto::topic::AgentId;
use uuid::Uuid;

use super::StoreError;

/// A tenant's id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Uuid);

impl TenantId {
    /// Wraps a UUID.
    pub fn new(id: Uuid) -> TenantId {
        TenantId(id)
    }

    /// The UUID.
    pub fn uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({self})")
    }
}

/// A tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    /// Its id.
    pub id: TenantId,
    /// Its unique name.
    pub name: String,
    /// When it was added.
    pub created_at: Timestamp,
}

/// Connection state of an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentState {
    /// Never connected.
    Never,
    /// Connected.
    Online,
    /// Disconnected.
    Offline,
}

impl AgentState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AgentState::Never => "never",
            AgentState::Online => "online",
            AgentState::Offline => "offline",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<AgentState, StoreError> {
        Ok(match s {
            "never" => AgentState::Never,
            "online" => AgentState::Online,
            "offline" => AgentState::Offline,
            other => return Err(StoreError::corrupt(format!("agent state {other:?}"))),
        })
    }
}

/// An agent as the store knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentRecord {
    /// Its id (certificate CN).
    pub id: AgentId,
    /// Its tenant.
    pub tenant: TenantId,
    /// Name given at creation.
    pub name: String,
    /// Product code from its last hello.
    pub agent_code: Option<String>,
    /// Software version from its last hello.
    pub version: Option<String>,
    /// Online, offline or never seen.
    pub state: AgentState,
    /// Last connect, disconnect or message.
    pub last_seen: Option<Timestamp>,
    /// Serial of its current certificate.
    pub cert_serial: Option<String>,
    /// When it was revoked.
    pub revoked_at: Option<Timestamp>,
}

/// What the connection layer may let an agent do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentAccess {
    /// No such agent.
    Unknown,
    /// The agent was revoked.
    Revoked,
    /// An enrolled agent of this tenant.
    Active(TenantId),
}

/// A device with its latest status, as listed for operators and tenants.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSummary {
    /// The store's id for the device (stable across the ip → serial merge).
    pub id: i64,
    /// The id the agent uses: the serial number, or `ip:ADDR` until the serial is known.
    pub key: String,
    /// Serial number, when known.
    pub serial: Option<String>,
    /// Its tenant.
    pub tenant: TenantId,
    /// The agent that reports it.
    pub agent: AgentId,
    /// Display name (operator's, else the projector's own).
    pub name: Option<String>,
    /// Last known IP address.
    pub address: Option<String>,
    /// First report.
    pub first_seen: Timestamp,
    /// Latest report about the device.
    pub last_contact: Timestamp,
    /// Latest status and when it was observed.
    pub status: Option<(Timestamp, DeviceStatus)>,
    /// Set while its agent cannot reach it: the agent's latest word on it was `unreachable`
    /// and no status was observed after that.
    pub unreachable: Option<Unreachable>,
}

/// A device its agent cannot reach, as the agent said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreachable {
    /// When the agent found it unreachable.
    pub since: Timestamp,
    /// Why, as the agent saw it (e.g. "connection refused").
    pub reason: String,
}

/// Everything stored about one device: what [`DeviceSummary`] has plus the latest
/// collection's info, settings and logs, and the settings the agent keeps for it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceDetails {
    /// The summary (status, last contact).
    pub summary: DeviceSummary,
    /// Group from the agent's settings.
    pub group_name: Option<String>,
    /// Operator's comment from the agent's settings.
    pub comment: Option<String>,
    /// Device information from the latest collection.
    pub info: Option<epmc_proto::model::DeviceInfo>,
    /// Projector settings from the latest collection.
    pub settings: Option<epmc_proto::model::DeviceSettings>,
    /// Device logs from the latest collection.
    pub logs: Option<epmc_proto::model::DeviceLogs>,
}

/// State of an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrderState {
    /// Waiting to be sent to the agent.
    Queued,
    /// Handed to the agent's connection.
    Delivered,
    /// The agent recorded it.
    Accepted,
    /// Done.
    Done,
    /// Failed.
    Failed,
    /// Accepted but no result before it expired.
    TimedOut,
    /// Expired before the agent accepted it.
    Expired,
}

impl OrderState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::Queued => "queued",
            OrderState::Delivered => "delivered",
            OrderState::Accepted => "accepted",
            OrderState::Done => "done",
            OrderState::Failed => "failed",
            OrderState::TimedOut => "timed_out",
            OrderState::Expired => "expired",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<OrderState, StoreError> {
        Ok(match s {
            "queued" => OrderState::Queued,
            "delivered" => OrderState::Delivered,
            "accepted" => OrderState::Accepted,
            "done" => OrderState::Done,
            "failed" => OrderState::Failed,
            "timed_out" => OrderState::TimedOut,
            "expired" => OrderState::Expired,
            other => return Err(StoreError::corrupt(format!("order state {other:?}"))),
        })
    }

    /// Whether an order may move from `self` to `to`. Results from the agent (done, failed)
    /// win over the server's own expiry, which may have raced them.
    pub fn may_become(self, to: OrderState) -> bool {
        use OrderState::*;
        match to {
            Queued => false,
            Delivered => self == Queued,
            Accepted => matches!(self, Queued | Delivered),
            Done | Failed => matches!(self, Queued | Delivered | Accepted | TimedOut | Expired),
            Expired => matches!(self, Queued | Delivered),
            TimedOut => self == Accepted,
        }
    }
}

/// What an order is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderTarget {
    /// A device (by [`DeviceSummary::id`]); the order goes to the agent that reports it.
    Device(i64),
    /// The agent itself (e.g. `check_agent_update`).
    Agent(AgentId),
}

/// An order as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct OrderRecord {
    /// Its id.
    pub id: Uuid,
    /// Its tenant.
    pub tenant: TenantId,
    /// The agent that executes it.
    pub agent: AgentId,
    /// The device ([`DeviceSummary::id`]), absent for agent-wide orders.
    pub device: Option<i64>,
    /// The device id as the agent knows it (serial or `ip:ADDR`).
    pub device_key: Option<String>,
    /// What to do.
    pub action: OrderAction,
    /// Who issued it.
    pub issued_by: String,
    /// Its state.
    pub state: OrderState,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it expires.
    pub expires_at: Timestamp,
    /// Last state change.
    pub updated_at: Timestamp,
    /// The agent's last result (the `order_result` body as JSON).
    pub result: Option<serde_json::Value>,
}

impl OrderRecord {
    /// The order message to send to the agent.
    pub fn to_message(&self) -> Result<epmc_proto::order::Order, StoreError> {
        let device_id = match &self.device_key {
            Some(k) => Some(k.as_str().try_into().map_err(StoreError::corrupt)?),
            None => None,
        };
        Ok(epmc_proto::order::Order {
            order_id: self.id,
            device_id,
            action: self.action.clone(),
            issued_by: self
                .issued_by
                .as_str()
                .try_into()
                .map_err(StoreError::corrupt)?,
            expires_at: Some(self.expires_at),
        })
    }
}

/// What [`AdminHandle::prune`](super::AdminHandle::prune) removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// History series rows whose last sample was older.
    pub history: u64,
    /// Events older.
    pub events: u64,
    /// Agents' exception-log entries older (they arrive on the events channel).
    pub exception_logs: u64,
    /// Records of message ids received before the cut.
    pub message_ids: u64,
    /// Rejected messages received before the cut.
    pub rejected: u64,
    /// Replicas' certificates that expired before the cut.
    pub service_certificates: u64,
}

/// A message that was acknowledged but not applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedMessage {
    /// When it arrived.
    pub at: Timestamp,
    /// The publishing agent.
    pub agent: String,
    /// Its topic.
    pub topic: String,
    /// Why it was not applied.
    pub reason: String,
    /// Its first bytes (up to the configured limit).
    pub raw: Vec<u8>,
    /// Its full length.
    pub raw_len: u64,
}

/// A security-relevant event (identity or topic violation, revoked certificate, …).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityEvent {
    /// When.
    pub at: Timestamp,
    /// A short machine-readable kind, e.g. `client_id_mismatch`.
    pub kind: String,
    /// The agent involved, when known.
    pub agent: Option<String>,
    /// The peer address, when known.
    pub peer: Option<String>,
    /// Details for humans.
    pub detail: String,
}

/// A stored device event.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRecord {
    /// The envelope id of the message that carried it.
    pub message_id: Uuid,
    /// When the agent saw it.
    pub at: Timestamp,
    /// What happened.
    pub event: epmc_proto::model::DeviceEventKind,
}

/// A stored history series (or error/warning record list, with `interval_seconds` 0).
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryRecord {
    /// `usage_minutes`, `temperature_celsius`, `ac_voltage_volts`, `errors` or `warnings`.
    pub series: String,
    /// First sample or record.
    pub start: Timestamp,
    /// Last sample or record.
    pub end: Timestamp,
    /// Seconds between samples; 0 for record lists.
    pub interval_seconds: i64,
    /// The samples (an array of numbers or nulls) or records, as JSON.
    pub data: serde_json::Value,
}

/// A stored agent exception-log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExceptionRecord {
    /// When it happened.
    pub at: Timestamp,
    /// `info`, `warning` or `error`.
    pub severity: String,
    /// Part of the agent.
    pub component: String,
    /// What happened.
    pub message: String,
}

pub(crate) fn ts(unix: i64) -> Result<Timestamp, StoreError> {
    Timestamp::from_unix(unix).map_err(StoreError::corrupt)
}

pub(crate) fn opt_ts(unix: Option<i64>) -> Result<Option<Timestamp>, StoreError> {
    unix.map(ts).transpose()
}

pub(crate) fn uuid(s: &str) -> Result<Uuid, StoreError> {
    Uuid::try_parse(s).map_err(StoreError::corrupt)
}

pub(crate) fn agent_id(s: &str) -> Result<AgentId, StoreError> {
    AgentId::parse(s).map_err(StoreError::corrupt)
}

pub(crate) fn tenant_id(s: &str) -> Result<TenantId, StoreError> {
    uuid(s).map(TenantId)
}

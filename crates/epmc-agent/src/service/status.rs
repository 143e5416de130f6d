//! What the agent knows about each target right now: the data behind `epmc-agent status`.
//!
//! The running service keeps a [`StatusTable`] and writes it, with the state of its server
//! connection, to `status.json` in its state directory every few seconds (atomically, so a
//! reader never sees half a file). `epmc-agent status` reads that file: it needs no access to
//! the service itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use epmc_proto::model::DeviceStatus;
use serde::{Deserialize, Serialize};

/// How a target answered the last time the agent tried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum Reach {
    /// Not tried yet.
    Unknown,
    /// Answered.
    Ok,
    /// Another controller holds its session (ESC/VP.net 0x53): not a fault, retried later.
    Busy,
    /// Did not answer or refused us; the reason as the agent saw it.
    Failed(String),
}

/// One target on the agent screen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// Where it is reached.
    pub addr: SocketAddr,
    /// Its device id (serial number, or `ip:` until the serial is known).
    pub device_id: Option<String>,
    /// The operator's display name.
    pub display_name: Option<String>,
    /// The group it belongs to.
    pub group: Option<String>,
    /// `hold` or `poll`.
    pub session: String,
    /// The last attempt's outcome.
    pub reach: Reach,
    /// The latest status read.
    pub status: Option<DeviceStatus>,
    /// Unix time of the last successful contact.
    pub last_contact: Option<i64>,
    /// Consecutive failed attempts.
    pub failures: u32,
    /// Successful reads (status or full) since the service started.
    #[serde(default)]
    pub reads: u64,
    /// Failed attempts since the service started.
    #[serde(default)]
    pub failed_attempts: u64,
}

/// The whole agent screen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent id.
    pub agent_id: String,
    /// The agent's version.
    pub version: String,
    /// `bidirectional` or `monitor-only`.
    pub mode: String,
    /// Unix time this was written.
    pub written_at: i64,
    /// Whether the server connection is up.
    pub server_connected: bool,
    /// The server connection's latest error.
    pub server_error: Option<String>,
    /// Messages waiting in the outbox.
    pub outbox_messages: usize,
    /// Messages held in memory because the outbox could not take them (a full disk).
    #[serde(default)]
    pub held_messages: usize,
    /// Orders recorded and not finished.
    pub orders_in_progress: usize,
    /// Every target, by address.
    pub targets: Vec<TargetStatus>,
}

/// The service's live table, shared by the device tasks.
#[derive(Clone, Debug, Default)]
pub struct StatusTable(Arc<Mutex<BTreeMap<SocketAddr, TargetStatus>>>);

impl StatusTable {
    /// Adds a target (not tried yet).
    pub fn insert(&self, entry: TargetStatus) {
        self.lock().insert(entry.addr, entry);
    }

    /// Changes one target's entry.
    pub fn update(&self, addr: SocketAddr, f: impl FnOnce(&mut TargetStatus)) {
        if let Some(e) = self.lock().get_mut(&addr) {
            f(e);
        }
    }

    /// Every entry, by address.
    pub fn snapshot(&self) -> Vec<TargetStatus> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SocketAddr, TargetStatus>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The file name in the state directory.
pub const STATUS_FILE: &str = "status.json";

/// Writes the status file atomically.
pub fn write(state_dir: &Path, status: &AgentStatus) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    super::write_atomically(&state_dir.join(STATUS_FILE), &json)
}

/// Reads the status file a running (or stopped) agent wrote.
pub fn read(state_dir: &Path) -> Result<AgentStatus, String> {
    let path = state_dir.join(STATUS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| {
        format!(
            "cannot read {}: {e} (has `epmc-agent run` been started with this directory?)",
            path.display()
        )
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not a status file: {e}", path.display()))
}

//! Devices: finding a device's row from what an agent calls it, the `ip:ADDR` → serial merge,
//! latest status, and listing.

use epmc_proto::model::DeviceStatus;
use epmc_proto::topic::AgentId;
use sqlx::{AnyConnection, Row};

use super::types::{agent_id, tenant_id, ts};
use super::{
    DeviceDetails, DeviceSummary, EventRecord, HistoryRecord, StoreError, TenantId, Unreachable,
};

/// A device's last contact, for `devices d LEFT JOIN device_status s`: the later of
/// `devices.last_contact` and its latest status's time. The ingest of status snapshots writes
/// only `device_status` (one row per snapshot instead of two), so a snapshot's time is the
/// device's last contact through `s.observed_at`; the other messages write `last_contact`.
macro_rules! last_contact {
    () => {
        "CASE WHEN s.observed_at > d.last_contact THEN s.observed_at ELSE d.last_contact END"
    };
}

pub(super) const IP_PREFIX: &str = "ip:";

/// The row of the device `device_key` (a serial or `ip:ADDR`) reported by `agent`, created if
/// new. `serial` (from the device's info) and `address` (from its settings) let a device
/// first seen as `ip:ADDR` be merged into its serial's row, keeping its history, events and
/// orders.
pub(super) async fn resolve(
    conn: &mut AnyConnection,
    tenant: TenantId,
    agent: AgentId,
    device_key: &str,
    serial: Option<&str>,
    address: Option<&str>,
    seen_at: i64,
) -> Result<i64, StoreError> {
    let serial = serial.filter(|s| !s.is_empty() && !s.starts_with(IP_PREFIX));
    if let Some(addr) = device_key.strip_prefix(IP_PREFIX) {
        let ip_row = find_ip_row(conn, agent, device_key).await?;
        if let Some(serial) = serial {
            return merge_into_serial(conn, tenant, agent, ip_row, serial, Some(addr), seen_at)
                .await;
        }
        if let Some(id) = ip_row {
            touch(conn, id, agent, None, seen_at).await?;
            return Ok(id);
        }
        // Already merged: the agent still uses the address it first knew.
        let merged: Option<i64> = sqlx::query(concat!(
            "SELECT d.id FROM devices d LEFT JOIN device_status s ON s.device_id = d.id \
             WHERE d.agent_id = $1 AND d.address = $2 AND d.serial IS NOT NULL ORDER BY ",
            last_contact!(),
            " DESC LIMIT 1"
        ))
        .bind(agent.to_string())
        .bind(addr)
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
        if let Some(id) = merged {
            touch(conn, id, agent, None, seen_at).await?;
            return Ok(id);
        }
        let id: i64 = sqlx::query(
            "INSERT INTO devices (tenant_id, agent_id, ip_key, address, first_seen, last_contact) \
             VALUES ($1, $2, $3, $4, $5, $5) RETURNING id",
        )
        .bind(tenant.to_string())
        .bind(agent.to_string())
        .bind(device_key)
        .bind(addr)
        .bind(seen_at)
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
        Ok(id)
    } else {
        let ip_row = match address {
            Some(addr) => find_ip_row(conn, agent, &format!("{IP_PREFIX}{addr}")).await?,
            None => None,
        };
        merge_into_serial(conn, tenant, agent, ip_row, device_key, address, seen_at).await
    }
}

async fn find_ip_row(
    conn: &mut AnyConnection,
    agent: AgentId,
    ip_key: &str,
) -> Result<Option<i64>, StoreError> {
    Ok(
        sqlx::query("SELECT id FROM devices WHERE agent_id = $1 AND ip_key = $2")
            .bind(agent.to_string())
            .bind(ip_key)
            .fetch_optional(&mut *conn)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?,
    )
}

async fn touch(
    conn: &mut AnyConnection,
    id: i64,
    agent: AgentId,
    address: Option<&str>,
    seen_at: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE devices SET agent_id = $2, address = COALESCE($3, address), \
         last_contact = CASE WHEN last_contact < $4 THEN $4 ELSE last_contact END WHERE id = $1",
    )
    .bind(id)
    .bind(agent.to_string())
    .bind(address)
    .bind(seen_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn merge_into_serial(
    conn: &mut AnyConnection,
    tenant: TenantId,
    agent: AgentId,
    ip_row: Option<i64>,
    serial: &str,
    address: Option<&str>,
    seen_at: i64,
) -> Result<i64, StoreError> {
    let serial_row: Option<i64> =
        sqlx::query("SELECT id FROM devices WHERE tenant_id = $1 AND serial = $2")
            .bind(tenant.to_string())
            .bind(serial)
            .fetch_optional(&mut *conn)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
    let id = match (ip_row, serial_row) {
        (None, None) => {
            return Ok(sqlx::query(
                "INSERT INTO devices (tenant_id, agent_id, serial, address, first_seen, last_contact) \
                 VALUES ($1, $2, $3, $4, $5, $5) RETURNING id",
            )
            .bind(tenant.to_string())
            .bind(agent.to_string())
            .bind(serial)
            .bind(address)
            .bind(seen_at)
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?);
        }
        (None, Some(q)) => q,
        (Some(p), None) => {
            // The address row becomes the serial's row: same id, so nothing else moves.
            sqlx::query("UPDATE devices SET serial = $2, ip_key = NULL WHERE id = $1")
                .bind(p)
                .bind(serial)
                .execute(&mut *conn)
                .await?;
            tracing::info!(
                device = p,
                "device merged: address row now carries its serial"
            );
            p
        }
        (Some(p), Some(q)) => {
            merge_rows(conn, p, q).await?;
            tracing::info!(from = p, into = q, "device merged into its serial's row");
            q
        }
    };
    touch(conn, id, agent, address, seen_at).await?;
    Ok(id)
}

/// Records what an agent said about reaching device `id` at `at` (`unreachable`: why not;
/// `None`: it answers), unless it already said something later.
pub(super) async fn record_reach(
    conn: &mut AnyConnection,
    id: i64,
    at: i64,
    unreachable: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE devices SET reach_at = $2, unreachable_reason = $3 \
         WHERE id = $1 AND COALESCE(reach_at, -1) <= $2",
    )
    .bind(id)
    .bind(at)
    .bind(unreachable)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Moves everything of device row `from` to row `into` and deletes `from`.
async fn merge_rows(conn: &mut AnyConnection, from: i64, into: i64) -> Result<(), StoreError> {
    for sql in [
        "UPDATE events SET device_id = $2 WHERE device_id = $1",
        "UPDATE orders SET device_id = $2 WHERE device_id = $1",
        // A series both rows hold (same start): the serial row's copy stays.
        "DELETE FROM history WHERE device_id = $1 AND EXISTS (SELECT 1 FROM history h2 \
         WHERE h2.device_id = $2 AND h2.series = history.series AND h2.start_at = history.start_at)",
        "UPDATE history SET device_id = $2 WHERE device_id = $1",
        // The newer latest status wins.
        "DELETE FROM device_status WHERE device_id = $2 AND observed_at < (SELECT observed_at \
         FROM device_status s2 WHERE s2.device_id = $1)",
        "UPDATE device_status SET device_id = $2 WHERE device_id = $1 AND NOT EXISTS \
         (SELECT 1 FROM device_status s2 WHERE s2.device_id = $2)",
        "UPDATE devices SET \
            name = COALESCE(name, (SELECT d.name FROM devices d WHERE d.id = $1)), \
            group_name = COALESCE(group_name, (SELECT d.group_name FROM devices d WHERE d.id = $1)), \
            comment = COALESCE(comment, (SELECT d.comment FROM devices d WHERE d.id = $1)), \
            info = COALESCE(info, (SELECT d.info FROM devices d WHERE d.id = $1)), \
            settings = COALESCE(settings, (SELECT d.settings FROM devices d WHERE d.id = $1)), \
            logs = COALESCE(logs, (SELECT d.logs FROM devices d WHERE d.id = $1)), \
            first_seen = CASE WHEN first_seen > (SELECT d.first_seen FROM devices d WHERE d.id = $1) \
                THEN (SELECT d.first_seen FROM devices d WHERE d.id = $1) ELSE first_seen END \
         WHERE id = $2",
        // The newer word on reachability wins.
        "UPDATE devices SET \
            reach_at = (SELECT d.reach_at FROM devices d WHERE d.id = $1), \
            unreachable_reason = (SELECT d.unreachable_reason FROM devices d WHERE d.id = $1) \
         WHERE id = $2 AND (SELECT d.reach_at FROM devices d WHERE d.id = $1) > COALESCE(reach_at, -1)",
    ] {
        sqlx::query(sql)
            .bind(from)
            .bind(into)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("DELETE FROM devices WHERE id = $1")
        .bind(from)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Sets the latest status unless a newer one is stored.
pub(super) async fn upsert_status(
    conn: &mut AnyConnection,
    device: i64,
    observed_at: i64,
    status: &DeviceStatus,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(status).map_err(|e| StoreError::Invalid(e.to_string()))?;
    sqlx::query(
        "INSERT INTO device_status (device_id, observed_at, status) VALUES ($1, $2, $3) \
         ON CONFLICT (device_id) DO UPDATE SET observed_at = excluded.observed_at, \
         status = excluded.status WHERE device_status.observed_at <= excluded.observed_at",
    )
    .bind(device)
    .bind(observed_at)
    .bind(json)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The latest status of a device.
pub(super) async fn latest_status(
    conn: &mut AnyConnection,
    device: i64,
) -> Result<Option<(i64, DeviceStatus)>, StoreError> {
    let row = sqlx::query("SELECT observed_at, status FROM device_status WHERE device_id = $1")
        .bind(device)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        None => Ok(None),
        Some(r) => {
            let at: i64 = r.try_get(0)?;
            let json: String = r.try_get(1)?;
            let status = serde_json::from_str(&json).map_err(StoreError::corrupt)?;
            Ok(Some((at, status)))
        }
    }
}

const SUMMARY_SELECT: &str = concat!(
    "SELECT d.id, d.serial, d.ip_key, d.tenant_id, d.agent_id, d.name, \
    d.address, d.first_seen, ",
    last_contact!(),
    ", s.observed_at, s.status, d.reach_at, d.unreachable_reason \
    FROM devices d LEFT JOIN device_status s ON s.device_id = d.id"
);

/// Every device, or one tenant's.
pub(super) async fn list(
    conn: &mut AnyConnection,
    tenant: Option<TenantId>,
) -> Result<Vec<DeviceSummary>, StoreError> {
    let rows = match tenant {
        Some(t) => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "{SUMMARY_SELECT} WHERE d.tenant_id = $1 ORDER BY d.id"
            )))
            .bind(t.to_string())
            .fetch_all(&mut *conn)
            .await?
        }
        None => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "{SUMMARY_SELECT} ORDER BY d.id"
            )))
            .fetch_all(&mut *conn)
            .await?
        }
    };
    rows.iter().map(summary).collect()
}

/// One device, seen only through `tenant` when given.
pub(super) async fn get(
    conn: &mut AnyConnection,
    tenant: Option<TenantId>,
    device: i64,
) -> Result<Option<DeviceSummary>, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{SUMMARY_SELECT} WHERE d.id = $1 AND ($2 = '' OR d.tenant_id = $2)"
    )))
    .bind(device)
    .bind(tenant.map(|t| t.to_string()).unwrap_or_default())
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(summary).transpose()
}

fn summary(r: &sqlx::any::AnyRow) -> Result<DeviceSummary, StoreError> {
    let serial: Option<String> = r.try_get(1)?;
    let ip_key: Option<String> = r.try_get(2)?;
    let key = serial
        .clone()
        .or(ip_key)
        .ok_or_else(|| StoreError::corrupt("device without serial or address"))?;
    let status = match (
        r.try_get::<Option<i64>, _>(9)?,
        r.try_get::<Option<String>, _>(10)?,
    ) {
        (Some(at), Some(json)) => Some((
            ts(at)?,
            serde_json::from_str(&json).map_err(StoreError::corrupt)?,
        )),
        _ => None,
    };
    // Unreachable when the latest reachability event said so and no status was observed
    // after it.
    let unreachable = match (
        r.try_get::<Option<i64>, _>(11)?,
        r.try_get::<Option<String>, _>(12)?,
    ) {
        (Some(at), Some(reason))
            if status
                .as_ref()
                .is_none_or(|(observed, _)| observed.unix() <= at) =>
        {
            Some(Unreachable {
                since: ts(at)?,
                reason,
            })
        }
        _ => None,
    };
    Ok(DeviceSummary {
        id: r.try_get(0)?,
        key,
        serial,
        tenant: tenant_id(&r.try_get::<String, _>(3)?)?,
        agent: agent_id(&r.try_get::<String, _>(4)?)?,
        name: r.try_get(5)?,
        address: r.try_get(6)?,
        first_seen: ts(r.try_get(7)?)?,
        last_contact: ts(r.try_get(8)?)?,
        status,
        unreachable,
    })
}

/// A device's latest events, newest first; through `tenant` when given.
pub(super) async fn events(
    conn: &mut AnyConnection,
    tenant: Option<TenantId>,
    device: i64,
    limit: u32,
) -> Result<Vec<EventRecord>, StoreError> {
    sqlx::query(
        "SELECT e.at, e.body, e.message_id FROM events e JOIN devices d ON d.id = e.device_id \
         WHERE e.device_id = $1 AND ($2 = '' OR d.tenant_id = $2) ORDER BY e.at DESC, e.id DESC \
         LIMIT $3",
    )
    .bind(device)
    .bind(tenant.map(|t| t.to_string()).unwrap_or_default())
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| {
        Ok(EventRecord {
            message_id: r
                .try_get::<String, _>(2)?
                .parse()
                .map_err(StoreError::corrupt)?,
            at: ts(r.try_get(0)?)?,
            event: serde_json::from_str(&r.try_get::<String, _>(1)?)
                .map_err(StoreError::corrupt)?,
        })
    })
    .collect()
}

/// A device's history series, oldest first; through `tenant` when given.
pub(super) async fn history(
    conn: &mut AnyConnection,
    tenant: Option<TenantId>,
    device: i64,
) -> Result<Vec<HistoryRecord>, StoreError> {
    sqlx::query(
        "SELECT h.series, h.start_at, h.end_at, h.interval_seconds, h.data FROM history h \
         JOIN devices d ON d.id = h.device_id WHERE h.device_id = $1 \
         AND ($2 = '' OR d.tenant_id = $2) ORDER BY h.start_at, h.series",
    )
    .bind(device)
    .bind(tenant.map(|t| t.to_string()).unwrap_or_default())
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| {
        Ok(HistoryRecord {
            series: r.try_get(0)?,
            start: ts(r.try_get(1)?)?,
            end: ts(r.try_get(2)?)?,
            interval_seconds: r.try_get(3)?,
            data: serde_json::from_str(&r.try_get::<String, _>(4)?).map_err(StoreError::corrupt)?,
        })
    })
    .collect()
}

/// One device with its collected info, settings and logs; through `tenant` when given.
pub(super) async fn details(
    conn: &mut AnyConnection,
    tenant: Option<TenantId>,
    device: i64,
) -> Result<Option<DeviceDetails>, StoreError> {
    let Some(summary) = get(conn, tenant, device).await? else {
        return Ok(None);
    };
    let r =
        sqlx::query("SELECT group_name, comment, info, settings, logs FROM devices WHERE id = $1")
            .bind(device)
            .fetch_one(&mut *conn)
            .await?;
    fn parse<T: serde::de::DeserializeOwned>(
        json: Option<String>,
    ) -> Result<Option<T>, StoreError> {
        json.map(|j| serde_json::from_str(&j))
            .transpose()
            .map_err(StoreError::corrupt)
    }
    Ok(Some(DeviceDetails {
        summary,
        group_name: r.try_get(0)?,
        comment: r.try_get(1)?,
        info: parse(r.try_get(2)?)?,
        settings: parse(r.try_get(3)?)?,
        logs: parse(r.try_get(4)?)?,
    }))
}

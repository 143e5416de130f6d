-- EPMC-rs storage, version 1 (SQLite). Keep equal to ../postgres/0001_initial.sql: the one
-- storage test suite runs on both. Times are Unix seconds; ids are UUID text.
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    agent_code TEXT,
    version TEXT,
    info TEXT,
    hello_at BIGINT,
    state TEXT NOT NULL DEFAULT 'never' CHECK (state IN ('never', 'online', 'offline')),
    last_seen BIGINT,
    cert_serial TEXT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX agents_tenant ON agents(tenant_id);

CREATE TABLE devices (
    id INTEGER PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    agent_id TEXT NOT NULL REFERENCES agents(id),
    serial TEXT,
    ip_key TEXT,
    address TEXT,
    name TEXT,
    group_name TEXT,
    comment TEXT,
    info TEXT,
    settings TEXT,
    logs TEXT,
    first_seen BIGINT NOT NULL,
    last_contact BIGINT NOT NULL,
    CHECK (serial IS NOT NULL OR ip_key IS NOT NULL),
    UNIQUE (tenant_id, serial),
    UNIQUE (agent_id, ip_key)
);
CREATE INDEX devices_agent_address ON devices(agent_id, address);

CREATE TABLE device_status (
    device_id BIGINT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    observed_at BIGINT NOT NULL,
    status TEXT NOT NULL
);

CREATE TABLE history (
    id INTEGER PRIMARY KEY,
    device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    series TEXT NOT NULL,
    start_at BIGINT NOT NULL,
    end_at BIGINT NOT NULL,
    interval_seconds BIGINT NOT NULL,
    data TEXT NOT NULL,
    UNIQUE (device_id, series, start_at)
);
CREATE INDEX history_end ON history(end_at);

CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    message_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX events_device_at ON events(device_id, at);
CREATE INDEX events_at ON events(at);

CREATE TABLE exception_logs (
    id INTEGER PRIMARY KEY,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    message_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    severity TEXT NOT NULL,
    component TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX exception_logs_agent_at ON exception_logs(agent_id, at);

CREATE TABLE orders (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    agent_id TEXT NOT NULL REFERENCES agents(id),
    device_id BIGINT REFERENCES devices(id),
    action TEXT NOT NULL,
    issued_by TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'delivered', 'accepted', 'done', 'failed', 'timed_out', 'expired')),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    result TEXT
);
CREATE INDEX orders_agent_state ON orders(agent_id, state, seq);
CREATE INDEX orders_state_expires ON orders(state, expires_at);

CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    secret_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);

CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    issued_at BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    revoked_at BIGINT,
    revocation_reason TEXT
);
CREATE INDEX certificates_agent ON certificates(agent_id);

CREATE TABLE security_events (
    id INTEGER PRIMARY KEY,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    agent_id TEXT,
    peer TEXT,
    detail TEXT NOT NULL
);

CREATE TABLE rejected_messages (
    id INTEGER PRIMARY KEY,
    at BIGINT NOT NULL,
    agent_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    raw BLOB NOT NULL,
    raw_len BIGINT NOT NULL
);
CREATE INDEX rejected_messages_at ON rejected_messages(at);

CREATE TABLE ingested_messages (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    received_at BIGINT NOT NULL
);

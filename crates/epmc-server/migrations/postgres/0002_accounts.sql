-- EPMC-rs storage, version 2 (PostgreSQL): accounts of people (the portal logs in against them).
-- Keep equal to ../sqlite/0002_accounts.sql. A password is stored only as an argon2id PHC
-- string; an admin has no tenant, a tenant user exactly one.
CREATE TABLE accounts (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('admin', 'tenant')),
    tenant_id TEXT REFERENCES tenants(id),
    password_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    password_changed_at BIGINT NOT NULL,
    CHECK ((role = 'admin' AND tenant_id IS NULL) OR (role = 'tenant' AND tenant_id IS NOT NULL))
);

CREATE INDEX accounts_tenant ON accounts (tenant_id);

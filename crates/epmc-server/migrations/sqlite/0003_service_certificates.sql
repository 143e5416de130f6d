-- EPMC-rs storage, version 3 (SQLite): the client certificates a server replica issues itself
-- for an external broker (scale mode), by the replica's name, so that revocation (the CRL)
-- and listing cover them as they cover agents' certificates. Keep equal to
-- ../postgres/0003_service_certificates.sql.
CREATE TABLE service_certificates (
    serial TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    revoked_at BIGINT,
    revocation_reason TEXT
);

CREATE INDEX service_certificates_name ON service_certificates (name);

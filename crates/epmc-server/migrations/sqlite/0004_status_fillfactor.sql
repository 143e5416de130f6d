-- EPMC-rs storage, version 4 (SQLite): nothing to change. Version 4 of the PostgreSQL schema
-- leaves room in device_status's pages for updates in place (a fill factor); SQLite has none.
-- Kept so that both backends carry the same version numbers.
SELECT 1;

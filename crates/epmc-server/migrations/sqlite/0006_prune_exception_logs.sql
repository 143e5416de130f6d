-- EPMC-rs storage, version 6 (SQLite): agents' exception-log entries arrive on the events
-- channel and are pruned with the events by retention, oldest first, so they need their time
-- indexed (the index by agent and time does not serve "every agent, before the cut"). Keep the
-- version equal to ../postgres/0006_prune_exception_logs.sql.
CREATE INDEX exception_logs_at ON exception_logs (at);

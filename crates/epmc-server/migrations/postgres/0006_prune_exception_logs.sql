-- EPMC-rs storage, version 6 (PostgreSQL): agents' exception-log entries arrive on the events
-- channel and are pruned with the events by retention, oldest first, so they need their time
-- indexed (the index by agent and time does not serve "every agent, before the cut"). The time
-- is the agent's, not the arrival's, so it does not follow the table's pages: a B-tree, not
-- BRIN. Keep the version equal to ../sqlite/0006_prune_exception_logs.sql.
CREATE INDEX exception_logs_at ON exception_logs (at);

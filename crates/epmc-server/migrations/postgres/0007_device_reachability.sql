-- EPMC-rs storage, version 7 (PostgreSQL): whether each device answers its agent, from the agent's
-- reachable / unreachable events: the time of the latest one applied, and the reason when it
-- said unreachable (NULL once it answers again). A status observed after that time also
-- means it answers. Keep the version equal to ../sqlite/0007_device_reachability.sql.
ALTER TABLE devices ADD COLUMN reach_at BIGINT;
ALTER TABLE devices ADD COLUMN unreachable_reason TEXT;

-- EPMC-rs storage, version 5 (SQLite): the record of every message id received (what makes a
-- repeated message a duplicate) is pruned with retention, oldest first, so it needs its
-- arrival time indexed. The time only grows, so each insert goes to the index's last page.
-- Keep the version equal to ../postgres/0005_prune_message_ids.sql.
CREATE INDEX ingested_messages_received ON ingested_messages (received_at);

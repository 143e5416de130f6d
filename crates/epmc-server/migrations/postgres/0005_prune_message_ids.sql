-- EPMC-rs storage, version 5 (PostgreSQL): the record of every message id received (what makes
-- a repeated message a duplicate) is pruned with retention, oldest first, so it needs its
-- arrival time indexed. The time only grows with the table's pages, which is what a BRIN index
-- summarises: a few pages for millions of rows, and almost nothing added to each insert (a
-- B-tree would add an index entry to every row of the ingest's hottest table). Keep the version
-- equal to ../sqlite/0005_prune_message_ids.sql.
CREATE INDEX ingested_messages_received ON ingested_messages USING brin (received_at);

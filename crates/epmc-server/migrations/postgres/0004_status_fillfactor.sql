-- EPMC-rs storage, version 4 (PostgreSQL): each device's latest status is rewritten by every
-- snapshot. With pages filled to the brim, an update rarely finds room on its own page: only
-- 6 % of them were "HOT" (no new index entry), and 1,000 devices updated 59 times grew the
-- table to 28 MB until vacuumed. Half-empty pages let every update stay on its page (100 %
-- HOT, 1 MB) and made the upserts 15-35 % faster. New pages only; existing rows move to such
-- pages as they are updated and vacuumed. Keep the version equal to
-- ../sqlite/0004_status_fillfactor.sql (SQLite has no fill factor: nothing to change there).
ALTER TABLE device_status SET (fillfactor = 50);

-- notifyhook schema version 5: every attempt row a worker records carries a key of its own.
--
-- A worker whose call to record_outcomes ended without an answer (a commit whose answer
-- was lost, a cut connection) sends the same outcomes again, and the function must skip
-- those already recorded. It used to know them by worker, start time and a float
-- duration; the worker now draws a random key per attempt, and the unique index makes
-- "already recorded" exact (and a second insert of one attempt impossible).
--
-- Rows written by reclaim_expired and release_claims (no answer, no worker call) have
-- no key. Building the index reads the whole table once, while holding off inserts:
-- on a large history, migrate when the queue is quiet (docs/operations.md).
ALTER TABLE notifyhook.attempts ADD COLUMN attempt_key uuid;
CREATE UNIQUE INDEX attempts_attempt_key ON notifyhook.attempts (attempt_key);

-- Two endpoint columns of the second round (DESIGN §8 "New endpoint columns"):
-- `ordered` makes an endpoint FIFO (one request in flight, in event order), and
-- `retry_schedule` gives it its own retry delays in seconds (null: the global
-- NOTIFYHOOK_RETRY_SCHEDULE), its length + 1 being its attempt budget. Both are
-- checked by notifyhook.validate_endpoint (sql/triggers/endpoints.sql).
ALTER TABLE notifyhook.endpoints ADD COLUMN ordered boolean NOT NULL DEFAULT false, ADD COLUMN retry_schedule integer[];

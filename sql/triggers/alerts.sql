-- Alerts from the database (sql/functions/alerts.sql): a dead letter notifies
-- notifyhook_alerts from the transaction that makes it. The WHEN clause is checked
-- as each row is updated, so a claim or a delivered outcome costs no trigger call.
DROP TRIGGER IF EXISTS deliveries_alert_dead ON notifyhook.deliveries;
CREATE TRIGGER deliveries_alert_dead
    AFTER UPDATE OF status ON notifyhook.deliveries
    FOR EACH ROW WHEN (NEW.status = 'dead' AND OLD.status <> 'dead')
    EXECUTE FUNCTION notifyhook.alert_dead();
-- (0006) deliveries is partitioned by status: a row that goes dead moves from
-- deliveries_active to a day partition of deliveries_finished, which PostgreSQL runs as
-- a DELETE and an INSERT, and fires no UPDATE trigger for. Its INSERT fires this one.
DROP TRIGGER IF EXISTS deliveries_alert_dead_moved ON notifyhook.deliveries;
CREATE TRIGGER deliveries_alert_dead_moved
    AFTER INSERT ON notifyhook.deliveries
    FOR EACH ROW WHEN (NEW.status = 'dead')
    EXECUTE FUNCTION notifyhook.alert_dead();

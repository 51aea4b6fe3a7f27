-- Alerts from the database (sql/functions/alerts.sql): a dead letter notifies
-- notifyhook_alerts from the transaction that makes it. The WHEN clause is checked
-- as each row is updated, so a claim or a delivered outcome costs no trigger call.
DROP TRIGGER IF EXISTS deliveries_alert_dead ON notifyhook.deliveries;
CREATE TRIGGER deliveries_alert_dead
    AFTER UPDATE OF status ON notifyhook.deliveries
    FOR EACH ROW WHEN (NEW.status = 'dead' AND OLD.status <> 'dead')
    EXECUTE FUNCTION notifyhook.alert_dead();

"""Task names and queues: the receiver publishes by name, so it never imports task code."""

HANDLE_ALERT = "responder.handle_alert"
RUN_REMEDIATION = "responder.run_remediation"
RECONCILE = "responder.reconcile"
DISPATCH = "responder.dispatch"
# Beat records a config schedule's tick itself (workers.schedules): never sent as a message.
FIRE_SCHEDULE = "responder.fire_schedule"

QUEUE_ALERTS = "alerts"
QUEUE_REMEDIATIONS = "remediations"
QUEUE_MAINTENANCE = "maintenance"
ALL_QUEUES = (QUEUE_ALERTS, QUEUE_REMEDIATIONS, QUEUE_MAINTENANCE)

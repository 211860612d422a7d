-- Scale to zero: per-VM idle settings, last activity, and an event log of
-- lifecycle operations with their durations.
ALTER TABLE vms ADD COLUMN idle_timeout_ms INTEGER;
ALTER TABLE vms ADD COLUMN idle_check_interval_ms INTEGER;
ALTER TABLE vms ADD COLUMN sleep_mode TEXT NOT NULL DEFAULT 'snapshot';
ALTER TABLE vms ADD COLUMN last_activity_at TEXT;

CREATE TABLE IF NOT EXISTS vm_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS vm_events_vm ON vm_events(vm_id, id);

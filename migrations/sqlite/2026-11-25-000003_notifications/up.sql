-- Where and how each organisation is told.
CREATE TABLE delivery_endpoints (
    org_ods TEXT PRIMARY KEY NOT NULL REFERENCES organisations (ods_code),
    emails TEXT NOT NULL,
    webhook_url TEXT,
    webhook_secret TEXT,
    webhook_previous_secret TEXT,
    previous_secret_until TEXT,
    webhook_disabled_at TEXT,
    events TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

-- The outbox: written in the same transaction as the attendance or check it reports.
CREATE TABLE notifications (
    id TEXT PRIMARY KEY NOT NULL,
    org_ods TEXT NOT NULL,
    event TEXT NOT NULL,
    status TEXT NOT NULL,
    review INTEGER NOT NULL,
    nhs_number TEXT,
    setting_ods TEXT,
    setting_type TEXT,
    attendance_ref TEXT,
    occurred_at TEXT NOT NULL,
    payload TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX notifications_org_created ON notifications (org_ods, created_at);
CREATE INDEX notifications_status ON notifications (status);
CREATE INDEX notifications_visit ON notifications (org_ods, setting_ods, nhs_number, occurred_at);

-- One row per channel of a notification, delivered and retried on its own.
CREATE TABLE deliveries (
    notification_id TEXT NOT NULL REFERENCES notifications (id),
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at TEXT NOT NULL,
    lease_until TEXT,
    leased_by TEXT,
    last_error TEXT,
    delivered_at TEXT,
    PRIMARY KEY (notification_id, channel)
);
CREATE INDEX deliveries_due ON deliveries (status, next_attempt_at);

CREATE TABLE delivery_attempts (
    id TEXT PRIMARY KEY NOT NULL,
    notification_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    at TEXT NOT NULL,
    outcome TEXT NOT NULL,
    response_code INTEGER,
    error TEXT,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX delivery_attempts_notification ON delivery_attempts (notification_id);

-- The last tick each scheduled job ran for, so that with several instances each tick runs once.
CREATE TABLE job_runs (
    name TEXT PRIMARY KEY NOT NULL,
    last_tick TEXT NOT NULL,
    last_finished TEXT
);

-- When the expire job recorded that a plan's end date had passed.
ALTER TABLE plans ADD COLUMN ended_at TEXT;

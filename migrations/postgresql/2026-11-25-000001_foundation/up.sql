CREATE TABLE organisations (
    ods_code TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    region TEXT,
    office_phone TEXT,
    emergency_duty_phone TEXT,
    email TEXT,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY NOT NULL,
    org_ods TEXT NOT NULL REFERENCES organisations (ods_code),
    roles TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    created_at TIMESTAMP NOT NULL,
    revoked_at TIMESTAMP
);
CREATE INDEX api_keys_org ON api_keys (org_ods);

CREATE TABLE plans (
    id TEXT PRIMARY KEY NOT NULL,
    la_ods TEXT NOT NULL REFERENCES organisations (ods_code),
    local_reference TEXT NOT NULL,
    nhs_number TEXT NOT NULL,
    plan_type TEXT NOT NULL,
    start_date DATE NOT NULL,
    end_date DATE,
    delete_date DATE,
    expected_delivery_date DATE,
    given_name TEXT,
    family_name TEXT,
    birth_date DATE,
    sex TEXT,
    postcode TEXT,
    office_phone TEXT,
    emergency_duty_phone TEXT,
    email TEXT,
    version INTEGER NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    UNIQUE (la_ods, local_reference)
);
CREATE INDEX plans_nhs_number ON plans (nhs_number);

-- Unscheduled and scheduled flag checks of flagged children, and attendances: what a clinician sees
-- as "recent accesses".
CREATE TABLE accesses (
    id TEXT PRIMARY KEY NOT NULL,
    nhs_number TEXT NOT NULL,
    at TIMESTAMP NOT NULL,
    setting_ods TEXT NOT NULL,
    setting_type TEXT,
    kind TEXT NOT NULL,
    access TEXT NOT NULL,
    practitioner_name TEXT,
    practitioner_role TEXT,
    key_id TEXT
);
CREATE INDEX accesses_nhs_number_at ON accesses (nhs_number, at);

-- The audit trail: a hash chain, kept apart from personal data and never updated.
CREATE TABLE audit_events (
    seq BIGINT PRIMARY KEY NOT NULL,
    at TEXT NOT NULL,
    actor_ods TEXT NOT NULL,
    key_id TEXT,
    role TEXT,
    practitioner TEXT,
    action TEXT NOT NULL,
    nhs_number TEXT,
    subject TEXT,
    outcome TEXT NOT NULL,
    request_id TEXT,
    detail TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_events_nhs_number ON audit_events (nhs_number, seq);
CREATE INDEX audit_events_actor ON audit_events (actor_ods, seq);
CREATE INDEX audit_events_at ON audit_events (at);

-- One row: the end of the chain. Appending locks it, which orders concurrent writers.
CREATE TABLE audit_head (
    id INTEGER PRIMARY KEY NOT NULL,
    last_seq BIGINT NOT NULL,
    last_hash TEXT NOT NULL
);
INSERT INTO audit_head (id, last_seq, last_hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- The built-in MPI: one row per person known to cpis, from plans, regional feeds and attendances.
CREATE TABLE persons (
    id TEXT PRIMARY KEY NOT NULL,
    nhs_number TEXT UNIQUE,
    given_name TEXT,
    family_name TEXT,
    birth_date DATE,
    sex TEXT,
    postcode TEXT,
    -- Blocking keys: Soundex of family name + given-name root, and postcode + birth year.
    name_key TEXT,
    postcode_key TEXT,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE INDEX persons_birth_date ON persons (birth_date);
CREATE INDEX persons_name_key ON persons (name_key);
CREATE INDEX persons_postcode_key ON persons (postcode_key);

-- A region's local identifier for a person.
CREATE TABLE person_identifiers (
    system TEXT NOT NULL,
    value TEXT NOT NULL,
    region TEXT NOT NULL,
    person_id TEXT NOT NULL REFERENCES persons (id),
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (system, value)
);
CREATE INDEX person_identifiers_person ON person_identifiers (person_id);

-- Attendances at unscheduled-care settings, as reported, with how they were matched.
CREATE TABLE attendances (
    id TEXT PRIMARY KEY NOT NULL,
    setting_ods TEXT NOT NULL,
    attendance_id TEXT NOT NULL,
    setting_type TEXT NOT NULL,
    arrived_at TIMESTAMP NOT NULL,
    reason TEXT,
    nhs_number TEXT,
    identifier_system TEXT,
    identifier_value TEXT,
    given_name TEXT,
    family_name TEXT,
    birth_date DATE,
    sex TEXT,
    postcode TEXT,
    region TEXT,
    match_status TEXT NOT NULL,
    match_method TEXT,
    match_score DOUBLE PRECISION,
    person_id TEXT,
    resolved_nhs_number TEXT,
    flagged BOOLEAN NOT NULL,
    rematch_attempts INTEGER NOT NULL,
    key_id TEXT,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    UNIQUE (setting_ods, attendance_id)
);
CREATE INDEX attendances_match_status ON attendances (match_status);
CREATE INDEX attendances_resolved_nhs_number ON attendances (resolved_nhs_number);

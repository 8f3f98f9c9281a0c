-- Where the audit chain starts once events older than the retention period have been deleted.
ALTER TABLE audit_head ADD COLUMN first_seq BIGINT NOT NULL DEFAULT 1;
ALTER TABLE audit_head ADD COLUMN first_prev_hash TEXT NOT NULL DEFAULT '0000000000000000000000000000000000000000000000000000000000000000';

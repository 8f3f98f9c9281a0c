ALTER TABLE audit_head DROP COLUMN first_prev_hash;
ALTER TABLE audit_head DROP COLUMN first_seq;

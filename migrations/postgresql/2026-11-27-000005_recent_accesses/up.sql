-- A flag check that hits shows the child's recent unscheduled accesses, newest first. This index holds every
-- column that list shows, in its order, so it is answered by an index-only scan without a sort. It replaces
-- (nhs_number, at), whose leading column it keeps.
CREATE INDEX accesses_recent ON accesses (nhs_number, access, at, id) INCLUDE (kind, setting_ods, setting_type);
DROP INDEX accesses_nhs_number_at;

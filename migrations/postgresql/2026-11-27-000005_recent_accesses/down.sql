CREATE INDEX accesses_nhs_number_at ON accesses (nhs_number, at);
DROP INDEX accesses_recent;

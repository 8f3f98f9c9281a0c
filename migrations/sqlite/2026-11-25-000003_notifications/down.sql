ALTER TABLE plans DROP COLUMN ended_at;
DROP TABLE job_runs;
DROP TABLE delivery_attempts;
DROP TABLE deliveries;
DROP TABLE notifications;
DROP TABLE delivery_endpoints;

DROP TABLE audit_head;
DROP TABLE audit_events;
DROP TABLE accesses;
DROP TABLE plans;
DROP TABLE api_keys;
DROP TABLE organisations;

//! Integration tests: the real server on an ephemeral port, a fresh database per test, every database test on
//! SQLite and, when `CPIS_TEST_POSTGRES_URL` is set, on PostgreSQL too.

mod helpers;

mod audit;
mod auth;
mod bulk;
mod delivery_processes;
mod demo;
mod errors;
mod fhir;
mod flag_checks;
mod health;
mod identity;
mod logs;
mod mpi_external;
mod notifications;
mod openapi;
mod organisations;
mod plans;
mod process_exit;
mod receiver;
mod retention;
mod smtp;

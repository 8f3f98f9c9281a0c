//! cpis: child protection information sharing. Local authorities register protection plans; unscheduled-care
//! settings check flags; every access is audited in a hash chain. `main.rs` only parses the command line.

pub mod api;
pub mod attendances;
pub mod audit;
pub mod auth;
pub mod bulk;
pub mod cli;
pub mod clock;
pub mod config;
pub mod db;
pub mod demo;
pub mod domain;
pub mod error;
pub mod fhir;
pub mod flags;
pub mod jobs;
pub mod metrics;
pub mod mpi;
pub mod notify;
pub mod plans;
pub mod retention;
pub mod startup;
pub mod telemetry;

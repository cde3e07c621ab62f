//! End-to-end tests: the real binary (and the real library, the daemon included, in process)
//! against the project's own simulated portal over loopback HTTP. One test binary; each test gets
//! its own portal, database and config.

mod auth;
#[macro_use]
mod backends;
mod bad_input;
mod changes;
mod common;
mod concurrency;
mod daemon;
mod databases;
mod hardening;
mod hostile_portal;
mod in_process;
mod operator;
mod portals;
mod properties;
mod proxy;
mod reliability;
mod resync;
mod server;
mod source_url;
mod state_postgres;
mod strategies;
mod structure;
mod telemetry;

//! bynder-usage-sync: keeps Bynder's asset-usage records true to what a CMS uses.

pub mod admin;
pub mod auth;
pub mod body;
pub mod bynder;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod files;
pub mod gate;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod probe;
pub mod profile;
pub mod queue;
pub mod reconcile;
pub mod simulator;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod verify;

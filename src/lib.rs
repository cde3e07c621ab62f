//! bynder-usage-sync: keeps Bynder's asset-usage records true to what a CMS uses.

pub mod app;
pub mod auth;
pub mod body;
pub mod bynder;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod files;
pub mod gate;
pub mod health;
pub mod http;
pub mod leadership;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod profile;
pub mod queue;
pub mod run;
pub mod simulator;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod verify;

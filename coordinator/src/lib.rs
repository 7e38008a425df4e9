//! drover-coordinator: the Raft-replicated brain of Drover. See docs/ARCHITECTURE.md for the map.

pub mod accept;
pub mod admission;
pub mod agent_service;
pub mod client_service;
pub mod command;
pub mod config;
pub mod convert;
pub mod entry;
pub mod error;
pub mod http;
pub mod leader;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod node;
pub mod proposer;
pub mod raft;
pub mod retention;
pub mod scheduler;
pub mod sessions;
pub mod state;
pub mod stranded;
pub mod submit_placement;

pub use config::Config;
pub use node::{NodeHandle, start};

//! drover-coordinator: the Raft-replicated brain of Drover. See docs/ARCHITECTURE.md for the map.

pub mod accept;
pub mod admission;
pub mod agent_service;
pub mod autoscaler;
pub mod client_service;
pub mod config;
pub mod convert;
pub mod entry;
pub mod error;
pub mod http;
pub mod leader;
pub mod limits;
pub mod local_agents;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod placer;
pub mod pools;
pub mod proposer;
pub mod raft;
pub mod run_control;
pub mod sessions;
pub mod webhook;

// The functional core, under the names the shell has always used for it.
pub use drover_core::{
    autoscale, command, dag, model, params, placement, retention, scheduler, state, stranded, view,
};

pub use config::Config;
pub use node::{NodeHandle, start};

//! droverctl: the command line for Drover, as a library so tests and benchmarks drive the same
//! code a user runs.

pub mod certs;
pub mod cli;
pub mod dev;
pub mod entry;
pub mod output;
pub mod pools;
pub mod spec;

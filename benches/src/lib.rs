//! Shared pieces of the benchmarks live in the binary and benches; this crate has no library API.

//! The shipped program under a test-only name, so integration tests get it built by cargo.
fn main() -> std::process::ExitCode {
    drover_agent::entry::main()
}

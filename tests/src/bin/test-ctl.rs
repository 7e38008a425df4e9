//! The shipped program under a test-only name, so integration tests get it built by cargo.
fn main() -> std::process::ExitCode {
    droverctl::entry::main()
}

//! The shipped program under a test-only name, so integration tests get it built by cargo.
fn main() -> std::process::ExitCode {
    drover_coordinator::entry::main()
}

// The same allocator as the shipped program (coordinator/src/main.rs).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

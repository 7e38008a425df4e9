fn main() -> std::process::ExitCode {
    drover_agent::entry::main()
}

// glibc's malloc was a seventh of the agent's CPU starting process tasks (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

// Before the Rust runtime's first allocation (see drover_agent::memory).
#[used]
#[unsafe(link_section = ".init_array")]
static COMMIT_MEMORY_ON_DEMAND: extern "C" fn() = drover_agent::memory::commit_memory_on_demand;

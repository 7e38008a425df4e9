fn main() -> std::process::ExitCode {
    drover_coordinator::entry::main()
}

// glibc's malloc was a third of the coordinators' CPU under load (_int_malloc, consolidation,
// unlinking chunks); mimalloc gave 19-20k tasks/s where glibc gave 15-17k (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    droverctl::entry::main()
}

// `droverctl dev` runs coordinators in this process: the same allocator as theirs
// (coordinator/src/main.rs).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

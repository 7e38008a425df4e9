fn main() -> std::process::ExitCode {
    drover_coordinator::entry::main()
}

fn main() -> std::process::ExitCode {
    drover_agent::entry::main()
}

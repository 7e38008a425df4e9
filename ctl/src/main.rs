fn main() -> std::process::ExitCode {
    droverctl::entry::main()
}

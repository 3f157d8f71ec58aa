fn main() {
    std::process::exit(gateway::cli::main());
}

//! The `statemesh` command: run a node, talk to one, benchmark one.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}

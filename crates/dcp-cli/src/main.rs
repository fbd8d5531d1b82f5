//! The `dcp` binary: see the `dcp_cli` crate for the commands.

fn main() -> std::process::ExitCode {
    dcp_cli::main()
}

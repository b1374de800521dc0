//! The `tunnel` binary: everything lives in the library; see `tunnel::cli`.

fn main() -> std::process::ExitCode {
    tunnel::cli::main()
}

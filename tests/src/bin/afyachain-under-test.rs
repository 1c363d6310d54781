//! The `afyachain` binary, built inside this crate so its tests get its path from
//! cargo (`CARGO_BIN_EXE_…`): the same one-line entry point as `api/src/main.rs`.

fn main() -> std::process::ExitCode {
    api::cli::main()
}

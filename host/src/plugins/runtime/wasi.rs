//! The deny-all WASI: the interfaces a policy may import, and the linker
//! holding exactly those.

use wasmtime::component::{HasData, Linker, ResourceTable};

use super::CallState;
use crate::plugins::deadline::HasDeadlineIo;

/// The WASI interfaces a policy may import, by name without version.
pub(super) const GRANTED_IMPORTS: &[&str] = &[
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    // Types only; nothing to link.
    "modelcache:policy/types",
];

struct HasTable;

impl HasData for HasTable {
    type Data<'a> = &'a mut ResourceTable;
}

/// Links exactly the granted interfaces (see [`GRANTED_IMPORTS`]).
pub(super) fn add_granted_wasi(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::p2::bindings::sync::io as sync_io;
    use wasmtime_wasi::p2::bindings::{cli, clocks, random};
    use wasmtime_wasi::random::{WasiRandom, WasiRandomView};

    wasmtime_wasi::p2::bindings::io::error::add_to_linker::<CallState, HasTable>(linker, |state| &mut state.table)?;
    sync_io::poll::add_to_linker::<CallState, HasDeadlineIo>(linker, CallState::io)?;
    sync_io::streams::add_to_linker::<CallState, HasDeadlineIo>(linker, CallState::io)?;
    clocks::wall_clock::add_to_linker::<CallState, WasiClocks>(linker, CallState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<CallState, WasiClocks>(linker, CallState::clocks)?;
    random::random::add_to_linker::<CallState, WasiRandom>(linker, CallState::random)?;
    random::insecure::add_to_linker::<CallState, WasiRandom>(linker, CallState::random)?;
    random::insecure_seed::add_to_linker::<CallState, WasiRandom>(linker, CallState::random)?;
    cli::exit::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::environment::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::stdin::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::stdout::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::stderr::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::terminal_input::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::terminal_output::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::terminal_stdin::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::terminal_stdout::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::terminal_stderr::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    Ok(())
}

//! The `statemesh` command: run a node, talk to one, benchmark one.

mod cli;

// mimalloc: per-thread free lists suit the many small, cross-thread messages of the mesh
// (measured against glibc malloc in `statemesh bench embedded`; see the issue notes).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc v3's `mimalloc.h` (the `-sys` crate's
/// constants follow v2's numbering).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Runs before `main` (and before the first allocation of Rust's runtime): commit arena
/// memory on demand rather than up front, so an idle node stays near 30 MiB instead of
/// 55 MiB, at no measured cost in throughput. An explicit MIMALLOC_ARENA_EAGER_COMMIT in the
/// environment still wins.
extern "C" fn configure_allocator() {
    if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
        // SAFETY: sets a process-wide allocator option before any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    }
}

#[used]
#[link_section = ".init_array"]
static CONFIGURE_ALLOCATOR: extern "C" fn() = configure_allocator;

fn main() -> std::process::ExitCode {
    cli::main()
}

//! How the agent's allocator takes memory from the OS. The agent programs use mimalloc (see
//! `agent/src/main.rs`): glibc's malloc was a seventh of the agent's CPU starting process tasks.
//! As it comes, mimalloc commits each arena whole and asks for transparent huge pages on it, and
//! an idle agent held 17 MiB instead of 7 (docs/BENCHMARKS.md, fourteenth session). Committed on
//! demand, it holds 7.9 MiB. Turning huge pages off for the process instead would pass to every
//! task the agent starts.

/// mimalloc 3's `mi_option_arena_eager_commit` (its position in `mi_option_e`; libmimalloc-sys
/// names only some of the options). A test checks that the option at this position has its
/// default.
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

/// Makes mimalloc commit arena memory as it is used. Must run before the first allocation, which
/// reserves the arena all later ones come from: the Rust runtime allocates before `main`, so the
/// programs call this from a static constructor (`agent/src/main.rs`).
pub extern "C" fn commit_memory_on_demand() {
    // SAFETY: setting an option takes plain integers; mimalloc reads it when it reserves an arena.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_arena_eager_commit_option_is_where_we_set_it() {
        // mimalloc 3 commits arenas eagerly where the OS overcommits (2); the options either side
        // (the deprecated eager commit, purge decommits) default to 1.
        // SAFETY: reading an option takes a plain integer.
        let v = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_ARENA_EAGER_COMMIT) };
        assert_eq!(v, 2);
    }
}

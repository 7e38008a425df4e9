//! How the coordinator hands memory back to the OS. Its programs use mimalloc (see
//! `coordinator/src/main.rs`), which by default keeps freed pages for a second, and arena pages
//! for ten, before returning them: with a million queued tasks the leader then held 1.64-1.68 GiB
//! where glibc's malloc held 1.19 GiB. Returned at once, it holds 1.40 GiB, perhaps for a few
//! percent of throughput (one noisy pair; docs/BENCHMARKS.md).
//!
//! Returning memory at once does not mix with transparent huge pages: mimalloc asks for them on
//! its arenas, so memory returned in small pieces came back on the next allocation as a fresh
//! 2 MiB page the kernel had to zero, and `clear_page` was an eighth of the host's CPU under
//! sustained load. The coordinator's program turns huge pages off for itself (docs/BENCHMARKS.md,
//! thirteenth session). `droverctl` does not: the setting passes to every process it starts,
//! and `droverctl dev` runs agents in its own process, whose tasks must get the host's setting.

/// mimalloc 3's `mi_option_purge_delay` (its position in `mi_option_e`; libmimalloc-sys names
/// only some of the options). A test checks that the option at this position has its default.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Makes mimalloc return freed memory at once. Call first thing in `main`.
pub fn return_freed_memory_promptly() {
    // SAFETY: setting an option takes plain integers; mimalloc reads it on each purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

/// Turns transparent huge pages off for this process, whatever mimalloc or the system's THP
/// setting ask for; the kernel checks it at every page fault, so mappings made before this call
/// are covered too. A kernel without the call leaves things as they were. Children inherit it,
/// across `exec` too: only for a program that starts no tasks.
pub fn disable_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only this process's flags.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Hands memory freed inside the heaps back to the OS: after a snapshot of a large state, most of
/// what encoding it allocated is free.
pub fn release_free_memory() {
    // SAFETY: mi_collect only walks mimalloc's own free lists and arenas; no pointers are
    // passed. Harmless where mimalloc is not the global allocator (its heaps are then empty).
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; no pointers are passed.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_are_off_once_configured() {
        // Not the whole configuration: the purge delay test reads mimalloc's default.
        super::disable_huge_pages();
        // SAFETY: reading the flag takes plain integers.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1);
    }

    #[test]
    fn the_purge_delay_option_is_where_we_set_it() {
        // mimalloc 3 purges after 1,000 ms by default; the options either side default to 1
        // and 0. Another option at this position would not read 1,000. (Nothing in this test
        // process sets it; 0 would also be the reading of `use_numa_nodes`, one along.)
        // SAFETY: reading an option takes a plain integer.
        let v = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(v, 1_000, "option {}", super::MI_OPTION_PURGE_DELAY);
    }
}

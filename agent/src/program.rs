//! Finds a task's program on PATH in the agent, once, instead of in every child. Given a bare
//! name, `posix_spawnp` tries `execve` in each PATH directory in turn, and every miss costs the
//! child a half-built exec (a new address space made and thrown away): with nine directories
//! before `/usr/bin`, ~5% of the CPU of a `/bin/true` task here (docs/BENCHMARKS.md). A task
//! that sets its own PATH was worse off still: the standard library cannot `posix_spawn` a bare
//! name under a changed PATH and forks the whole agent instead.
//!
//! A found path is kept for `PROGRAM_PATH_TTL`, so a program installed earlier on PATH is run
//! within that long, and a spawn that fails on a kept path forgets it and searches again.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::limits;

/// How long a found path is trusted without looking again.
pub const PROGRAM_PATH_TTL: Duration = Duration::from_secs(2);

/// Where `execvp` would find `program` with `path_var` as PATH: the first directory holding an
/// executable regular file of that name. None when the name holds a slash (it is used as it
/// is), when nothing matches, or when an empty or relative directory comes before the match
/// (what that one holds depends on the child's working directory); the spawn then searches
/// itself, as it always did.
pub fn search(
    program: &OsStr,
    path_var: &OsStr,
    is_executable: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    if program.is_empty() || program.as_bytes().contains(&b'/') {
        return None;
    }
    for dir in path_var.as_bytes().split(|b| *b == b':') {
        let dir = Path::new(OsStr::from_bytes(dir));
        if !dir.is_absolute() {
            return None;
        }
        let candidate = dir.join(program);
        if is_executable(&candidate) {
            return Some(candidate);
        }
    }
    None
}

/// What `execve` would accept, as far as a stat tells: a regular file with an execute bit.
pub fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

type Key = (OsString, OsString);

/// Found paths by (program, PATH), each with when it was found. Bounded by
/// `limits::PROGRAM_PATHS_MAX`.
#[derive(Default)]
pub struct ProgramPaths {
    found: Mutex<HashMap<Key, (PathBuf, Instant)>>,
}

impl ProgramPaths {
    /// The path to run `program` from under `path_var`, searched for at most once per
    /// `PROGRAM_PATH_TTL`; None leaves the search to the spawn.
    pub fn resolve(
        &self,
        program: &OsStr,
        path_var: &OsStr,
        now: Instant,
        is_executable: impl Fn(&Path) -> bool,
    ) -> Option<PathBuf> {
        let key = (program.to_owned(), path_var.to_owned());
        if let Some((path, at)) = self.found.lock().unwrap().get(&key)
            && now.saturating_duration_since(*at) < PROGRAM_PATH_TTL
        {
            return Some(path.clone());
        }
        let found = search(program, path_var, is_executable)?;
        let mut map = self.found.lock().unwrap();
        if map.len() >= limits::PROGRAM_PATHS_MAX {
            map.retain(|_, (_, at)| now.saturating_duration_since(*at) < PROGRAM_PATH_TTL);
            if map.len() >= limits::PROGRAM_PATHS_MAX {
                map.clear();
            }
        }
        map.insert(key, (found.clone(), now));
        Some(found)
    }

    /// Drops a kept path the spawn could not use, so the next one searches again.
    pub fn forget(&self, program: &OsStr, path_var: &OsStr) {
        self.found
            .lock()
            .unwrap()
            .remove(&(program.to_owned(), path_var.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn the_first_directory_holding_the_program_wins_as_execvp_would_pick() {
        // Guards: the same program execvp would run, never a later directory's copy.
        let has = |p: &Path| p == Path::new("/usr/bin/tool") || p == Path::new("/bin/tool");
        let found = search(os("tool"), os("/opt/a:/usr/bin:/bin"), has);
        assert_eq!(found.as_deref(), Some(Path::new("/usr/bin/tool")));
        assert_eq!(search(os("absent"), os("/usr/bin:/bin"), has), None);
    }

    #[test]
    fn names_with_a_slash_and_relative_directories_are_left_to_the_spawn() {
        // Guards: a relative PATH entry is resolved against the child's working directory,
        // which the agent must not guess; a name with a slash is not searched at all.
        let any = |_: &Path| true;
        assert_eq!(search(os("./run.sh"), os("/usr/bin"), any), None);
        assert_eq!(search(os("bin/run"), os("/usr/bin"), any), None);
        assert_eq!(search(os(""), os("/usr/bin"), any), None);
        assert_eq!(search(os("tool"), os(".:/usr/bin"), any), None);
        assert_eq!(
            search(os("tool"), os("/usr/bin::/bin"), |p: &Path| p
                .starts_with("/bin")),
            None
        );
        // A relative entry after the match does not matter.
        let found = search(os("tool"), os("/usr/bin:."), any);
        assert_eq!(found.as_deref(), Some(Path::new("/usr/bin/tool")));
    }

    #[test]
    fn a_found_path_is_searched_again_only_after_its_time_or_when_forgotten() {
        let paths = ProgramPaths::default();
        let searches = Cell::new(0);
        let has = |p: &Path| {
            searches.set(searches.get() + 1);
            p == Path::new("/bin/tool")
        };
        let t0 = Instant::now();
        let (tool, path) = (os("tool"), os("/usr/bin:/bin"));
        for _ in 0..3 {
            let found = paths.resolve(tool, path, t0, has);
            assert_eq!(found.as_deref(), Some(Path::new("/bin/tool")));
        }
        assert_eq!(
            searches.get(),
            2,
            "one search of two directories, then kept"
        );
        paths.resolve(tool, path, t0 + PROGRAM_PATH_TTL, has);
        assert_eq!(searches.get(), 4, "searched again once the time is up");
        paths.forget(tool, path);
        paths.resolve(tool, path, t0 + PROGRAM_PATH_TTL, has);
        assert_eq!(searches.get(), 6, "searched again once forgotten");
        // Another PATH is another answer.
        assert_eq!(paths.resolve(tool, os("/usr/bin"), t0, has), None);
    }

    #[test]
    fn the_kept_paths_stay_bounded() {
        let paths = ProgramPaths::default();
        let t0 = Instant::now();
        for i in 0..limits::PROGRAM_PATHS_MAX + 10 {
            let name = format!("tool{i}");
            assert!(paths.resolve(os(&name), os("/bin"), t0, |_| true).is_some());
        }
        let kept = paths.found.lock().unwrap().len();
        assert!(kept <= limits::PROGRAM_PATHS_MAX);
        assert!(kept > 0);
    }

    #[test]
    fn only_executable_regular_files_count() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"").unwrap();
        assert!(!is_executable_file(&plain));
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(is_executable_file(&plain));
        assert!(!is_executable_file(dir.path()), "a directory");
        assert!(!is_executable_file(&dir.path().join("absent")));
    }
}

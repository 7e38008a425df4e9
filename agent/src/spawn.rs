//! Starts a task's process with `clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD)` on a stack the
//! calling thread keeps, instead of the standard library's `posix_spawn`.
//!
//! glibc's `posix_spawn` maps a fresh stack for every child and unmaps it afterwards. In a
//! process with many threads the unmap is a TLB shootdown across the other CPUs, and it was 9% of
//! the agent's CPU starting 2,000 `/bin/true` a second (docs/BENCHMARKS.md). The standard
//! library also rebuilds the whole environment of every child from the agent's (6%), and tokio
//! opens a pidfd the clone hands us for free. The child here does what glibc's does: signal
//! handlers back to their defaults, its own process group, working directory, the three standard
//! descriptors, an empty signal mask, `execve`.
//!
//! Only programs already found (an absolute path) and tasks without a cgroup come here; the
//! others keep the standard library's path (a PATH search, a join done in the child before exec).

use std::cell::RefCell;
use std::ffi::{CStr, CString, OsStr, c_char, c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicI32, Ordering};

use tokio::io::unix::AsyncFd;

/// The child's stack: it runs one function of a few system calls until `execve`, on the spawning
/// thread's buffer (the thread is suspended meanwhile, so one buffer per thread is enough).
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// One past the highest signal number on Linux (glibc's `_NSIG`).
const NSIG: c_int = 65;

/// The agent's own environment, read once, as `NAME=value` with the name's length: tasks inherit
/// it, under what the task sets, and the child's environment points into it.
static AGENT_ENV: LazyLock<Vec<(usize, CString)>> = LazyLock::new(|| {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.len(), env_entry(k.as_bytes(), v.as_bytes()).ok()?)))
        .collect()
});

/// A process to start: everything the child reads, built before the clone.
pub struct Launch {
    exe: CString,
    argv: Vec<CString>,
    inherited: Vec<&'static CStr>,
    envp: Vec<CString>,
    cwd: CString,
    stdio: [OwnedFd; 3],
}

fn c_string(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} holds a NUL byte"),
        )
    })
}

fn env_entry(k: &[u8], v: &[u8]) -> io::Result<CString> {
    let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
    kv.extend_from_slice(k);
    kv.push(b'=');
    kv.extend_from_slice(v);
    c_string(&kv, "an environment variable")
}

impl Launch {
    /// `exe` is the path to run, `argv` its arguments from argv[0], `env` what the task sets on top
    /// of the agent's environment, `stdio` its stdin, stdout and stderr.
    pub fn new<'a>(
        exe: &OsStr,
        argv: impl IntoIterator<Item = &'a OsStr>,
        env: &[(&OsStr, &OsStr)],
        cwd: &OsStr,
        stdio: [OwnedFd; 3],
    ) -> io::Result<Launch> {
        let argv = argv
            .into_iter()
            .map(|a| c_string(a.as_bytes(), "an argument"))
            .collect::<io::Result<Vec<_>>>()?;
        let inherited = AGENT_ENV
            .iter()
            .filter(|(n, kv)| {
                let name = &kv.as_bytes()[..*n];
                !env.iter().any(|(k, _)| k.as_bytes() == name)
            })
            .map(|(_, kv)| kv.as_c_str())
            .collect();
        let mut envp = Vec::with_capacity(env.len());
        for (k, v) in env {
            if k.is_empty() || k.as_bytes().contains(&b'=') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("environment variable name {k:?} is empty or holds '='"),
                ));
            }
            envp.push(env_entry(k.as_bytes(), v.as_bytes())?);
        }
        // The child duplicates these onto 0, 1 and 2; one already there (an agent started with
        // a standard descriptor closed) would be overwritten by another before its own turn.
        let stdio = stdio.map(|fd| {
            if fd.as_raw_fd() > 2 {
                return Ok(fd);
            }
            // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor (or -1), which we then own.
            let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
            if new < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `new` is a descriptor nobody else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(new) })
        });
        let [a, b, c] = stdio;
        Ok(Launch {
            exe: c_string(exe.as_bytes(), "the program path")?,
            argv,
            inherited,
            envp,
            cwd: c_string(cwd.as_bytes(), "the working directory")?,
            stdio: [a?, b?, c?],
        })
    }
}

/// What the child reads, by pointer (it shares the parent's memory until `execve`).
struct ChildArgs {
    exe: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    cwd: *const c_char,
    stdio: [RawFd; 3],
    /// Set by the child when a step fails: why it did not reach `execve`'s new program.
    errno: AtomicI32,
}

/// The child, between the clone and `execve`. It shares the parent's memory and the spawning
/// thread's thread-local storage while that thread is suspended, so it allocates nothing, takes
/// no lock, and calls only what is async-signal-safe.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` points at the parent's `ChildArgs`, alive until the child has exec'd or
    // exited (CLONE_VFORK holds the parent until then); every call below is a system call
    // wrapper on pointers into it or on the child's own stack.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        let fail = || -> c_int {
            a.errno.store(*libc::__errno_location(), Ordering::Relaxed);
            libc::_exit(127)
        };
        // A handler here would run in the parent's memory: every handled signal goes back to its
        // default, and SIGPIPE too (Rust ignores it in the agent; programs expect the default).
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..NSIG {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            // glibc refuses its own internal signals: nothing to reset there.
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            let handled = old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN;
            if (handled || sig == libc::SIGPIPE)
                && libc::sigaction(sig, &dfl, std::ptr::null_mut()) != 0
            {
                return fail();
            }
        }
        if libc::setpgid(0, 0) != 0 || libc::chdir(a.cwd) != 0 {
            return fail();
        }
        for (target, &fd) in a.stdio.iter().enumerate() {
            // All sources are above 2 (`Launch::new`), so none is overwritten before its turn,
            // and dup2 leaves the copy open across exec.
            if libc::dup2(fd, target as c_int) < 0 {
                return fail();
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(a.exe, a.argv, a.envp);
        fail()
    }
}

thread_local! {
    /// 16-byte elements: the stack's top must be 16-byte aligned.
    static CHILD_STACK: RefCell<Vec<u128>> = RefCell::new(vec![0; CHILD_STACK_BYTES / 16]);
}

/// Starts the process. Returns once it runs its program (or failed to: the error is the failing
/// step's, such as ENOENT for a missing program or working directory).
pub fn spawn(launch: &Launch) -> io::Result<Spawned> {
    let argv: Vec<*const c_char> = launch
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const c_char> = launch
        .inherited
        .iter()
        .copied()
        .chain(launch.envp.iter().map(CString::as_c_str))
        .map(CStr::as_ptr)
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let args = ChildArgs {
        exe: launch.exe.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: launch.cwd.as_ptr(),
        stdio: launch.stdio.each_ref().map(|fd| fd.as_raw_fd()),
        errno: AtomicI32::new(0),
    };
    let mut pidfd: c_int = -1;
    // SAFETY: signals are blocked around the clone so no handler runs in the child while it
    // shares our memory (it restores the defaults before unblocking); the stack is this thread's
    // own buffer, unused by anything else while the thread is suspended in the clone; `args`,
    // `argv` and `envp` outlive the child's use of them (CLONE_VFORK).
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let pid = CHILD_STACK.with_borrow_mut(|stack| {
            let top = stack.as_mut_ptr().add(stack.len()) as *mut c_void;
            libc::clone(
                child,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
                &args as *const ChildArgs as *mut c_void,
                &mut pidfd as *mut c_int,
            )
        });
        let err = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(err);
        }
        pid
    };
    // SAFETY: CLONE_PIDFD stored a new close-on-exec descriptor for the child in `pidfd`.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let errno = args.errno.load(Ordering::Relaxed);
    if errno != 0 {
        // It exited without exec'ing: collect it before saying why.
        let _ = wait_blocking(&pidfd);
        return Err(io::Error::from_raw_os_error(errno));
    }
    // A pidfd is readable once its process has ended.
    // SAFETY: the `OwnedFd` keeps its descriptor open, unchanged, for as long as it is held.
    match unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) } {
        Ok(fd) => Ok(Spawned {
            pid: pid as u32,
            fd: Some(fd),
            reaped: false,
        }),
        Err(e) => {
            let (pidfd, e) = e.into_parts();
            kill(&pidfd);
            let _ = wait_blocking(&pidfd);
            Err(e)
        }
    }
}

fn kill(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal on a pidfd we hold: the process it names cannot have been
    // replaced by another with the same pid, since it has not been collected.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// A started process, waited for through its pidfd. Dropped before it was waited for, it is
/// killed and collected, as tokio's `kill_on_drop` does.
pub struct Spawned {
    pid: u32,
    fd: Option<AsyncFd<OwnedFd>>,
    reaped: bool,
}

fn status_of(info: &libc::siginfo_t) -> ExitStatus {
    // SAFETY: a siginfo filled by waitid for a child has the status fields.
    let status = unsafe { info.si_status() };
    // As waitpid encodes it: an exit code in the second byte, a signal in the low seven bits.
    let raw = match info.si_code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => status | 0x80,
        _ => status,
    };
    ExitStatus::from_raw(raw)
}

fn waitid(fd: &OwnedFd, flags: c_int) -> io::Result<Option<ExitStatus>> {
    // SAFETY: waitid fills `info`, a plain struct on our stack.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        if libc::waitid(
            libc::P_PIDFD,
            fd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | flags,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok((info.si_pid() != 0).then(|| status_of(&info)))
    }
}

fn wait_blocking(fd: &OwnedFd) -> io::Result<Option<ExitStatus>> {
    loop {
        match waitid(fd, 0) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Whether this kernel can wait on a pidfd (`waitid(P_PIDFD)`, Linux 5.4). `CLONE_PIDFD` came
/// in 5.2: on 5.2 and 5.3 a lean start would succeed and then never be collected, so there the
/// executor keeps the standard library's start. Probed once: with a descriptor number nothing
/// holds (a negative one is EINVAL everywhere), a kernel that knows P_PIDFD answers EBADF, an
/// older one EINVAL.
pub fn pidfd_wait_supported() -> bool {
    static SUPPORTED: LazyLock<bool> = LazyLock::new(|| {
        // SAFETY: waitid with an invalid descriptor fails before touching `info`.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PIDFD,
                i32::MAX as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        let supported = r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EBADF);
        if !supported {
            tracing::info!(
                "this kernel cannot wait on a pidfd (Linux < 5.4): tasks start through the standard library"
            );
        }
        supported
    });
    *SUPPORTED
}

/// A pidfd for `pid`, a child not yet collected, for `Exited`; None where the kernel has no
/// pidfd_open (Linux < 5.3).
pub fn pidfd_of(pid: u32) -> Option<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor just returned to us, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: the `OwnedFd` keeps its descriptor open, unchanged, for as long as it is held.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
}

/// Resolves once the process behind `fd` has ended, without collecting it: until it is
/// collected its pid, and so its process group id, cannot be reused, and the group can still
/// be signalled without hitting a stranger's.
pub async fn exited(fd: &AsyncFd<OwnedFd>) -> io::Result<()> {
    loop {
        if waitid(fd.get_ref(), libc::WNOHANG | libc::WNOWAIT)?.is_some() {
            return Ok(());
        }
        fd.readable().await?.clear_ready();
    }
}

impl Spawned {
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Resolves once the process has ended, leaving it to `wait` to collect.
    pub async fn exited(&mut self) -> io::Result<()> {
        exited(self.fd.as_ref().expect("held until dropped")).await
    }

    /// Waits for the process to end.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let fd = self.fd.as_ref().expect("held until dropped");
        loop {
            if let Some(status) = waitid(fd.get_ref(), libc::WNOHANG)? {
                self.reaped = true;
                return Ok(status);
            }
            // Readable once the process has ended.
            fd.readable().await?.clear_ready();
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let Some(fd) = self.fd.take().map(AsyncFd::into_inner) else {
            return;
        };
        kill(&fd);
        if let Ok(Some(_)) = waitid(&fd, libc::WNOHANG) {
            return;
        }
        // Dying takes a moment: collect it off this thread when a runtime is at hand.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || wait_blocking(&fd));
            }
            Err(_) => {
                let _ = wait_blocking(&fd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::time::Duration;

    fn stdio(out: &std::path::Path) -> [OwnedFd; 3] {
        let null = File::open("/dev/null").unwrap();
        let out = File::create(out).unwrap();
        let err = out.try_clone().unwrap();
        [null.into(), out.into(), err.into()]
    }

    pub(super) fn launch(
        argv: &[&str],
        env: &[(&str, &str)],
        cwd: &str,
        out: &std::path::Path,
    ) -> Launch {
        let env: Vec<(&OsStr, &OsStr)> = env
            .iter()
            .map(|(k, v)| (OsStr::new(k), OsStr::new(v)))
            .collect();
        Launch::new(
            OsStr::new(argv[0]),
            argv.iter().map(OsStr::new),
            &env,
            OsStr::new(cwd),
            stdio(out),
        )
        .unwrap()
    }

    async fn run(l: &Launch) -> ExitStatus {
        let mut p = spawn(l).unwrap();
        tokio::time::timeout(Duration::from_secs(10), p.wait())
            .await
            .expect("exits in time")
            .unwrap()
    }

    #[tokio::test]
    async fn the_child_gets_its_arguments_environment_directory_and_output_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = "echo \"$0 $1 $X $PWD\"; echo err >&2; read line || echo eof";
        let l = launch(
            &["/bin/sh", "-c", script, "zero", "one"],
            &[("X", "from-task")],
            dir.path().to_str().unwrap(),
            &out,
        );
        let status = run(&l).await;
        assert_eq!(status.code(), Some(0));
        let got = std::fs::read_to_string(&out).unwrap();
        let want = format!("zero one from-task {}\nerr\neof\n", dir.path().display());
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn the_task_environment_overrides_the_agents_and_the_rest_is_inherited() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let path = std::env::var("PATH").unwrap();
        let l = launch(
            &["/bin/sh", "-c", "echo \"$PATH|$HOME_OF_TASK\""],
            &[("HOME_OF_TASK", "h")],
            "/",
            &out,
        );
        run(&l).await;
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            format!("{path}|h\n")
        );
        let l = launch(
            &["/bin/sh", "-c", "echo \"$PATH\""],
            &[("PATH", "/nowhere:/bin")],
            "/",
            &out,
        );
        run(&l).await;
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "/nowhere:/bin\n");
    }

    #[tokio::test]
    async fn exit_codes_and_signals_come_back_as_the_standard_library_reports_them() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let l = launch(&["/bin/sh", "-c", "exit 7"], &[], "/", &out);
        assert_eq!(run(&l).await.code(), Some(7));
        let l = launch(&["/bin/sh", "-c", "kill -TERM $$"], &[], "/", &out);
        let status = run(&l).await;
        assert_eq!(
            (status.code(), status.signal()),
            (None, Some(libc::SIGTERM))
        );
    }

    #[tokio::test]
    async fn sigpipe_is_back_to_its_default_and_the_child_leads_its_own_group() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // Field 5 of /proc/PID/stat is the process group.
        let l = launch(
            &["/bin/sh", "-c", "echo $$; cut -d' ' -f5 /proc/$$/stat"],
            &[],
            "/",
            &out,
        );
        run(&l).await;
        let got = std::fs::read_to_string(&out).unwrap();
        let ids: Vec<&str> = got.split_whitespace().collect();
        assert_eq!(ids.len(), 2, "{got}");
        assert_eq!(ids[0], ids[1], "pid and process group: {got}");
        // A shell started with SIGPIPE ignored could not take the default back: it would live.
        let l = launch(&["/bin/sh", "-c", "kill -PIPE $$"], &[], "/", &out);
        assert_eq!(run(&l).await.signal(), Some(libc::SIGPIPE));
    }

    #[tokio::test]
    async fn a_missing_program_or_directory_is_the_spawn_error_and_leaves_no_child() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let l = launch(&["/no/such/program"], &[], "/", &out);
        let e = spawn(&l).err().expect("fails");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let l = launch(&["/bin/true"], &[], "/no/such/dir", &out);
        let e = spawn(&l).err().expect("fails");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let l = launch(&[out.to_str().unwrap()], &[], "/", &out);
        let e = spawn(&l).err().expect("fails");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        let left = uncollected_from_this_thread();
        assert!(left.is_empty(), "failed spawns left {left:?} to collect");
    }

    /// Children of this process, dead and not collected, that never exec'd: they still carry the
    /// spawning thread's name. Read from /proc, collecting nothing, since the children of tests
    /// running alongside (`cargo test` runs them in one process) are theirs to collect.
    fn uncollected_from_this_thread() -> Vec<String> {
        let parent = std::process::id().to_string();
        let thread = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "PID (NAME) STATE PPID ...", where NAME may hold spaces and parentheses.
            let (Some((head, rest)), Some(open)) = (stat.rsplit_once(") "), stat.find(" (")) else {
                continue;
            };
            let name = &head[open + 2..];
            let mut fields = rest.split_whitespace();
            if fields.next() == Some("Z")
                && fields.next() == Some(parent.as_str())
                && name == thread.trim_end()
            {
                found.push(stat);
            }
        }
        found
    }

    #[test]
    fn names_and_values_with_nul_or_a_bad_name_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let bad = |env: &[(&OsStr, &OsStr)]| {
            Launch::new(
                OsStr::new("/bin/true"),
                [OsStr::new("true")],
                env,
                OsStr::new("/"),
                stdio(&out),
            )
            .err()
            .expect("refused")
            .kind()
        };
        assert_eq!(
            bad(&[(OsStr::new("A=B"), OsStr::new("v"))]),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            bad(&[(OsStr::new("A"), OsStr::from_bytes(b"v\0"))]),
            io::ErrorKind::InvalidInput
        );
    }

    #[tokio::test]
    async fn dropping_a_running_process_kills_and_collects_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let l = launch(&["/bin/sleep", "30"], &[], "/", &out);
        let p = spawn(&l).unwrap();
        let pid = p.id() as i32;
        drop(p);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // Gone once collected: signal 0 then fails with ESRCH.
        // SAFETY: kill with signal 0 only checks that the pid exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(std::time::Instant::now() < deadline, "{pid} still there");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod exit_tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn an_ended_process_stays_uncollected_until_waited_so_its_group_id_stays_its_own() {
        assert!(
            pidfd_wait_supported(),
            "this kernel waits on pidfds (Linux >= 5.4)"
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let l = tests::launch(&["/bin/sh", "-c", "exit 3"], &[], "/", &out);
        let mut p = spawn(&l).unwrap();
        let pid = p.id() as i32;
        tokio::time::timeout(Duration::from_secs(10), p.exited())
            .await
            .expect("ends in time")
            .unwrap();
        // A zombie: still there (signal 0 succeeds), so neither its pid nor its group id can
        // be taken by another process yet.
        // SAFETY: kill with signal 0 only checks that the pid exists.
        assert_eq!(unsafe { libc::kill(pid, 0) }, 0);
        assert_eq!(p.wait().await.unwrap().code(), Some(3));
        // SAFETY: as above.
        assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "collected");
        // The same for a child started by the standard library, through pidfd_open.
        let mut c = tokio::process::Command::new("/bin/sh")
            .args(["-c", "exit 4"])
            .spawn()
            .unwrap();
        let pid = c.id().unwrap() as i32;
        let fd = pidfd_of(pid as u32).expect("pidfd_open");
        tokio::time::timeout(Duration::from_secs(10), exited(&fd))
            .await
            .expect("ends in time")
            .unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, 0) }, 0);
        assert_eq!(c.wait().await.unwrap().code(), Some(4));
    }
}

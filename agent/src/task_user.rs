//! Running tasks as a user other than the agent's (`--task-user`). The agent's private key is its
//! identity: a task that could read it could register as this agent from anywhere. Run as
//! another user, with the key readable only by the agent's, a task cannot.

use std::ffi::{CStr, CString};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskUser {
    pub name: String,
    pub uid: u32,
    /// The user's primary group; tasks get no supplementary groups.
    pub gid: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskUserError {
    #[error("--task-user {0}: no such user")]
    Unknown(String),
    #[error(
        "--task-user {0}: root would run tasks with the agent's own powers; pick an unprivileged user"
    )]
    Root(String),
    #[error(
        "--task-user {user}: switching users needs the agent to run as root (it runs as uid {uid})"
    )]
    NotRoot { user: String, uid: u32 },
    #[error(
        "--task-user {user}: the agent's key {key} is readable by {why}; make it `chmod 600` and \
         owned by the agent's user"
    )]
    KeyReadable {
        user: String,
        key: String,
        why: String,
    },
}

/// Looks `spec` (a user name, or a numeric uid) up in the user database.
pub fn resolve(spec: &str) -> Result<TaskUser, TaskUserError> {
    let unknown = || TaskUserError::Unknown(spec.to_owned());
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value to be overwritten by getpw*_r.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let rc = match spec.parse::<u32>() {
        // SAFETY: every pointer is to live, correctly sized storage owned here.
        Ok(uid) => unsafe {
            libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut out)
        },
        Err(_) => {
            let name = CString::new(spec).map_err(|_| unknown())?;
            // SAFETY: as above; `name` is NUL-terminated.
            unsafe {
                libc::getpwnam_r(
                    name.as_ptr(),
                    &mut pwd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut out,
                )
            }
        }
    };
    if rc != 0 || out.is_null() {
        return Err(unknown());
    }
    // SAFETY: getpw*_r succeeded, so pw_name points at a NUL-terminated string inside `buf`.
    let name = unsafe { CStr::from_ptr(pwd.pw_name) }
        .to_string_lossy()
        .into_owned();
    if pwd.pw_uid == 0 {
        return Err(TaskUserError::Root(spec.to_owned()));
    }
    Ok(TaskUser {
        name,
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// Checks the agent can switch to `user` and that `user` cannot read the agent's key.
pub fn check(user: &TaskUser, agent_uid: u32, key: &Path) -> Result<(), TaskUserError> {
    if agent_uid != 0 {
        return Err(TaskUserError::NotRoot {
            user: user.name.clone(),
            uid: agent_uid,
        });
    }
    let readable = |why: String| TaskUserError::KeyReadable {
        user: user.name.clone(),
        key: key.display().to_string(),
        why,
    };
    let meta = std::fs::metadata(key).map_err(|e| readable(format!("nobody we can tell ({e})")))?;
    let mode = meta.mode();
    if meta.uid() == user.uid {
        return Err(readable(format!("{}, its owner", user.name)));
    }
    if mode & 0o004 != 0 {
        return Err(readable("everyone (mode o+r)".into()));
    }
    if mode & 0o040 != 0 && meta.gid() == user.gid {
        return Err(readable(format!("{}'s group (mode g+r)", user.name)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn users_resolve_by_name_or_uid_and_root_or_strangers_are_refused() {
        let nobody = resolve("nobody").unwrap();
        assert_ne!(nobody.uid, 0);
        assert_eq!(resolve(&nobody.uid.to_string()).unwrap(), nobody);
        assert_eq!(
            resolve("no-such-user-here"),
            Err(TaskUserError::Unknown("no-such-user-here".into()))
        );
        assert_eq!(resolve("root"), Err(TaskUserError::Root("root".into())));
        assert_eq!(resolve("0"), Err(TaskUserError::Root("0".into())));
    }

    #[test]
    fn the_agent_must_be_root_and_its_key_unreadable_to_the_task_user() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("a-key.pem");
        std::fs::write(&key, "k").unwrap();
        let user = TaskUser {
            name: "t".into(),
            uid: 4242,
            gid: 4242,
        };
        let set = |mode| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode));
        set(0o600).unwrap();
        assert!(matches!(
            check(&user, 1000, &key),
            Err(TaskUserError::NotRoot { uid: 1000, .. })
        ));
        let owner_uid = std::fs::metadata(&key).unwrap().uid();
        if owner_uid == user.uid {
            return;
        }
        assert_eq!(check(&user, 0, &key), Ok(()));
        set(0o644).unwrap();
        let e = check(&user, 0, &key).unwrap_err().to_string();
        assert!(e.contains("readable by everyone"), "{e}");
    }
}

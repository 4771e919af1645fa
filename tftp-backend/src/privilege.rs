//! Giving up root once the sockets are bound: a TFTP server parses untrusted datagrams and
//! writes files, and nothing it does after binding needs root (tftp-hpa's `-u`, default
//! `tftp` or `nobody`). Which user to become is a pure decision ([`plan`]); [`become_user`] does
//! it for the whole process, before any other thread exists.

use nix::unistd::{Gid, Uid, User};

/// Users tried, in order, when `--user` is not given.
pub const DEFAULT_USERS: [&str; 2] = ["tftp", "nobody"];

/// Who the server runs as after binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Keep the current identity: not root, or root with `--allow-root`.
    Stay,
    /// Become this user (uid and primary gid, no supplementary groups).
    Become { name: String, uid: u32, gid: u32 },
}

/// An account, as the decision needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrivilegeError {
    #[error("no user {0:?} on this host (--user)")]
    NoSuchUser(String),
    #[error("running as root and none of the users {DEFAULT_USERS:?} exists: name one with --user, or pass --allow-root to serve as root")]
    NoDefaultUser,
    #[error("--user {0:?} is root: pass --allow-root to serve as root")]
    RootNeedsAllowRoot(String),
    #[error("cannot become user {name:?}: this process is not root (uid {uid}); start it as root or as {name}")]
    NotRoot { name: String, uid: u32 },
    #[error("cannot become user {name:?}: {step} failed: {error}")]
    Failed { name: String, step: &'static str, error: nix::Error },
    #[error("became user {0:?}, but root could still be regained: refusing to serve")]
    StillRoot(String),
}

/// Decides whom to become. `euid`: the current effective uid; `user`: `--user`;
/// `lookup`: the system's account database.
pub fn plan(euid: u32, user: Option<&str>, allow_root: bool, lookup: impl Fn(&str) -> Option<Account>) -> Result<Plan, PrivilegeError> {
    let account = match user {
        Some(name) => Some(lookup(name).ok_or_else(|| PrivilegeError::NoSuchUser(name.to_owned()))?),
        None if euid == 0 && !allow_root => Some(DEFAULT_USERS.iter().find_map(|name| lookup(name)).ok_or(PrivilegeError::NoDefaultUser)?),
        None => None,
    };
    let Some(account) = account else { return Ok(Plan::Stay) };
    if account.uid == euid {
        return if euid == 0 && !allow_root { Err(PrivilegeError::RootNeedsAllowRoot(account.name)) } else { Ok(Plan::Stay) };
    }
    if euid != 0 {
        return Err(PrivilegeError::NotRoot { name: account.name, uid: euid });
    }
    Ok(Plan::Become { name: account.name, uid: account.uid, gid: account.gid })
}

/// The account named `name` in the system's database (NSS).
#[must_use]
pub fn lookup(name: &str) -> Option<Account> {
    User::from_name(name).ok().flatten().map(|u| Account { name: u.name, uid: u.uid.as_raw(), gid: u.gid.as_raw() })
}

/// The name of the effective user (its uid when it has no name).
#[must_use]
pub fn current_user() -> String {
    let uid = nix::unistd::geteuid();
    User::from_uid(uid).ok().flatten().map_or_else(|| uid.to_string(), |u| u.name)
}

/// Carries `plan` out for the whole process: supplementary groups, then group, then user (in
/// that order: only root may change the first two). Call it while the process has one thread:
/// glibc's `setuid` changes every thread, but a thread spawned earlier is a needless risk.
pub fn become_user(plan: &Plan) -> Result<(), PrivilegeError> {
    let Plan::Become { name, uid, gid } = plan else { return Ok(()) };
    let failed = |step| move |error| PrivilegeError::Failed { name: name.clone(), step, error };
    let (uid, gid) = (Uid::from_raw(*uid), Gid::from_raw(*gid));
    nix::unistd::setgroups(&[gid]).map_err(failed("setgroups"))?;
    nix::unistd::setgid(gid).map_err(failed("setgid"))?;
    nix::unistd::setuid(uid).map_err(failed("setuid"))?;
    // setuid as root sets the real, effective and saved uids: root must be gone for good.
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() || nix::unistd::geteuid().is_root() {
        return Err(PrivilegeError::StillRoot(name.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Account, Plan, PrivilegeError, plan};

    fn accounts(name: &str) -> Option<Account> {
        let (uid, gid) = match name {
            "root" => (0, 0),
            "nobody" => (65534, 65534),
            "deploy" => (1000, 1000),
            _ => return None,
        };
        Some(Account { name: name.to_owned(), uid, gid })
    }

    fn become_(name: &str, id: u32) -> Plan {
        Plan::Become { name: name.to_owned(), uid: id, gid: id }
    }

    #[test]
    fn root_gives_way_to_the_first_default_user_that_exists() {
        assert_eq!(plan(0, None, false, accounts), Ok(become_("nobody", 65534)), "no tftp user here: nobody");
        let with_tftp = |name: &str| if name == "tftp" { Some(Account { name: "tftp".into(), uid: 101, gid: 102 }) } else { accounts(name) };
        assert_eq!(plan(0, None, false, with_tftp), Ok(Plan::Become { name: "tftp".into(), uid: 101, gid: 102 }));
        assert_eq!(plan(0, None, false, |_| None), Err(PrivilegeError::NoDefaultUser));
    }

    #[test]
    fn root_stays_only_when_allowed() {
        assert_eq!(plan(0, None, true, accounts), Ok(Plan::Stay));
        assert_eq!(plan(0, Some("root"), false, accounts), Err(PrivilegeError::RootNeedsAllowRoot("root".into())));
        assert_eq!(plan(0, Some("root"), true, accounts), Ok(Plan::Stay));
        assert_eq!(plan(0, Some("deploy"), true, accounts), Ok(become_("deploy", 1000)), "a named user wins over --allow-root");
    }

    #[test]
    fn a_user_that_is_not_root_cannot_become_another() {
        assert_eq!(plan(1000, None, false, accounts), Ok(Plan::Stay));
        assert_eq!(plan(1000, Some("deploy"), false, accounts), Ok(Plan::Stay), "already that user");
        assert_eq!(plan(1000, Some("nobody"), false, accounts), Err(PrivilegeError::NotRoot { name: "nobody".into(), uid: 1000 }));
        assert_eq!(plan(0, Some("ghost"), false, accounts), Err(PrivilegeError::NoSuchUser("ghost".into())));
    }
}

//! Users and processes the filters name (`-u`, `-p`), looked up on this host.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// `-u`: a user name or a numeric uid, as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum User {
    Id(u32),
    Name(String),
}

impl FromStr for User {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<User, Self::Err> {
        Ok(match s.parse::<u32>() {
            Ok(uid) => User::Id(uid),
            Err(_) => User::Name(s.to_owned()),
        })
    }
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            User::Id(uid) => write!(f, "{uid}"),
            User::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// A user or process the command line names that this host does not have.
#[derive(Debug, Error)]
pub enum Unknown {
    #[error("-u: no user named {0} in {PASSWD}: give a user name or a numeric uid")]
    User(User),
    #[error("-u: cannot read {PASSWD} ({0}): give a numeric uid")]
    Passwd(String),
    #[error("-p: no process with PID {0} (check it with: ps -p {0})")]
    Process(u32),
}

impl Unknown {
    /// Whether the argument itself is wrong (a name no user has: exit 2, as for any bad
    /// argument), rather than the host (an unreadable file, a process that is gone).
    pub fn is_bad_argument(&self) -> bool {
        matches!(self, Unknown::User(_))
    }
}

/// Users are looked up in the file itself: the static binary cannot load the host's NSS
/// modules (a glibc linked in cannot use another glibc's), so directory users (LDAP, sssd)
/// are given by uid.
const PASSWD: &str = "/etc/passwd";

/// The uid of `user`.
pub fn uid(user: &User) -> Result<u32, Unknown> {
    let name = match user {
        User::Id(uid) => return Ok(*uid),
        User::Name(name) => name,
    };
    let passwd = std::fs::read_to_string(PASSWD).map_err(|e| Unknown::Passwd(e.to_string()))?;
    uid_in_passwd(&passwd, name).ok_or_else(|| Unknown::User(user.clone()))
}

/// `pid`, if such a process exists.
pub fn existing_process(pid: u32) -> Result<u32, Unknown> {
    if std::path::Path::new(&format!("/proc/{pid}")).exists() {
        Ok(pid)
    } else {
        Err(Unknown::Process(pid))
    }
}

/// The uid of `name` in passwd(5) text.
fn uid_in_passwd(passwd: &str, name: &str) -> Option<u32> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        /// Any passwd text and name: a uid or none, never a panic; and a well-formed line
        /// for the name, first, is always found.
        #[test]
        fn passwd_text_never_panics_and_finds_what_is_there(
            before in "(([a-z:0-9#]{0,12}:){0,7}\n){0,6}",
            name in "[a-z_][a-z0-9_-]{0,12}",
            uid in any::<u32>(),
            after in ".{0,80}",
        ) {
            let _ = uid_in_passwd(&after, &name);
            let text = format!("{name}:x:{uid}:0::/:/bin/sh\n{after}");
            prop_assert_eq!(uid_in_passwd(&text, &name), Some(uid));
            let mixed = format!("{before}{text}");
            let found = uid_in_passwd(&mixed, &name);
            prop_assert!(found.is_some());
        }
    }

    #[test]
    fn users_come_from_passwd_lines() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\n\
                      # not a user\n\
                      web:x:33:33::/var/www:/usr/sbin/nologin\n\
                      broken:x:notanumber:1::/:/bin/false\n";
        assert_eq!(uid_in_passwd(passwd, "root"), Some(0));
        assert_eq!(uid_in_passwd(passwd, "web"), Some(33));
        assert_eq!(uid_in_passwd(passwd, "broken"), None);
        assert_eq!(uid_in_passwd(passwd, "ro"), None);
        assert_eq!(uid_in_passwd(passwd, "x"), None);
        assert_eq!(uid_in_passwd("", "root"), None);
    }

    #[test]
    fn numbers_are_uids_and_the_rest_names() {
        assert_eq!("1234".parse::<User>().unwrap(), User::Id(1234));
        assert_eq!("-1".parse::<User>().unwrap(), User::Name("-1".into()));
        assert_eq!(uid(&User::Id(7)).unwrap(), 7);
        assert!(matches!(
            uid(&User::Name("no-such-user-here".into())),
            Err(Unknown::User(_))
        ));
    }
}

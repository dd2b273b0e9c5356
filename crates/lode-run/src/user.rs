//! The uid and gid a command runs as, from an image config's or the command line's
//! `user[:group]`, names looked up in the image's own /etc/passwd and /etc/group. Both
//! files are untrusted bytes from the image: they are read through [`ImageRoot`] (inside
//! the image, regular files, at most [`MAX_IMAGE_FILE`] bytes) and parsed by
//! [`find_entry`], which takes any bytes and never fails, skipping lines it cannot read.

use crate::image::{ImageError, ImageRoot, MAX_IMAGE_FILE};

/// A user or group that could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A user name the image's /etc/passwd does not have.
    #[error("user {user:?} is not in the image's /etc/passwd")]
    NoUser {
        /// The name.
        user: String,
    },
    /// A group name the image's /etc/group does not have.
    #[error("group {group:?} is not in the image's /etc/group")]
    NoGroup {
        /// The name.
        group: String,
    },
    /// The image's file could not be read safely.
    #[error("looking up {what} {name:?}: {source}")]
    File {
        /// "user" or "group".
        what: &'static str,
        /// The name or id looked up.
        name: String,
        /// Why the file was refused.
        source: ImageError,
    },
}

/// One line of /etc/passwd (`name:x:uid:gid:...`) or /etc/group (`name:x:gid:members`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Field 1: the name.
    pub name: &'a [u8],
    /// Field 3: the uid (passwd) or gid (group).
    pub id: u32,
    /// Field 4 as a number: the primary gid in passwd; None when it is not one.
    pub group: Option<u32>,
}

/// What to look an entry up by.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    /// Its name (field 1).
    Name(&'a str),
    /// Its id (field 3).
    Id(u32),
}

fn number(field: &[u8]) -> Option<u32> {
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// Parses one line; None for a line without a name and a numeric id (comments, blanks,
/// NIS `+` lines, garbage).
pub fn parse_line(line: &[u8]) -> Option<Entry<'_>> {
    let mut f = line.split(|&b| b == b':');
    let name = f.next().filter(|n| !n.is_empty())?;
    let _password = f.next()?;
    let id = number(f.next()?)?;
    let group = f.next().and_then(number);
    Some(Entry { name, id, group })
}

/// The first entry of a passwd- or group-format file that matches `key`.
pub fn find_entry<'a>(text: &'a [u8], key: Key<'_>) -> Option<Entry<'a>> {
    text.split(|&b| b == b'\n')
        .filter_map(parse_line)
        .find(|e| match key {
            Key::Name(n) => e.name == n.as_bytes(),
            Key::Id(id) => e.id == id,
        })
}

/// A uid and gid from `user[:group]`: names are looked up in the image's own files; a
/// numeric user without a group takes its passwd entry's group, or 0; an empty spec is
/// root.
pub fn resolve_user(root: &ImageRoot, spec: &str) -> Result<(u32, u32), UserError> {
    if spec.is_empty() {
        return Ok((0, 0));
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let read = |path, what, name: &str| {
        root.read_file(path, MAX_IMAGE_FILE)
            .map(Option::unwrap_or_default)
            .map_err(|source| UserError::File {
                what,
                name: name.to_string(),
                source,
            })
    };
    let numeric_user = number(user.as_bytes());
    let (uid, mut gid) = match numeric_user {
        // A numeric user with its group given needs no file at all.
        Some(uid) if group.is_some() => (uid, 0),
        Some(uid) => {
            let passwd = read("/etc/passwd", "user", user)?;
            let gid = find_entry(&passwd, Key::Id(uid)).and_then(|e| e.group);
            (uid, gid.unwrap_or(0))
        }
        None => {
            let passwd = read("/etc/passwd", "user", user)?;
            match find_entry(&passwd, Key::Name(user)) {
                Some(e) => (e.id, e.group.unwrap_or(0)),
                None => {
                    return Err(UserError::NoUser {
                        user: user.to_string(),
                    });
                }
            }
        }
    };
    if let Some(g) = group {
        gid = match number(g.as_bytes()) {
            Some(g) => g,
            None => {
                let groups = read("/etc/group", "group", g)?;
                find_entry(&groups, Key::Name(g))
                    .map(|e| e.id)
                    .ok_or_else(|| UserError::NoGroup {
                        group: g.to_string(),
                    })?
            }
        };
    }
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn image(passwd: &str, group: &str) -> (tempfile::TempDir, ImageRoot) {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("etc")).expect("mkdir");
        std::fs::write(dir.path().join("etc/passwd"), passwd).expect("passwd");
        std::fs::write(dir.path().join("etc/group"), group).expect("group");
        let root = ImageRoot::open(dir.path()).expect("open");
        (dir, root)
    }

    #[test]
    fn users_resolve_in_the_image() {
        let (_dir, r) = image(
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n",
            "root:x:0:\nstaff:x:50:\n",
        );
        assert_eq!(resolve_user(&r, "").unwrap(), (0, 0));
        assert_eq!(resolve_user(&r, "app").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(&r, "1000").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(&r, "4242").unwrap(), (4242, 0));
        assert_eq!(resolve_user(&r, "app:staff").unwrap(), (1000, 50));
        assert_eq!(resolve_user(&r, "7:8").unwrap(), (7, 8));
        assert_eq!(
            resolve_user(&r, "nobody").unwrap_err().to_string(),
            "user \"nobody\" is not in the image's /etc/passwd"
        );
        assert_eq!(
            resolve_user(&r, "app:wheel").unwrap_err().to_string(),
            "group \"wheel\" is not in the image's /etc/group"
        );
    }

    #[test]
    fn a_hostile_passwd_is_named_in_the_error() {
        let (dir, r) = image("", "");
        let passwd = dir.path().join("etc/passwd");
        std::fs::remove_file(&passwd).expect("rm");
        std::os::unix::fs::symlink("/etc/shadow", &passwd).expect("ln");
        assert_eq!(
            resolve_user(&r, "root").unwrap_err().to_string(),
            "looking up user \"root\": /etc/passwd in the image is a symlink to /etc/shadow, \
             which is not in the image"
        );
        // Numeric user and group: no file is read, so nothing can go wrong.
        assert_eq!(resolve_user(&r, "0:0").unwrap(), (0, 0));
        std::fs::remove_file(&passwd).expect("rm");
        std::fs::write(&passwd, vec![b'#'; 2 << 20]).expect("write");
        assert_eq!(
            resolve_user(&r, "1").unwrap_err().to_string(),
            "looking up user \"1\": /etc/passwd in the image is larger than 1048576 bytes \
             (2097152 bytes)"
        );
    }

    #[test]
    fn odd_lines_are_skipped_not_fatal() {
        let text = b"# comment\n\n+nis\n:x:5:5\nbad:x:notanumber:1\nbig:x:99999999999:1\n\
                     app:x:12:x\napp:x:13:13\n\xff\xfe:x:7:7\n";
        let e = find_entry(text, Key::Name("app")).expect("app");
        assert_eq!((e.id, e.group), (12, None));
        assert!(find_entry(text, Key::Name("bad")).is_none());
        assert!(find_entry(text, Key::Name("big")).is_none());
        assert_eq!(
            find_entry(text, Key::Id(7)).map(|e| e.name),
            Some(&b"\xff\xfe"[..])
        );
        assert!(
            find_entry(text, Key::Id(5)).is_none(),
            "an empty name is no entry"
        );
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panic(text in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = find_entry(&text, Key::Name("root"));
            let _ = find_entry(&text, Key::Id(0));
        }

        #[test]
        fn written_entries_are_found(
            entries in proptest::collection::vec(("[a-z_][a-z0-9_-]{0,12}", any::<u32>(), any::<u32>()), 1..20),
            pick in any::<prop::sample::Index>(),
        ) {
            let mut text = Vec::new();
            for (name, id, gid) in &entries {
                text.extend_from_slice(format!("{name}:x:{id}:{gid}:gecos:/home:/bin/sh\n").as_bytes());
            }
            let (name, _, _) = &entries[pick.index(entries.len())];
            // The first line with that name wins, as with getpwnam.
            let first = entries.iter().find(|e| &e.0 == name).expect("present");
            let e = find_entry(&text, Key::Name(name)).expect("found");
            prop_assert_eq!((e.id, e.group), (first.1, Some(first.2)));
            let by_id = entries.iter().find(|x| x.1 == first.1).expect("present");
            let e = find_entry(&text, Key::Id(first.1)).expect("found by id");
            prop_assert_eq!(e.name, by_id.0.as_bytes());
        }
    }
}

//! A writer of cpio archives in the "newc" format, the one the Linux kernel unpacks as an
//! initramfs (Documentation/driver-api/early-userspace/buffer-format.rst in the kernel).
//!
//! Each entry is a 110-byte ASCII header, the NUL-terminated name, padding to 4 bytes,
//! the data, padding to 4 bytes; the archive ends with an entry named `TRAILER!!!`:
//!
//! ```text
//! "070701" ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
//!          namesize check      (13 fields of 8 hex digits each)
//! name \0 [pad to 4] data [pad to 4]
//! ```
//!
//! Entries are written with fixed owners (root) and a zero mtime, so the same inputs give
//! the same bytes.

use std::io::Write;

/// A value that does not fit a newc header field, or a name the format cannot carry.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// A header field is 8 hex digits: 4 GiB - 1 at most.
    #[error("cpio entry {name}: {field} {value} does not fit in 32 bits")]
    TooLarge {
        /// The entry.
        name: String,
        /// The field.
        field: &'static str,
        /// The value.
        value: u64,
    },
    /// Names are NUL-terminated, relative, and never empty.
    #[error("cpio entry name {name:?} is empty, absolute or holds a NUL byte")]
    BadName {
        /// The name.
        name: String,
    },
    /// Writing the archive failed.
    #[error("writing the cpio archive: {0}")]
    Io(#[from] std::io::Error),
}

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `mode`.
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;

/// Writes a newc archive to `W`, entry by entry; [`CpioWriter::finish`] writes the trailer.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    /// Bytes written so far, for the padding.
    offset: u64,
    /// The next inode number (the kernel links entries with equal inode numbers).
    ino: u32,
}

impl<W: Write> CpioWriter<W> {
    /// An archive written to `out`.
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter {
            out,
            offset: 0,
            ino: 1,
        }
    }

    /// A directory `name` (no leading `/`) with permission bits `perm`.
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, &[])
    }

    /// A regular file `name` holding `data`, with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, data)
    }

    /// A symlink `name` pointing at `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        self.entry(name, S_IFLNK | 0o777, 1, target.as_bytes())
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header(TRAILER, 0, 0, 0, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> Result<(), CpioError> {
        if name.is_empty() || name.starts_with('/') || name.contains('\0') || name == TRAILER {
            return Err(CpioError::BadName {
                name: name.to_string(),
            });
        }
        let ino = self.ino;
        self.ino = self.ino.checked_add(1).ok_or_else(|| CpioError::TooLarge {
            name: name.to_string(),
            field: "inode number",
            value: u64::from(u32::MAX) + 1,
        })?;
        self.header(name, ino, mode, nlink, data.len())?;
        self.write(data)?;
        self.pad()
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: usize,
    ) -> Result<(), CpioError> {
        let field = |field, value: usize| {
            u32::try_from(value).map_err(|_| CpioError::TooLarge {
                name: name.to_string(),
                field,
                value: u64::try_from(value).unwrap_or(u64::MAX),
            })
        };
        let filesize = field("file size", size)?;
        let namesize = field("name size", name.len() + 1)?;
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(MAGIC);
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
        // namesize check
        for v in [ino, mode, 0, 0, nlink, 0, filesize, 0, 0, 0, 0, namesize, 0] {
            h.extend_from_slice(format!("{v:08X}").as_bytes());
        }
        debug_assert_eq!(h.len(), HEADER_LEN);
        self.write(&h)?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, b: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(b)?;
        self.offset += u64::try_from(b.len()).unwrap_or(u64::MAX);
        Ok(())
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let n = self.offset.next_multiple_of(4) - self.offset;
        let zeros = [0u8; 3];
        self.write(&zeros[..usize::try_from(n).unwrap_or(0)])
    }
}

/// One entry read back by [`entries`]: name, mode, data.
#[cfg(test)]
type Entry = (String, u32, Vec<u8>);

/// Reads a newc archive back (for the tests: the kernel is the real reader).
#[cfg(test)]
fn entries(mut b: &[u8]) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut offset = 0usize;
    loop {
        let h = &b[..HEADER_LEN];
        assert_eq!(&h[..6], MAGIC);
        let field = |i: usize| {
            let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).expect("ascii");
            usize::from_str_radix(s, 16).expect("hex")
        };
        let (mode, size, namesize) = (field(1), field(6), field(11));
        let name = String::from_utf8(b[HEADER_LEN..HEADER_LEN + namesize - 1].to_vec())
            .expect("utf-8 name");
        let mut at = (offset + HEADER_LEN + namesize).next_multiple_of(4) - offset;
        if name == TRAILER {
            return out;
        }
        let data = b[at..at + size].to_vec();
        at = (offset + at + size).next_multiple_of(4) - offset;
        out.push((name, u32::try_from(mode).expect("mode"), data));
        b = &b[at..];
        offset += at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/hello", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.symlink("sh", "bin/hello").unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn cpio_lists_and_extracts_what_was_written() {
        let Some(cpio) = ["/usr/bin/cpio", "/bin/cpio"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            eprintln!("SKIPPED: cpio is not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, sample()).unwrap();
        let list = std::process::Command::new(cpio)
            .args(["-t", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(list.status.success(), "{list:?}");
        assert_eq!(
            String::from_utf8_lossy(&list.stdout),
            "bin\nbin/hello\nsh\nempty\n"
        );
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let x = std::process::Command::new(cpio)
            .args(["-i", "-d", "--quiet", "-F"])
            .arg(&archive)
            .current_dir(&out)
            .output()
            .unwrap();
        assert!(x.status.success(), "{x:?}");
        assert_eq!(
            std::fs::read(out.join("bin/hello")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            std::fs::read_link(out.join("sh")).unwrap(),
            std::path::Path::new("bin/hello")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("bin/hello"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn entries_are_aligned_and_the_trailer_ends_it() {
        let a = sample();
        assert_eq!(a.len() % 4, 0);
        let e = entries(&a);
        let names: Vec<_> = e.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/hello", "sh", "empty"]);
        assert_eq!(e[0].1, S_IFDIR | 0o755);
        assert_eq!(e[2], ("sh".into(), S_IFLNK | 0o777, b"bin/hello".to_vec()));
    }

    #[test]
    fn bad_names_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "/abs", "a\0b", TRAILER] {
            let e = w.file(bad, 0o644, b"").unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("cpio entry name {bad:?} is empty, absolute or holds a NUL byte")
            );
        }
    }

    proptest! {
        #[test]
        fn any_files_read_back(files in proptest::collection::vec(
            ("[a-z]{1,12}", proptest::collection::vec(any::<u8>(), 0..300)), 0..8)) {
            let mut w = CpioWriter::new(Vec::new());
            for (i, (name, data)) in files.iter().enumerate() {
                w.file(&format!("{i}{name}"), 0o600, data).unwrap();
            }
            let a = w.finish().unwrap();
            let back = entries(&a);
            prop_assert_eq!(back.len(), files.len());
            for ((i, (name, data)), (n, mode, d)) in files.iter().enumerate().zip(back) {
                prop_assert_eq!(n, format!("{i}{name}"));
                prop_assert_eq!(mode, S_IFREG | 0o600);
                prop_assert_eq!(&d, data);
            }
        }
    }
}

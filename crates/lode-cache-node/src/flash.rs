//! The flash tier on disk: one file per item, written to a temporary name and renamed
//! into place, so a reader never sees a half-written item under its final name; each
//! record also carries CRC-32s of its header and its value, checked on every read, so
//! a file damaged after the rename (a crash before the page cache reached the disk, a
//! bad sector) reads as a miss, never as wrong bytes.
//!
//! ```text
//! <flash_dir>/LODE-CACHE-NODE     marker: "lode-cache-node flash 1", locked while a node runs
//! <flash_dir>/<xx>/<id>.item       one item; xx = low byte of id, id = 16 hex digits
//! <flash_dir>/<xx>/<id>.tmp        a write in progress (deleted at start)
//!
//! record (little-endian):
//!  offset  size  field
//!       0     8  magic            "LODECN01"
//!       8     4  header CRC-32    over bytes 12..48 and the key
//!      12     4  value CRC-32
//!      16     8  CAS unique
//!      24     8  expiry           Unix seconds, 0 = never
//!      32     8  value length
//!      40     4  client flags
//!      44     2  key length       1..=250
//!      46     2  reserved         0
//!      48     .  key, then value
//! ```
//!
//! File ids only grow, so when two files hold the same key (a crash between writing the
//! new one and deleting the old), the larger id is the newer.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::protocol::MAX_KEY_LEN;

pub(crate) const MARKER: &str = "LODE-CACHE-NODE";
pub(crate) const MARKER_LINE: &str = "lode-cache-node flash 1";
const MAGIC: [u8; 8] = *b"LODECN01";
pub(crate) const HEADER_LEN: usize = 48;

/// An item's metadata as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) flags: u32,
    pub(crate) expiry: u64,
    pub(crate) cas: u64,
}

/// The fixed part of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    header_crc: u32,
    value_crc: u32,
    meta: Meta,
    value_len: u64,
    key_len: u16,
}

const _: () = assert!(HEADER_LEN == 8 + 4 + 4 + 8 + 8 + 8 + 4 + 2 + 2);

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&self.header_crc.to_le_bytes());
        h[12..16].copy_from_slice(&self.value_crc.to_le_bytes());
        h[16..24].copy_from_slice(&self.meta.cas.to_le_bytes());
        h[24..32].copy_from_slice(&self.meta.expiry.to_le_bytes());
        h[32..40].copy_from_slice(&self.value_len.to_le_bytes());
        h[40..44].copy_from_slice(&self.meta.flags.to_le_bytes());
        h[44..46].copy_from_slice(&self.key_len.to_le_bytes());
        h
    }

    fn decode(h: &[u8; HEADER_LEN]) -> Option<Header> {
        let u16_at = |at: usize| u16::from_le_bytes([h[at], h[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if h[0..8] != MAGIC || u16_at(46) != 0 {
            return None;
        }
        let key_len = u16_at(44);
        if key_len == 0 || usize::from(key_len) > MAX_KEY_LEN {
            return None;
        }
        Some(Header {
            header_crc: u32_at(8),
            value_crc: u32_at(12),
            meta: Meta {
                cas: u64_at(16),
                expiry: u64_at(24),
                flags: u32_at(40),
            },
            value_len: u64_at(32),
            key_len,
        })
    }

    /// The CRC over the header after its CRC field, and the key.
    fn crc_of(encoded: &[u8; HEADER_LEN], key: &[u8]) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&encoded[12..]);
        hasher.update(key);
        hasher.finalize()
    }
}

/// Encodes the header of a record for `key` and `value`.
fn header_for(key: &[u8], meta: Meta, value: &[u8]) -> [u8; HEADER_LEN] {
    let mut header = Header {
        header_crc: 0,
        value_crc: crc32fast::hash(value),
        meta,
        value_len: value.len() as u64,
        key_len: u16::try_from(key.len()).expect("keys are at most 250 bytes"),
    };
    header.header_crc = Header::crc_of(&header.encode(), key);
    header.encode()
}

/// Why a record could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The file is gone (deleted while the read was on its way).
    Missing,
    /// The record does not check out: torn, damaged or not ours.
    Corrupt(&'static str),
    /// The operating system refused.
    Io(io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Missing => f.write_str("file missing"),
            ReadError::Corrupt(what) => write!(f, "corrupt record: {what}"),
            ReadError::Io(e) => write!(f, "read failed: {e}"),
        }
    }
}

/// An item found on disk at start.
#[derive(Debug)]
pub(crate) struct Indexed {
    pub(crate) file: u64,
    pub(crate) key: Bytes,
    pub(crate) meta: Meta,
    pub(crate) value_len: usize,
}

/// What the start-up scan found besides the items.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ScanReport {
    pub(crate) torn: u64,
    pub(crate) temporary: u64,
}

/// The flash directory of a running node.
#[derive(Debug)]
pub(crate) struct FlashDir {
    root: PathBuf,
    /// Holds the lock on the marker for as long as the node runs.
    _marker: File,
}

impl FlashDir {
    /// Creates or opens `root`, checks and locks its marker.
    pub(crate) fn open(root: &Path) -> Result<FlashDir> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::FlashIo { path, source }
        };
        fs::create_dir_all(root).map_err(io_err(root))?;
        let marker_path = root.join(MARKER);
        let marker = match fs::read_to_string(&marker_path) {
            Ok(text) => {
                let found = text.lines().next().unwrap_or("").to_string();
                if found != MARKER_LINE {
                    return Err(Error::FlashFormat {
                        path: marker_path,
                        found,
                        expected: MARKER_LINE,
                    });
                }
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&marker_path)
                    .map_err(io_err(&marker_path))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut entries = fs::read_dir(root).map_err(io_err(root))?;
                if entries.next().is_some() {
                    return Err(Error::FlashDirForeign {
                        path: root.to_path_buf(),
                        marker: MARKER,
                    });
                }
                let mut marker = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&marker_path)
                    .map_err(io_err(&marker_path))?;
                writeln!(marker, "{MARKER_LINE}").map_err(io_err(&marker_path))?;
                marker
            }
            Err(e) => return Err(io_err(&marker_path)(e)),
        };
        match marker.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::FlashDirLocked {
                    path: root.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&marker_path)(e)),
        }
        for shard in 0..=255u8 {
            let dir = root.join(format!("{shard:02x}"));
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(FlashDir {
            root: root.to_path_buf(),
            _marker: marker,
        })
    }

    fn path(&self, file: u64, ext: &str) -> PathBuf {
        self.root
            .join(format!("{:02x}", file & 0xff))
            .join(format!("{file:016x}.{ext}"))
    }

    /// Indexes every record in the directory: reads each header and key, checks them
    /// and the file's length, deletes what fails, leftover temporary files and older
    /// copies of a key. Values are checked when read.
    pub(crate) fn scan(&self, item_size_limit: usize) -> Result<(Vec<Indexed>, ScanReport)> {
        let mut found: Vec<Indexed> = Vec::new();
        let mut report = ScanReport::default();
        for shard in 0..=255u8 {
            let dir = self.root.join(format!("{shard:02x}"));
            let entries = fs::read_dir(&dir).map_err(|source| Error::FlashIo {
                path: dir.clone(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| Error::FlashIo {
                    path: dir.clone(),
                    source,
                })?;
                let path = entry.path();
                let name = entry.file_name();
                let Some((stem, ext)) = name.to_str().and_then(|n| n.split_once('.')) else {
                    continue;
                };
                let Ok(file) = u64::from_str_radix(stem, 16) else {
                    continue;
                };
                match ext {
                    "tmp" => {
                        report.temporary += 1;
                        let _ = fs::remove_file(&path);
                    }
                    "item" => match read_head(&path, item_size_limit) {
                        Some((key, meta, value_len)) => found.push(Indexed {
                            file,
                            key,
                            meta,
                            value_len,
                        }),
                        None => {
                            report.torn += 1;
                            let _ = fs::remove_file(&path);
                        }
                    },
                    _ => {}
                }
            }
        }
        // Newest copy of each key wins; the rest are deleted.
        found.sort_by(|a, b| a.key.cmp(&b.key).then(b.file.cmp(&a.file)));
        let mut kept: Vec<Indexed> = Vec::with_capacity(found.len());
        for item in found {
            if kept.last().is_some_and(|k| k.key == item.key) {
                self.delete(item.file);
            } else {
                kept.push(item);
            }
        }
        kept.sort_by_key(|i| i.file);
        Ok((kept, report))
    }

    /// Writes a record under a temporary name and renames it into place.
    pub(crate) fn write(&self, file: u64, key: &[u8], meta: Meta, value: &[u8]) -> io::Result<()> {
        let tmp = self.path(file, "tmp");
        let result = (|| {
            let mut out = File::create(&tmp)?;
            out.write_all(&header_for(key, meta, value))?;
            out.write_all(key)?;
            out.write_all(value)?;
            fs::rename(&tmp, self.path(file, "item"))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Reads and checks the record `file`, which must hold `key`.
    pub(crate) fn read(&self, file: u64, key: &[u8], limit: usize) -> Result<Bytes, ReadError> {
        let path = self.path(file, "item");
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadError::Missing),
            Err(e) => return Err(ReadError::Io(e)),
        };
        let mut head = [0u8; HEADER_LEN];
        f.read_exact(&mut head).map_err(short)?;
        let header = Header::decode(&head).ok_or(ReadError::Corrupt("bad header"))?;
        let value_len = usize::try_from(header.value_len)
            .ok()
            .filter(|&l| l <= limit)
            .ok_or(ReadError::Corrupt("value length past the item size limit"))?;
        let mut stored_key = vec![0u8; usize::from(header.key_len)];
        f.read_exact(&mut stored_key).map_err(short)?;
        if Header::crc_of(&head, &stored_key) != header.header_crc {
            return Err(ReadError::Corrupt("header checksum"));
        }
        if stored_key != key {
            return Err(ReadError::Corrupt("record holds another key"));
        }
        let mut value = vec![0u8; value_len];
        f.read_exact(&mut value).map_err(short)?;
        // Nothing may follow the value.
        let mut probe = [0u8; 1];
        if f.read(&mut probe).map_err(ReadError::Io)? != 0 {
            return Err(ReadError::Corrupt("trailing bytes"));
        }
        if crc32fast::hash(&value) != header.value_crc {
            return Err(ReadError::Corrupt("value checksum"));
        }
        Ok(Bytes::from(value))
    }

    pub(crate) fn delete(&self, file: u64) {
        // Already gone is fine: a flush may have got there first.
        let _ = fs::remove_file(self.path(file, "item"));
    }

    /// Deletes every record whose id is below `below` (a `flush_all`).
    pub(crate) fn purge_below(&self, below: u64) {
        for shard in 0..=255u8 {
            let Ok(entries) = fs::read_dir(self.root.join(format!("{shard:02x}"))) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".item")) else {
                    continue;
                };
                if u64::from_str_radix(stem, 16).is_ok_and(|id| id < below) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn item_path(&self, file: u64) -> PathBuf {
        self.path(file, "item")
    }
}

fn short(e: io::Error) -> ReadError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ReadError::Corrupt("truncated")
    } else {
        ReadError::Io(e)
    }
}

/// The key and metadata of a record, if its header checks out and the file has the
/// length the header announces.
fn read_head(path: &Path, limit: usize) -> Option<(Bytes, Meta, usize)> {
    let mut f = File::open(path).ok()?;
    let mut head = [0u8; HEADER_LEN];
    f.read_exact(&mut head).ok()?;
    let header = Header::decode(&head)?;
    let mut key = vec![0u8; usize::from(header.key_len)];
    f.read_exact(&mut key).ok()?;
    if Header::crc_of(&head, &key) != header.header_crc {
        return None;
    }
    let value_len = usize::try_from(header.value_len)
        .ok()
        .filter(|&l| l <= limit)?;
    let expected = (HEADER_LEN + key.len()) as u64 + header.value_len;
    if f.metadata().ok()?.len() != expected {
        return None;
    }
    Some((Bytes::from(key), header.meta, value_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: Meta = Meta {
        flags: 7,
        expiry: 0,
        cas: 42,
    };

    #[test]
    fn records_round_trip_and_scan() {
        let dir = tempfile::tempdir().unwrap();
        let flash = FlashDir::open(dir.path()).unwrap();
        let value: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        flash.write(5, b"key", META, &value).unwrap();
        assert_eq!(flash.read(5, b"key", 1 << 20).unwrap(), value);
        assert!(matches!(
            flash.read(5, b"other", 1 << 20),
            Err(ReadError::Corrupt(_))
        ));
        assert!(matches!(
            flash.read(6, b"key", 1 << 20),
            Err(ReadError::Missing)
        ));
        let (items, report) = flash.scan(1 << 20).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].file, 5);
        assert_eq!(items[0].meta, META);
        assert_eq!(items[0].value_len, value.len());
        assert_eq!(report.torn, 0);
    }

    #[test]
    fn damage_is_caught_on_read_and_at_scan() {
        let dir = tempfile::tempdir().unwrap();
        let flash = FlashDir::open(dir.path()).unwrap();
        let value = vec![9u8; 4096];
        for file in 1..=4 {
            flash
                .write(file, format!("k{file}").as_bytes(), META, &value)
                .unwrap();
        }
        // 1: a flipped value byte; 2: truncated; 3: a flipped header byte.
        let mut bytes = fs::read(flash.item_path(1)).unwrap();
        bytes[HEADER_LEN + 2 + 100] ^= 1;
        fs::write(flash.item_path(1), &bytes).unwrap();
        let bytes = fs::read(flash.item_path(2)).unwrap();
        fs::write(flash.item_path(2), &bytes[..bytes.len() - 10]).unwrap();
        let mut bytes = fs::read(flash.item_path(3)).unwrap();
        bytes[20] ^= 1;
        fs::write(flash.item_path(3), &bytes).unwrap();
        assert!(matches!(
            flash.read(1, b"k1", 1 << 20),
            Err(ReadError::Corrupt("value checksum"))
        ));
        assert!(matches!(
            flash.read(2, b"k2", 1 << 20),
            Err(ReadError::Corrupt("truncated"))
        ));
        assert!(matches!(
            flash.read(3, b"k3", 1 << 20),
            Err(ReadError::Corrupt("header checksum"))
        ));
        assert_eq!(flash.read(4, b"k4", 1 << 20).unwrap(), value);
        // The scan checks headers and lengths, not values: 1 is indexed (its read will
        // fail), 2 and 3 are deleted.
        let (items, report) = flash.scan(1 << 20).unwrap();
        let files: Vec<u64> = items.iter().map(|i| i.file).collect();
        assert_eq!(files, [1, 4]);
        assert_eq!(report.torn, 2);
        assert!(!flash.item_path(2).exists());
    }

    #[test]
    fn newest_copy_of_a_key_wins_and_temporaries_go() {
        let dir = tempfile::tempdir().unwrap();
        let flash = FlashDir::open(dir.path()).unwrap();
        flash.write(3, b"k", META, b"old").unwrap();
        flash.write(9, b"k", META, b"new").unwrap();
        fs::write(flash.path(10, "tmp"), b"half a rec").unwrap();
        let (items, report) = flash.scan(1 << 20).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].file, 9);
        assert_eq!(report.temporary, 1);
        assert!(!flash.item_path(3).exists());
        assert!(!flash.path(10, "tmp").exists());
    }

    #[test]
    fn directories_are_checked_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("precious.txt"), b"not ours").unwrap();
        let err = FlashDir::open(dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cache node flash tier: {} is not empty and has no LODE-CACHE-NODE file; \
                 refusing to use a directory a cache node did not create (give an empty or \
                 new directory)",
                dir.path().display()
            )
        );
        let fresh = dir.path().join("node");
        let _first = FlashDir::open(&fresh).unwrap();
        let err = FlashDir::open(&fresh).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cache node flash tier: {} is in use by another cache node",
                fresh.display()
            )
        );
        let other = dir.path().join("other");
        fs::create_dir(&other).unwrap();
        fs::write(other.join(MARKER), "lode-cache-node flash 99\n").unwrap();
        assert_eq!(
            FlashDir::open(&other).unwrap_err().to_string(),
            format!(
                "cache node flash tier: {} holds format \"lode-cache-node flash 99\", this node \
                 writes \"lode-cache-node flash 1\"",
                other.join(MARKER).display()
            )
        );
    }
}

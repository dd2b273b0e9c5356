//! Read alarms (docs/gc.md): a read of a root past retirement's grace (expired or being
//! deleted) leaves `roots/<root>/alarms/<manifest id>` naming who read which manifest
//! and when. While any alarm object exists, the collector deletes nothing of the root.
//!
//! ```json
//! {"version": 1, "manifest": "<64 hex>", "reader": "agent on host-a (pid 4242)", "at": 1796400000}
//! ```

use lode_format::ManifestId;
use serde::{Deserialize, Serialize};

/// The most bytes of a reader's description kept in an alarm.
pub const MAX_READER_BYTES: usize = 256;

/// One read of an expired root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Alarm {
    /// The manifest that was read.
    pub manifest: ManifestId,
    /// Who read it (a process and host, as the reader described itself).
    pub reader: String,
    /// When (unix seconds).
    pub at: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlarmFile {
    version: u32,
    manifest: String,
    reader: String,
    at: u64,
}

impl Alarm {
    /// A reader's description cut to [`MAX_READER_BYTES`] at a character boundary, with
    /// control characters replaced, so that an alarm is one printable line.
    pub fn new(manifest: ManifestId, reader: &str, at: u64) -> Alarm {
        let mut r: String = reader
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if r.len() > MAX_READER_BYTES {
            let mut end = MAX_READER_BYTES;
            while !r.is_char_boundary(end) {
                end -= 1;
            }
            r.truncate(end);
        }
        Alarm {
            manifest,
            reader: r,
            at,
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        let f = AlarmFile {
            version: 1,
            manifest: self.manifest.to_hex(),
            reader: self.reader.clone(),
            at: self.at,
        };
        let mut v = serde_json::to_vec(&f).expect("serialising plain data");
        v.push(b'\n');
        v
    }

    /// Parses an alarm object. A refusal says what is wrong, never what the bytes are.
    pub fn from_json(bytes: &[u8]) -> Result<Alarm, &'static str> {
        let f: AlarmFile =
            serde_json::from_slice(bytes).map_err(|_| "not an alarm record (not its JSON)")?;
        if f.version != 1 {
            return Err("an alarm record of an unknown version");
        }
        let manifest = f
            .manifest
            .parse::<ManifestId>()
            .map_err(|_| "an alarm record whose manifest is not 64 hex digits")?;
        if f.reader.len() > MAX_READER_BYTES || f.reader.chars().any(char::is_control) {
            return Err("an alarm record whose reader is too long or not printable");
        }
        Ok(Alarm {
            manifest,
            reader: f.reader,
            at: f.at,
        })
    }
}

impl std::fmt::Display for Alarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "manifest {} read by {} at {} (unix seconds)",
            self.manifest, self.reader, self.at
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn readers_are_cut_and_made_printable() {
        let id = ManifestId::from_bytes([7; 32]);
        let a = Alarm::new(id, &format!("a\nb{}", "é".repeat(200)), 5);
        assert!(a.reader.len() <= MAX_READER_BYTES);
        assert!(a.reader.starts_with("a b"));
        assert_eq!(Alarm::from_json(&a.to_json()).unwrap(), a);
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_are_refused(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Alarm::from_json(&raw);
        }

        #[test]
        fn alarms_round_trip(m in any::<[u8; 32]>(), reader in ".{0,300}", at in any::<u64>()) {
            let a = Alarm::new(ManifestId::from_bytes(m), &reader, at);
            prop_assert_eq!(Alarm::from_json(&a.to_json()).unwrap(), a);
        }
    }
}

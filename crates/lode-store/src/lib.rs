//! lode's origin: chunks, manifests, tags and roots in an object store (docs/format.md). A local directory is the embedded default; S3 or any S3-compatible
//! service is the scale-out origin; an in-memory store serves tests.
//!
//! Where this fits: docs/architecture.md, "The flow of an image".
//!
//! ```text
//! roots/<root>/ROOT                     the root's state and wrapped salt (JSON)
//! roots/<root>/chunks/<2 hex>/<name>    chunk ciphertext; name = SHA-256(bytes)
//! roots/<root>/manifests/<id>           manifest bytes; id = SHA-256(bytes)
//! tags/<image ref>                      a manifest id in hex (the ref percent-encoded)
//! roots/<root>/forwards/<id>           the id manifest <id> was copied forward as
//! pins/<manifest id>                    the same id in hex: the manifest is kept untagged
//! roots/<root>/alarms/<id>             a read of manifest <id> after the root expired
//! control/<key>                         the assignment service's records (JSON)
//! ```
//!
//! Chunks and manifests are content-addressed: a put checks that the bytes hash to the
//! name, never overwrites a good object (the store's atomic create), and costs no upload
//! when the name is already there with the right bytes; an object under the name that is
//! damaged (other bytes, another size) is replaced. A get checks the bytes against the
//! name before returning them.
//!
//! Everything read back is untrusted: every read is bounded by the most its kind may be
//! (a chunk by its chunk size plus the seal's tag, a manifest by the format's cap, a tag,
//! a pin and a root record by a few KiB), checked against the size the backend reports before
//! a byte is read and counted as it arrives; errors name the object, never quote it. A
//! local store refuses links and special files (see [`local`]).

mod alarm;
pub mod local;
mod location;
mod root;
mod store;

pub use alarm::{Alarm, MAX_READER_BYTES};
pub use local::StagingFile;
pub use location::StoreLocation;
pub use root::{RootRecord, RootState};
pub use store::{
    AlarmList, BadPin, BadTag, MAX_CONTROL_LIST, MAX_CONTROL_OBJECT, MAX_MANIFEST_OBJECT,
    MAX_PIN_OBJECT, MAX_ROOT_OBJECT, MAX_TAG_OBJECT, ObjectVersion, PinList, PutOutcome,
    RootObject, RootObjectKind, Store, StoreError, TagList, check_control_key, parse_pin_body,
    parse_tag_body,
};

//! lode's origin: chunks, manifests, tags and roots in an object store (DESIGN.md,
//! "Store layout"). A local directory is the embedded default; S3 or any S3-compatible
//! service is the scale-out origin; an in-memory store serves tests.
//!
//! ```text
//! roots/<root>/ROOT                     the root's state and wrapped salt (JSON)
//! roots/<root>/chunks/<2 hex>/<name>    chunk ciphertext; name = SHA-256(bytes)
//! roots/<root>/manifests/<id>           manifest bytes; id = SHA-256(bytes)
//! tags/<image ref>                      a manifest id in hex (the ref percent-encoded)
//! ```
//!
//! Chunks and manifests are content-addressed: a put checks that the bytes hash to the
//! name, never overwrites a good object (the store's atomic create; an object of the
//! wrong size under the name is damage and is replaced), and costs no upload when the name
//! is already there. A get checks the bytes against the name before returning them.

mod location;
mod root;
mod store;

pub use location::StoreLocation;
pub use root::{RootRecord, RootState};
pub use store::{PutOutcome, Store, StoreError};

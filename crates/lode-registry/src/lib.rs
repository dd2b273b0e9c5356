//! Pulls a container image from an OCI / Docker registry into a local OCI image layout.
//!
//! Where this fits: docs/architecture.md, "The flow of an image".
//!
//! This is the registry input of the flattener (docs/flatten.md): `lode
//! flatten docker://HOST/REPO:TAG` pulls the image into a layout directory with
//! [`pull_to_layout`] and then flattens the pulled manifest digest from that directory
//! (`oci:DIR:@sha256:HEX`), never a tag another pull could move meanwhile. Keeping the network part here means the flattener only ever reads a
//! layout, and every byte it reads has already been checked against its digest.
//!
//! The flow: parse the reference ([`reference`]), authenticate (anonymous, basic, or the
//! bearer-token dance that `oci-client` performs), fetch the manifest and, for an image
//! index, the manifest of the wanted platform ([`manifest`] parses both, with a size cap),
//! then stream the config and layer blobs into the layout ([`layout`]), hashing as they
//! arrive and renaming a blob into place only once its sha256 matches the descriptor.

mod error;
mod layout;
mod manifest;
mod pull;
mod reference;

pub use error::{AuthKind, Error};
pub use manifest::{Digest, Platform};
pub use pull::{BlobInfo, PullOptions, Pulled, RegistryAuth, pull_to_layout};
pub use reference::is_loopback_registry;

//! Test support shared by lode's crates: what their tests and benchmarks would otherwise
//! each write again.
//!
//! A test that needs a tool (nbdcopy, e2fsck, memcached…) or root may skip where it
//! cannot run — on a developer's machine without the package. Where the project's test
//! script ran as root or under CI, it installed every tool and set `LODE_REQUIRE_TOOLS=1`:
//! there a missing tool is a broken environment, and the test fails instead of passing
//! without having run. Everything here that looks for a tool or for root says so through
//! [`skip`].
//!
//! - Skipping: [`skip`], [`tool`], [`tool_from`], [`which`], [`is_root`], [`root_or_skip`].
//! - Inputs: [`free_port`], [`seeded_bytes`], [`fill_seeded`], [`set_aws_env`].
//! - Real servers on 127.0.0.1, stopped when dropped: [`Memcached`], [`Moto`], and with
//!   the `s3` feature `S3Fs` (an S3 server in the test's own process).
//! - ext4 images: [`LoopMount`], [`e2fsck_clean`]; and mounts: [`is_mounted`],
//!   [`MountGuard`].
//! - A network of namespaces with link delays and faults (`scripts/testnet.sh`):
//!   [`TestNet`].
//! - libnbd's Python binding: [`python_with_nbd`], [`nbd_python_path`].

use std::path::PathBuf;

mod bytes;
mod ext4;
mod memcached;
mod moto;
mod mount;
mod netns;
#[cfg(feature = "proxy")]
mod proxy;
mod python;
#[cfg(feature = "s3")]
mod s3;

pub use bytes::{fill_seeded, seeded_bytes};
pub use ext4::e2fsck_clean;
pub use memcached::Memcached;
pub use moto::Moto;
pub use mount::{LoopMount, MountGuard, is_mounted};
pub use netns::{NetOptions, TestNet, testnet_script};
#[cfg(feature = "proxy")]
pub use proxy::DelayProxy;
pub use python::{nbd_python_path, python_with_nbd};
#[cfg(feature = "s3")]
pub use s3::{Faults, S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, S3Fs, serve_dir};

/// The variable that turns skips into failures.
pub const REQUIRE_TOOLS: &str = "LODE_REQUIRE_TOOLS";

/// Where [`tool`] looks after `PATH`: a user's `PATH` often lacks the sbin directories
/// that hold e2fsck, mkfs.ext4 and losetup.
const SYSTEM_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Whether skips are failures here.
pub fn tools_required() -> bool {
    std::env::var(REQUIRE_TOOLS).is_ok_and(|v| v == "1")
}

/// Says why the calling test does not run. Panics (the test fails) when
/// [`tools_required`]; otherwise prints `SKIPPED: why` and returns, and the caller
/// returns too.
#[track_caller]
pub fn skip(why: &str) {
    assert!(
        !tools_required(),
        "{why}, but {REQUIRE_TOOLS}=1: scripts/test.sh installs everything the tests need \
         (as root or under CI), so this test must run"
    );
    eprintln!("SKIPPED: {why}");
}

/// The path of the program `name`, found on `PATH` or else in the system's bin and sbin
/// directories; `None` after [`skip`] said it is missing. Run it by this path: it need
/// not be on `PATH`.
#[track_caller]
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = which(name);
    if found.is_none() {
        skip(&format!("{name} is not installed"));
    }
    found
}

/// [`tool`], naming in its skip the Debian package that installs `name`.
#[track_caller]
pub fn tool_from(name: &str, package: &str) -> Option<PathBuf> {
    let found = which(name);
    if found.is_none() {
        skip(&format!(
            "{name} is not installed (apt-get install {package})"
        ));
    }
    found
}

/// Where [`tool`] would find `name`, without a skip: for a test that has another way
/// when it is absent.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|c| c.is_file())
}

/// Whether this process runs as root (its effective uid is 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        // "Uid:" is followed by the real, effective, saved and filesystem uids.
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// [`is_root`], after [`skip`] with `why` when it is not.
#[track_caller]
pub fn root_or_skip(why: &str) -> bool {
    let root = is_root();
    if !root {
        skip(why);
    }
    root
}

/// Replaces this process's AWS environment: removes every `AWS_*` variable, then sets
/// `vars`, so that a client configured from the environment (lode's S3 store, the AWS
/// SDK) sees these and nothing of the developer's own profile.
///
/// # Safety
///
/// As for [`std::env::set_var`]: no other thread may read or write the environment
/// meanwhile. Call it before the test starts any thread.
pub unsafe fn set_aws_env<K, V>(vars: impl IntoIterator<Item = (K, V)>)
where
    K: AsRef<std::ffi::OsStr>,
    V: AsRef<std::ffi::OsStr>,
{
    let old: Vec<_> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| k.as_encoded_bytes().starts_with(b"AWS_"))
        .collect();
    for k in old {
        // SAFETY: the caller has no other thread touching the environment.
        unsafe { std::env::remove_var(k) };
    }
    for (k, v) in vars {
        // SAFETY: as above.
        unsafe { std::env::set_var(k, v) };
    }
}

/// A TCP port of 127.0.0.1 that was free a moment ago, for a server the test starts
/// itself. Another process may take it before that server binds it: a caller that
/// starts a separate program retries with a new port when the program cannot bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_on_every_system_is_found_by_its_full_path() {
        let sh = which("sh").expect("sh is installed everywhere");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(which("lode-testkit-no-such-tool"), None);
    }

    #[test]
    fn the_aws_environment_is_replaced_whole() {
        // SAFETY: the other tests of this binary, which may run alongside, read the
        // environment only through std::env, which these calls are synchronised with.
        unsafe {
            std::env::set_var("AWS_PROFILE", "someone-else");
            set_aws_env([("AWS_REGION", "eu-west-1")]);
        }
        assert_eq!(std::env::var_os("AWS_PROFILE"), None);
        assert_eq!(std::env::var("AWS_REGION").as_deref(), Ok("eu-west-1"));
    }

    #[test]
    fn free_ports_can_be_bound() {
        let port = free_port();
        assert_ne!(port, 0);
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    }

    #[test]
    fn root_is_the_effective_uid_of_this_process() {
        // /proc/self belongs to the effective user.
        use std::os::unix::fs::MetadataExt;
        let euid = std::fs::metadata("/proc/self").unwrap().uid();
        assert_eq!(is_root(), euid == 0);
    }
}

//! Test support shared by lode's crates.
//!
//! A test that needs a tool (nbdcopy, e2fsck, memcached…) or root may skip where it
//! cannot run — on a developer's machine without the package. Where the project's test
//! script ran as root or under CI, it installed every tool and set `LODE_REQUIRE_TOOLS=1`:
//! there a missing tool is a broken environment, and the test fails instead of passing
//! without having run.

/// The variable that turns skips into failures.
pub const REQUIRE_TOOLS: &str = "LODE_REQUIRE_TOOLS";

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

/// The path of `name` on `PATH`, or `None` after [`skip`] said it is missing.
pub fn tool(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|c| c.is_file())
    });
    if found.is_none() {
        skip(&format!("{name} is not installed"));
    }
    found
}

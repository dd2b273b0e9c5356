//! What the flattener holds per entry, counted by a global allocator (not
//! measured: the count is the same on every run, so it can be asserted).
//! The peak RSS of a flatten of 10^6 entries is the benchmark's
//! (`benches/flatten_memory.rs`).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use lode_ext4::ImageSink;
use lode_oci::FlattenOptions;

/// Counts the bytes allocated now and at most.
struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grow(by: usize) {
    let now = NOW.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is passed on to `System` unchanged; the counters are
// only read, never used to decide an allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract for `layout`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        NOW.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            NOW.fetch_sub(layout.size(), Ordering::Relaxed);
            grow(new_size);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// An image sink that keeps nothing, so only the flattener's own
/// structures are counted.
struct Discard;

impl ImageSink for Discard {
    fn write_all_at(&mut self, _: &[u8], _: u64) -> io::Result<()> {
        Ok(())
    }
    fn set_len(&mut self, _: u64) -> io::Result<()> {
        Ok(())
    }
}

/// A layer of `entries` entries shaped like a Python site-packages tree:
/// directories, empty and small files, symlinks and hardlinks.
fn layer(entries: usize) -> Vec<u8> {
    let mut l = Layer::new();
    let mut n = 0;
    let mut pkg = 0;
    while n < entries {
        let dir = format!("usr/lib/python3/site-packages/package_{pkg:05}");
        l.dir(&dir, 0o755);
        n += 1;
        for f in 0..99 {
            if n == entries {
                break;
            }
            n += 1;
            let path = format!("{dir}/module_file_{f:04}.py");
            match f % 20 {
                7 => l.hardlink(&path, &format!("{dir}/module_file_{:04}.py", f - 1)),
                13 => l.symlink(&path, "module_file_0000.py"),
                n if n % 3 == 0 => l.file(&path, &[b'x'; 300]),
                _ => l.file(&path, b""),
            };
        }
        pkg += 1;
    }
    l.finish()
}

#[test]
fn flatten_holds_under_300_bytes_per_entry() {
    const ENTRIES: usize = 100_000;
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = OciLayout::new(&tmp.path().join("layout"));
    layout.image("t", &[(layer(ENTRIES), Comp::None)]);
    let mut source = layout.source("t").open().unwrap();

    let before = NOW.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let (_, done) = lode_oci::flatten_source(
        source.as_mut(),
        Discard,
        &FlattenOptions::default(),
        &|_| {},
    )
    .unwrap();
    let held = PEAK.load(Ordering::Relaxed) - before;
    let per_entry = held / ENTRIES;
    println!("peak {held} bytes allocated for {ENTRIES} entries: {per_entry} per entry");
    // Implied directories (4 per package path) are not in the count.
    assert_eq!(done.layers[0].entries, ENTRIES as u64);
    assert!(per_entry < 300, "{per_entry} bytes per entry");
}

//! The VMM's side of the handshake, for tests and demos: what Firecracker does when it
//! restores a snapshot with a UFFD backend. It maps anonymous guest memory, creates a
//! userfaultfd (with remove events, for a balloon), registers the memory for missing
//! pages, connects to the handler's socket and sends the descriptor with the regions as
//! JSON. Reading the memory then faults pages in through the handler.
//!
//! The client keeps its own descriptor of the userfaultfd, as Firecracker does, so if the
//! handler dies the registration stays and the next fault on a missing page blocks for
//! ever (it does not read zeros). [`Restore::watch`] notices the handler's socket closing
//! and lets the caller stop instead of hanging.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::ptr::NonNull;
use std::time::Duration;

use crate::mapping::{Mapping, PAGE_SIZE};
use crate::socket::send_handshake;
use crate::uffd::{FEATURE_EVENT_REMOVE, Uffd};
use crate::{SnapError, usize_of};

/// Anonymous memory standing in for guest memory.
#[derive(Debug)]
pub struct GuestMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; sharing it across threads is
// as safe as sharing a `[u8]`, and nothing else unmaps it.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; all access through `&self` is reads or madvise.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps `len` bytes (a multiple of the page size) of private anonymous memory.
    pub fn new(len: u64) -> Result<Self, SnapError> {
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l > 0 && (*l as u64).is_multiple_of(PAGE_SIZE))
            .ok_or_else(|| {
                SnapError::Unsupported(format!(
                    "guest memory of {len} bytes: not a positive multiple of 4096"
                ))
            })?;
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(SnapError::Io {
                what: format!("mapping {len} bytes of guest memory"),
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast())
            .ok_or_else(|| SnapError::Unsupported("mmap returned null".into()))?;
        Ok(Self { ptr, len })
    }

    /// The first address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether the memory is empty (never: [`GuestMemory::new`] refuses zero).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory as bytes. Reading a missing page blocks until the handler installs it.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is a live mapping owned by `self`, readable, and only
        // changed by the kernel (page installs), never through a Rust reference.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Drops `[offset, offset+len)` as a balloon does (MADV_DONTNEED): it reads as zero
    /// afterwards, and the handler is told by a remove event.
    pub fn remove(&self, offset: u64, len: u64) -> Result<(), SnapError> {
        let in_range = offset.is_multiple_of(PAGE_SIZE)
            && len.is_multiple_of(PAGE_SIZE)
            && offset
                .checked_add(len)
                .is_some_and(|e| e <= self.len as u64);
        if !in_range {
            return Err(SnapError::Unsupported(format!(
                "cannot remove {len} bytes at {offset}: not whole pages inside the {}-byte memory",
                self.len
            )));
        }
        // SAFETY: the range is whole pages inside this mapping (checked above).
        let r = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(usize_of(offset)).cast(),
                usize_of(len),
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(SnapError::Io {
                what: format!("madvise(DONTNEED) of {len} bytes at {offset}"),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing borrows now.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A restore in progress: guest memory served by a handler.
#[derive(Debug)]
pub struct Restore {
    /// The guest memory.
    pub memory: GuestMemory,
    /// The regions sent.
    pub mappings: Vec<Mapping>,
    /// The generation id the handler announced, if it did.
    pub generation_id: Option<String>,
    stream: UnixStream,
    _uffd: Uffd,
}

/// The regions Firecracker would send for `memory` split into `regions` equal parts
/// (page-aligned; the last takes the rest), each backed by the same snapshot bytes.
pub fn split_regions(memory: &GuestMemory, regions: usize) -> Vec<Mapping> {
    let pages = memory.len() / PAGE_SIZE;
    let n = (regions.max(1) as u64).min(pages);
    let per = pages / n;
    (0..n)
        .map(|i| {
            let first = i * per;
            let count = if i == n - 1 { pages - first } else { per };
            Mapping {
                base: memory.addr() + first * PAGE_SIZE,
                size: count * PAGE_SIZE,
                offset: first * PAGE_SIZE,
                page_size: PAGE_SIZE,
            }
        })
        .collect()
}

/// Firecracker's JSON for `mappings` (with the deprecated `page_size_kib` it still sends).
pub fn mappings_json(mappings: &[Mapping]) -> Vec<u8> {
    let v: Vec<_> = mappings
        .iter()
        .map(|m| {
            serde_json::json!({"base_host_virt_addr": m.base, "size": m.size, "offset": m.offset,
                "page_size": m.page_size, "page_size_kib": m.page_size})
        })
        .collect();
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Restores `size` bytes of memory from the handler at `socket`, as `regions` regions.
pub fn restore(socket: &Path, size: u64, regions: usize) -> Result<Restore, SnapError> {
    restore_with(socket, size, |m| split_regions(m, regions))
}

/// Restores `size` bytes of memory, all registered with the userfaultfd, announcing the
/// regions `regions` returns for it (tests use this to announce less than they register).
pub fn restore_with(
    socket: &Path,
    size: u64,
    regions: impl FnOnce(&GuestMemory) -> Vec<Mapping>,
) -> Result<Restore, SnapError> {
    let memory = GuestMemory::new(size)?;
    let uffd = Uffd::create(FEATURE_EVENT_REMOVE)?;
    uffd.register(memory.addr(), memory.len())?;
    let mappings = regions(&memory);
    let stream = UnixStream::connect(socket).map_err(|source| SnapError::Io {
        what: format!(
            "connecting to the page-fault handler at {}",
            socket.display()
        ),
        source,
    })?;
    send_handshake(&stream, &mappings_json(&mappings), Some(uffd.as_raw_fd())).map_err(
        |source| SnapError::Io {
            what: "sending the handshake".into(),
            source,
        },
    )?;
    let line = read_line(&stream, Some(Duration::from_secs(30)))?;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(SnapError::Handshake(format!("the handler refused: {e}")));
    }
    let generation_id = v
        .get("generation_id")
        .and_then(|g| g.as_str())
        .map(str::to_owned);
    Ok(Restore {
        memory,
        mappings,
        generation_id,
        stream,
        _uffd: uffd,
    })
}

/// Reads one line from `stream`, byte by byte (nothing past the newline is consumed).
fn read_line(stream: &UnixStream, timeout: Option<Duration>) -> Result<String, SnapError> {
    let io = |source| SnapError::Io {
        what: "reading the handler's reply".into(),
        source,
    };
    stream.set_read_timeout(timeout).map_err(io)?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match (&*stream).read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 64 * 1024 => line.push(b[0]),
            Ok(_) => break,
            Err(e) => return Err(io(e)),
        }
    }
    stream.set_read_timeout(None).map_err(io)?;
    if line.is_empty() {
        return Err(SnapError::Handshake(
            "the handler closed the connection without answering".into(),
        ));
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

impl Restore {
    /// Starts a thread that waits for the handler's socket to close and then calls
    /// `on_gone` with the handler's last error line, if it sent one. Faults cannot be
    /// served after that; a VMM should stop the guest rather than let it hang.
    pub fn watch(&self, on_gone: impl FnOnce(String) + Send + 'static) -> Result<(), SnapError> {
        let stream = self.stream.try_clone().map_err(|source| SnapError::Io {
            what: "watching the handler's socket".into(),
            source,
        })?;
        std::thread::spawn(move || {
            let mut last = String::new();
            while let Ok(l) = read_line(&stream, None) {
                last = l;
            }
            let v: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
            let why = v
                .get("error")
                .and_then(|e| e.as_str())
                .map(|e| format!("the page-fault handler stopped serving: {e}"))
                .unwrap_or_else(|| {
                    "the page-fault handler closed its socket (it died or was stopped)".into()
                });
            on_gone(why);
        });
        Ok(())
    }
}

//! userfaultfd, spoken directly: the few ioctls a page-fault handler and a Firecracker-like
//! client need, and the one parser of the kernel's event records ([`parse_event`]).
//!
//! lode talks to the kernel with its own definitions of `linux/userfaultfd.h` rather than
//! a bindgen'd crate: the ABI is six small structs, stable since Linux 4.3, and owning it
//! keeps every errno with the address it concerns.
//!
//! ```text
//! struct uffd_msg (32 bytes, packed)         UFFDIO_COPY { dst, src, len, mode, copy }
//!  0  u8   event                                 copy ← bytes copied, or -errno
//!  1  u8   reserved, u16 reserved, u32 reserved  ioctl: 0 all copied; EAGAIN after a
//!  8  u64  arg0 (pagefault: flags; remove:       partial copy (copy > 0) or while the
//!           start; remap: from)                  address space is changing (copy =
//! 16  u64  arg1 (pagefault: address; remove:     -EAGAIN); EEXIST when the first page is
//!           end; remap: to)                      already present
//! 24  u64  arg2 (pagefault: ptid; remap: len)
//! ```

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

/// The size of one `uffd_msg`.
pub const MSG_SIZE: usize = 32;

const UFFD_API: u64 = 0xAA;
const UFFDIO: u64 = 0xAA;
/// `UFFD_FEATURE_EVENT_REMOVE`: madvise(DONTNEED/REMOVE) on registered memory is reported.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_EVENT_UNMAP`: munmap of registered memory is reported.
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const REGISTER_MODE_MISSING: u64 = 1;
/// `UFFD_USER_MODE_ONLY`: handle faults from user mode only (allowed unprivileged).
const USER_MODE_ONLY: libc::c_int = 1;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;
const PAGEFAULT_FLAG_WRITE: u64 = 1;

/// `_IOWR(type, nr, size)` as the kernel builds it on x86-64 and arm64.
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
/// `_IOR(type, nr, size)`.
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct Range {
    start: u64,
    len: u64,
}
#[repr(C)]
#[derive(Default)]
struct RegisterArg {
    range: Range,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
#[derive(Default)]
struct ZeropageArg {
    range: Range,
    mode: u64,
    zeropage: i64,
}
const _: () = assert!(std::mem::size_of::<ApiArg>() == 24);
const _: () = assert!(std::mem::size_of::<RegisterArg>() == 32);
const _: () = assert!(std::mem::size_of::<CopyArg>() == 40);
const _: () = assert!(std::mem::size_of::<ZeropageArg>() == 32);

const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<ApiArg>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<RegisterArg>());
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<Range>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<CopyArg>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<ZeropageArg>());

/// A userfaultfd call failed.
#[derive(Debug, Error)]
pub enum UffdError {
    /// The kernel refused a call.
    #[error("userfaultfd {op} failed: {source}")]
    Sys {
        /// The call.
        op: &'static str,
        /// The errno.
        source: io::Error,
    },
    /// An event record from the kernel did not parse.
    #[error("userfaultfd event is malformed: {0}")]
    BadEvent(String),
    /// The VMM's address space is gone (ESRCH: its process exited), so there is nothing
    /// left to install into; the restore is over.
    #[error("userfaultfd {op}: the VMM's address space is gone (its process exited)")]
    AddressSpaceGone {
        /// The call.
        op: &'static str,
    },
}

/// What one `uffd_msg` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A thread touched a missing page at `address` (not page-aligned) and waits.
    PageFault {
        /// The faulting address.
        address: u64,
        /// Whether the access was a write.
        write: bool,
    },
    /// `[start, end)` was dropped (madvise DONTNEED/REMOVE, e.g. by a balloon); it reads as
    /// zero from now on.
    Remove {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmap {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// A registered range moved (mremap): lode does not follow moves.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// The process forked with the registration (lode never asks for fork events).
    Fork,
}

/// Parses one kernel event record. The only place uffd bytes are interpreted.
pub fn parse_event(msg: &[u8]) -> Result<Event, UffdError> {
    let msg: &[u8; MSG_SIZE] = msg
        .try_into()
        .map_err(|_| UffdError::BadEvent(format!("{} bytes, expected {MSG_SIZE}", msg.len())))?;
    let u = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&msg[at..at + 8]);
        u64::from_ne_bytes(b)
    };
    let (a0, a1, a2) = (u(8), u(16), u(24));
    match msg[0] {
        EVENT_PAGEFAULT => Ok(Event::PageFault {
            address: a1,
            write: a0 & PAGEFAULT_FLAG_WRITE != 0,
        }),
        EVENT_REMOVE | EVENT_UNMAP => {
            if a1 < a0 {
                return Err(UffdError::BadEvent(format!(
                    "range ends at {a1:#x}, before its start {a0:#x}"
                )));
            }
            Ok(if msg[0] == EVENT_REMOVE {
                Event::Remove { start: a0, end: a1 }
            } else {
                Event::Unmap { start: a0, end: a1 }
            })
        }
        EVENT_REMAP => Ok(Event::Remap {
            from: a0,
            to: a1,
            len: a2,
        }),
        EVENT_FORK => Ok(Event::Fork),
        other => Err(UffdError::BadEvent(format!(
            "unknown event type {other:#x}"
        ))),
    }
}

/// How a copy or zero-fill of a range ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Every byte installed.
    Done,
    /// The first `done` bytes were installed, then the kernel stopped (a present page
    /// further on): go on from there.
    Partial {
        /// Bytes installed.
        done: u64,
    },
    /// The first page was already present (installed earlier, or raced): nothing done.
    Exists,
    /// Nothing done: the address space is changing (an event is pending); read the events
    /// and come back.
    Again,
    /// The range is no longer registered or mapped (ENOENT/EFAULT): nobody can fault there.
    Gone,
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn sys(op: &'static str) -> UffdError {
    UffdError::Sys {
        op,
        source: io::Error::last_os_error(),
    }
}

impl Uffd {
    /// Wraps a descriptor received from elsewhere (it must be a userfaultfd; calls on
    /// anything else fail with ENOTTY or EINVAL, which the handler reports).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// A new non-blocking userfaultfd with the API handshake done, asking for `features`.
    pub fn create(features: u64) -> Result<Self, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the syscall takes flags only and returns a new descriptor or -1.
        let mut raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if raw < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
            // Without privilege (vm.unprivileged_userfaultfd = 0) only faults taken in
            // user mode may be handled, which is all a process restore needs (a VMM whose
            // guest memory the kernel touches, as KVM does, needs the privilege).
            // SAFETY: as above.
            raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | USER_MODE_ONLY) };
        }
        if raw < 0 {
            return Err(sys(
                "create (the userfaultfd syscall; unprivileged use needs \
                 vm.unprivileged_userfaultfd = 1 or CAP_SYS_PTRACE)",
            ));
        }
        let raw =
            RawFd::try_from(raw).map_err(|_| UffdError::BadEvent("fd out of range".into()))?;
        // SAFETY: `raw` is a fresh descriptor this process owns and nothing else holds.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = ApiArg {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `ApiArg`, which lives across the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(sys("API handshake"));
        }
        Ok(Self { fd })
    }

    /// Registers `[start, start+len)` for missing-page faults.
    pub fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut arg = RegisterArg {
            range: Range { start, len },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `RegisterArg` that outlives the call.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut arg) } != 0 {
            return Err(sys("register"));
        }
        Ok(())
    }

    /// Copies `src` to `dst` in the registered memory and wakes the waiters there.
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<Fill, UffdError> {
        let mut arg = CopyArg {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: the kernel reads `src.len()` bytes from `src`, which is borrowed for
        // the call, writes only into the other process's registered memory, and writes
        // `arg.copy`.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut arg) };
        fill_outcome(r, arg.copy, "copy")
    }

    /// Maps the zero page over `[dst, dst+len)` and wakes the waiters there.
    pub fn zeropage(&self, dst: u64, len: u64) -> Result<Fill, UffdError> {
        let mut arg = ZeropageArg {
            range: Range { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one `ZeropageArg` that outlives the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut arg) };
        fill_outcome(r, arg.zeropage, "zeropage")
    }

    /// Wakes threads waiting on `[start, start+len)` (for a page that was already there).
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut arg = Range { start, len };
        // SAFETY: UFFDIO_WAKE reads one `Range` that outlives the call.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut arg) } != 0 {
            return Err(sys("wake"));
        }
        Ok(())
    }

    /// Reads pending event records into `buf` (a multiple of [`MSG_SIZE`]); 0 when none.
    pub fn read_events(&self, buf: &mut [u8]) -> Result<usize, UffdError> {
        // SAFETY: reads at most `buf.len()` bytes into `buf`, which is borrowed mutably.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(UffdError::Sys {
                op: "read events",
                source: e,
            });
        }
        usize::try_from(n).map_err(|_| UffdError::BadEvent("negative read".into()))
    }
}

/// Reads an install ioctl's result: `r` its return, `count` the bytes-or-errno field.
fn fill_outcome(r: libc::c_int, count: i64, op: &'static str) -> Result<Fill, UffdError> {
    if r == 0 {
        return Ok(Fill::Done);
    }
    let err = io::Error::last_os_error();
    let errno = err.raw_os_error().unwrap_or(0);
    match errno {
        libc::EAGAIN if count > 0 => Ok(Fill::Partial {
            done: count.unsigned_abs(),
        }),
        libc::EEXIST => Ok(Fill::Exists),
        libc::EAGAIN => Ok(Fill::Again),
        libc::ENOENT | libc::EFAULT => Ok(Fill::Gone),
        // The kernel found no live mm behind the descriptor: the VMM exited (a clone
        // that finished while its prefetch was still installing).
        libc::ESRCH => Err(UffdError::AddressSpaceGone { op }),
        _ => Err(UffdError::Sys { op, source: err }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(event: u8, a0: u64, a1: u64, a2: u64) -> [u8; MSG_SIZE] {
        let mut m = [0u8; MSG_SIZE];
        m[0] = event;
        m[8..16].copy_from_slice(&a0.to_ne_bytes());
        m[16..24].copy_from_slice(&a1.to_ne_bytes());
        m[24..32].copy_from_slice(&a2.to_ne_bytes());
        m
    }

    #[test]
    fn events_parse() {
        assert_eq!(
            parse_event(&msg(EVENT_PAGEFAULT, 1, 0x7000_1234, 9)).unwrap(),
            Event::PageFault {
                address: 0x7000_1234,
                write: true
            }
        );
        assert_eq!(
            parse_event(&msg(EVENT_REMOVE, 0x1000, 0x3000, 0)).unwrap(),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        let e = parse_event(&msg(EVENT_REMOVE, 0x3000, 0x1000, 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "userfaultfd event is malformed: range ends at 0x1000, before its start 0x3000"
        );
        let e = parse_event(&msg(0x77, 0, 0, 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "userfaultfd event is malformed: unknown event type 0x77"
        );
        assert!(parse_event(&[0u8; 31]).is_err());
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from linux/userfaultfd.h as compiled for x86-64.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
    }

    proptest! {
        #[test]
        fn any_record_parses_or_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_event(&bytes);
        }

        #[test]
        fn remove_ranges_are_ordered(event in prop_oneof![Just(EVENT_REMOVE), Just(EVENT_UNMAP)],
                                     a in any::<u64>(), b in any::<u64>()) {
            match parse_event(&msg(event, a, b, 0)) {
                Ok(Event::Remove { start, end }) | Ok(Event::Unmap { start, end }) => {
                    prop_assert!(start <= end)
                }
                Ok(other) => prop_assert!(false, "{other:?}"),
                Err(_) => prop_assert!(b < a),
            }
        }
    }
}

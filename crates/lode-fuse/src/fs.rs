//! The filesystem itself: a root directory whose entries are block devices, and the
//! FUSE operations over it.
//!
//! FUSE callbacks are synchronous and run on fuser's threads. Metadata operations
//! answer at once from the table; device calls (read, write, fsync) move their reply
//! into a task on the tokio runtime and return, so the FUSE threads only ever parse
//! requests and copy bytes.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use futures::FutureExt;
use lode_blockdev::{BlockDevice, DeviceError};
use tokio::runtime::Handle;

use crate::mount::{ErrorHook, FuseError, Op};

/// How the kernel caches the files' pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// `FOPEN_DIRECT_IO`: no page cache for the FUSE files; every read and write
    /// reaches the device, with the size the caller asked for (up to `max_read`).
    ///
    /// The default, because the files' readers cache for themselves: a loop device is
    /// read by ext4, whose page cache sits above the loop device, and Firecracker's
    /// guest has its own page cache. Caching the FUSE file too would hold every page
    /// twice, and a page cached here would go stale when the same device is written
    /// through NBD or another path. The device's own tiers (docs/agent.md) cache chunks.
    #[default]
    Direct,
    /// `FOPEN_KEEP_CACHE`: reads go through the page cache, which is kept across
    /// opens. Reads arrive as page-sized readahead, and writes by any other path to
    /// the same device are not seen until the cache is dropped. Only for devices that
    /// nothing else writes.
    KeepCache,
}

/// Counters for one mount; see [`FuseMount::stats`](crate::FuseMount::stats).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FuseStats {
    /// Reads answered with data.
    pub reads: u64,
    pub bytes_read: u64,
    /// Writes that reached the device and succeeded.
    pub writes: u64,
    pub bytes_written: u64,
    /// Device flushes (from fsync) that succeeded.
    pub flushes: u64,
    /// Device calls that failed, panicked or timed out (each answered with an errno).
    pub errors: u64,
    /// Of `errors`, those that outlasted the timeout.
    pub timeouts: u64,
    /// Of `errors`, those where the device panicked.
    pub panics: u64,
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    bytes_read: AtomicU64,
    writes: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    panics: AtomicU64,
}

/// One file: a device under a name. Inode numbers are never reused, so a name removed
/// and added again is a new file, and handles opened on the old one keep its device.
pub(crate) struct Entry {
    pub(crate) name: String,
    ino: u64,
    pub(crate) device: Arc<dyn BlockDevice>,
    writable: bool,
    added: SystemTime,
}

#[derive(Default)]
struct Table {
    by_name: BTreeMap<String, Arc<Entry>>,
    by_ino: HashMap<u64, Arc<Entry>>,
    next_ino: u64,
}

/// What the mount handle and the FUSE threads share.
pub(crate) struct Shared {
    pub(crate) mountpoint: PathBuf,
    table: RwLock<Table>,
    handles: Mutex<HashMap<u64, Arc<Entry>>>,
    next_fh: AtomicU64,
    counters: Counters,
    runtime: Handle,
    op_timeout: Duration,
    max_read: u32,
    cache: CacheMode,
    on_error: Option<ErrorHook>,
    uid: u32,
    gid: u32,
    created: SystemTime,
}

pub(crate) struct SharedConfig {
    pub(crate) mountpoint: PathBuf,
    pub(crate) runtime: Handle,
    pub(crate) op_timeout: Duration,
    pub(crate) max_read: u32,
    pub(crate) cache: CacheMode,
    pub(crate) on_error: Option<ErrorHook>,
}

/// Attributes and entries never change for an inode (sizes are fixed and inode
/// numbers are not reused), so the kernel may keep them; names come and go, so
/// lookups are not cached and a removed file disappears at once.
const ATTR_TTL: Duration = Duration::from_secs(60);
const ENTRY_TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;
const BLOCK: u32 = 4096;

impl Shared {
    pub(crate) fn new(config: SharedConfig) -> Self {
        Self {
            mountpoint: config.mountpoint,
            table: RwLock::new(Table {
                next_ino: ROOT + 1,
                ..Table::default()
            }),
            handles: Mutex::default(),
            next_fh: AtomicU64::new(1),
            counters: Counters::default(),
            runtime: config.runtime,
            op_timeout: config.op_timeout,
            max_read: config.max_read,
            cache: config.cache,
            on_error: config.on_error,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            created: SystemTime::now(),
        }
    }

    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    pub(crate) fn add(
        &self,
        name: String,
        device: Arc<dyn BlockDevice>,
        writable: bool,
    ) -> Result<(), FuseError> {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        if table.by_name.contains_key(&name) {
            return Err(FuseError::Exists {
                file: self.file(&name),
            });
        }
        let ino = table.next_ino;
        table.next_ino += 1;
        let entry = Arc::new(Entry {
            name: name.clone(),
            ino,
            device,
            writable,
            added: SystemTime::now(),
        });
        table.by_ino.insert(ino, Arc::clone(&entry));
        table.by_name.insert(name, entry);
        Ok(())
    }

    pub(crate) fn remove(&self, name: &str) -> Result<Arc<dyn BlockDevice>, FuseError> {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let entry = table
            .by_name
            .remove(name)
            .ok_or_else(|| FuseError::NotFound {
                file: self.file(name),
            })?;
        table.by_ino.remove(&entry.ino);
        Ok(Arc::clone(&entry.device))
    }

    pub(crate) fn names(&self) -> Vec<String> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        table.by_name.keys().cloned().collect()
    }

    pub(crate) fn stats(&self) -> FuseStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FuseStats {
            reads: get(&c.reads),
            bytes_read: get(&c.bytes_read),
            writes: get(&c.writes),
            bytes_written: get(&c.bytes_written),
            flushes: get(&c.flushes),
            errors: get(&c.errors),
            timeouts: get(&c.timeouts),
            panics: get(&c.panics),
        }
    }

    fn by_ino(&self, ino: INodeNo) -> Option<Arc<Entry>> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        table.by_ino.get(&ino.0).cloned()
    }

    fn by_name(&self, name: &OsStr) -> Option<Arc<Entry>> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        table.by_name.get(name.to_str()?).cloned()
    }

    fn handle(&self, fh: FileHandle) -> Option<Arc<Entry>> {
        let handles = self.handles.lock().unwrap_or_else(PoisonError::into_inner);
        handles.get(&fh.0).cloned()
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(ROOT),
            size: 0,
            blocks: 0,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }

    fn attr(&self, entry: &Entry) -> FileAttr {
        let size = entry.device.size();
        FileAttr {
            ino: INodeNo(entry.ino),
            size,
            blocks: size.div_ceil(512),
            atime: entry.added,
            mtime: entry.added,
            ctime: entry.added,
            crtime: entry.added,
            kind: FileType::RegularFile,
            perm: if entry.writable { 0o644 } else { 0o444 },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }

    /// Counts a failed device call and tells the hook (or the log).
    fn failed(&self, error: &FuseError) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        match error {
            FuseError::TimedOut { .. } => {
                self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            FuseError::Panicked { .. } => {
                self.counters.panics.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        match &self.on_error {
            Some(hook) => hook(error),
            None => log::warn!("{error}"),
        }
    }

    /// Runs one device call on the runtime, bounded by the timeout and shielded from
    /// panics; `done` gets the outcome and answers the kernel. A failure is counted and
    /// reported here, so `done` only picks the errno.
    fn run<T, F>(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        what: (Op, u64, u64),
        call: F,
        done: impl FnOnce(Result<T, Errno>) + Send + 'static,
    ) where
        T: Send + 'static,
        F: Future<Output = Result<T, DeviceError>> + Send + 'static,
    {
        let shared = Arc::clone(self);
        let file = self.file(&entry.name);
        let (op, offset, len) = what;
        self.runtime.spawn(async move {
            let outcome =
                tokio::time::timeout(shared.op_timeout, AssertUnwindSafe(call).catch_unwind())
                    .await;
            let error = match outcome {
                Ok(Ok(Ok(value))) => return done(Ok(value)),
                Ok(Ok(Err(source))) => {
                    let errno = errno_for(op, &source);
                    (
                        FuseError::Device {
                            file,
                            op,
                            offset,
                            len,
                            source,
                        },
                        errno,
                    )
                }
                Ok(Err(_panic)) => (
                    FuseError::Panicked {
                        file,
                        op,
                        offset,
                        len,
                    },
                    Errno::EIO,
                ),
                Err(_elapsed) => (
                    FuseError::TimedOut {
                        file,
                        op,
                        offset,
                        len,
                        timeout: shared.op_timeout,
                    },
                    Errno::EIO,
                ),
            };
            shared.failed(&error.0);
            done(Err(error.1));
        });
    }
}

/// The errno a failed device call is answered with. Reads always answer EIO: the
/// reader must never take a failure for data or for the end of the file.
fn errno_for(op: Op, error: &DeviceError) -> Errno {
    match (op, error) {
        (Op::Read, _) => Errno::EIO,
        (_, DeviceError::ReadOnly) => Errno::EROFS,
        (_, DeviceError::NoSpace { .. }) => Errno::ENOSPC,
        (_, DeviceError::InvalidRange { .. }) => Errno::EINVAL,
        (_, DeviceError::Unsupported(_)) => Errno::EOPNOTSUPP,
        _ => Errno::EIO,
    }
}

/// The FUSE side: what fuser's threads call.
pub(crate) struct Fs {
    pub(crate) shared: Arc<Shared>,
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // max_pages follows max_write, so this is also what lets reads reach max_read.
        let _ = config.set_max_write(self.shared.max_read);
        let _ = config.set_max_readahead(self.shared.max_read);
        // Parallel direct I/O from one file (a loop device's queue), and mmap of a
        // direct_io file where the kernel allows it. Either may be missing; both are
        // optimisations.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        match self.shared.by_name(name) {
            Some(entry) => {
                let attr = self.shared.attr(&entry);
                reply.entry_with_ttls(&ATTR_TTL, &ENTRY_TTL, &attr, fuser::Generation(0));
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT {
            return reply.attr(&Duration::ZERO, &self.shared.root_attr());
        }
        // An open handle outlives the name: fstat on a removed file still works.
        let entry = fh
            .and_then(|fh| self.shared.handle(fh))
            .or_else(|| self.shared.by_ino(ino));
        match entry {
            Some(entry) => reply.attr(&ATTR_TTL, &self.shared.attr(&entry)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino.0 == ROOT {
            return reply.error(Errno::EPERM);
        }
        let entry = fh
            .and_then(|fh| self.shared.handle(fh))
            .or_else(|| self.shared.by_ino(ino));
        let Some(entry) = entry else {
            return reply.error(Errno::ENOENT);
        };
        // A device's size is fixed; truncating to the same size (what some tools do
        // before writing) is harmless. Times are accepted and ignored; owners and modes
        // are not ours to change.
        if let Some(size) = size
            && size != entry.device.size()
        {
            return reply.error(if entry.writable {
                Errno::EPERM
            } else {
                Errno::EROFS
            });
        }
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&ATTR_TTL, &self.shared.attr(&entry));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT {
            return reply.error(Errno::EISDIR);
        }
        let Some(entry) = self.shared.by_ino(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // EROFS, which losetup and Firecracker's callers understand: losetup retries
        // read-only when a read-write open fails with it.
        if flags.acc_mode() != OpenAccMode::O_RDONLY && !entry.writable {
            return reply.error(Errno::EROFS);
        }
        let fh = self.shared.next_fh.fetch_add(1, Ordering::Relaxed);
        self.shared
            .handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(fh, entry);
        let open_flags = match self.shared.cache {
            CacheMode::Direct => FopenFlags::FOPEN_DIRECT_IO,
            CacheMode::KeepCache => FopenFlags::FOPEN_KEEP_CACHE,
        };
        reply.opened(FileHandle(fh), open_flags);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(entry) = self.shared.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        let dev_size = entry.device.size();
        if offset >= dev_size || size == 0 {
            return reply.data(&[]);
        }
        // The kernel never asks for more than max_read; the cap keeps a misbehaving
        // request from sizing our buffer.
        let len = u64::from(size.min(self.shared.max_read)).min(dev_size - offset);
        let Ok(len_usize) = usize::try_from(len) else {
            return reply.error(Errno::EINVAL);
        };
        let device = Arc::clone(&entry.device);
        let shared = Arc::clone(&self.shared);
        self.shared.run(
            &entry,
            (Op::Read, offset, len),
            async move {
                let mut buf = vec![0u8; len_usize];
                device.read_at(offset, &mut buf).await.map(|()| buf)
            },
            move |outcome| match outcome {
                Ok(buf) => {
                    shared.counters.reads.fetch_add(1, Ordering::Relaxed);
                    shared.counters.bytes_read.fetch_add(len, Ordering::Relaxed);
                    reply.data(&buf);
                }
                Err(errno) => reply.error(errno),
            },
        );
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(entry) = self.shared.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        if !entry.writable {
            return reply.error(Errno::EROFS);
        }
        let dev_size = entry.device.size();
        if data.is_empty() {
            return reply.written(0);
        }
        // Like a block device: a write that starts at the end has no space, one that
        // runs past it writes what fits and reports the short count.
        if offset >= dev_size {
            return reply.error(Errno::ENOSPC);
        }
        let fits = usize::try_from(dev_size - offset).unwrap_or(usize::MAX);
        let owned = data[..data.len().min(fits)].to_vec();
        let Ok(count) = u32::try_from(owned.len()) else {
            return reply.error(Errno::EINVAL);
        };
        let len = u64::from(count);
        let device = Arc::clone(&entry.device);
        let shared = Arc::clone(&self.shared);
        self.shared.run(
            &entry,
            (Op::Write, offset, len),
            async move { device.write_at(offset, &owned).await },
            move |outcome| match outcome {
                Ok(()) => {
                    shared.counters.writes.fetch_add(1, Ordering::Relaxed);
                    shared
                        .counters
                        .bytes_written
                        .fetch_add(len, Ordering::Relaxed);
                    reply.written(count);
                }
                Err(errno) => reply.error(errno),
            },
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2). Writes were answered only after reaching the device, so there is
        // nothing to report here; durability is fsync's job.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(entry) = self.shared.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        if !entry.writable {
            return reply.ok();
        }
        let device = Arc::clone(&entry.device);
        let shared = Arc::clone(&self.shared);
        let size = device.size();
        self.shared.run(
            &entry,
            (Op::Flush, 0, size),
            async move { device.flush().await },
            move |outcome| match outcome {
                Ok(()) => {
                    shared.counters.flushes.fetch_add(1, Ordering::Relaxed);
                    reply.ok();
                }
                Err(errno) => reply.error(errno),
            },
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.shared
            .handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries: Vec<(u64, FileType, String)> = {
            let table = self
                .shared
                .table
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            [
                (ROOT, FileType::Directory, ".".to_owned()),
                (ROOT, FileType::Directory, "..".to_owned()),
            ]
            .into_iter()
            .chain(
                table
                    .by_name
                    .values()
                    .map(|e| (e.ino, FileType::RegularFile, e.name.clone())),
            )
            .collect()
        };
        // The offset of an entry is its position + 1: the next call resumes after it.
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

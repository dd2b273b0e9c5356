//! The block-device trait the server exports, and two simple implementations.
//!
//! The agent implements [`BlockDevice`] over its read path (overlay, chunk cache,
//! origin; docs/agent.md); [`MemDevice`] and [`FileDevice`] serve tests,
//! examples and benchmarks. The server checks every range against [`BlockDevice::size`]
//! before calling in, so implementations may assume `offset + len <= size`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;

use crate::proto::Errno;

/// A device operation failed. Each variant maps to one NBD errno; with structured
/// replies negotiated the rendered message reaches the client too.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("I/O error at offset {offset} ({len} bytes)")]
    Io {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("device is read-only")]
    ReadOnly,
    #[error("no space left for {len} bytes at offset {offset}")]
    NoSpace { offset: u64, len: u64 },
    #[error("range of {len} bytes at offset {offset} is invalid")]
    InvalidRange { offset: u64, len: u64 },
    #[error("{0} is not supported by this device")]
    Unsupported(&'static str),
    /// The device's own failure (a chunk that failed verification, an unreachable
    /// origin); the server answers EIO.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl DeviceError {
    /// The NBD errno this error is sent as.
    pub fn errno(&self) -> Errno {
        match self {
            DeviceError::Io { source, .. } if source.raw_os_error() == Some(28) => Errno::ENOSPC,
            DeviceError::Io { .. } | DeviceError::Other(_) => Errno::EIO,
            DeviceError::ReadOnly => Errno::EPERM,
            DeviceError::NoSpace { .. } => Errno::ENOSPC,
            DeviceError::InvalidRange { .. } => Errno::EINVAL,
            DeviceError::Unsupported(_) => Errno::ENOTSUP,
        }
    }
}

/// A fixed-size array of bytes the server exports.
///
/// Only [`size`](Self::size) and [`read_at`](Self::read_at) are required; the rest
/// default to a read-only device. A writable device overrides
/// [`read_only`](Self::read_only) and [`write_at`](Self::write_at), and usually
/// [`flush`](Self::flush). Calls may run concurrently, including overlapping ranges;
/// NBD gives no ordering between requests in flight.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes; fixed for the life of the device.
    fn size(&self) -> u64;

    /// Whether writes are refused. Advertised to clients as NBD_FLAG_READ_ONLY.
    fn read_only(&self) -> bool {
        true
    }

    /// Whether a flush on one connection makes writes completed on every connection
    /// durable (NBD_FLAG_CAN_MULTI_CONN). True for any device whose state and flush
    /// are shared across connections, which is every device served from one object.
    fn can_multi_conn(&self) -> bool {
        true
    }

    /// Fills `buf` with the bytes at `offset`.
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;

    /// Writes `data` at `offset`.
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let _ = (offset, data);
        Err(DeviceError::ReadOnly)
    }

    /// Makes completed writes durable. The server also calls this after a write with
    /// the FUA flag.
    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    /// A hint that the range's contents are no longer needed. Doing nothing is a
    /// correct implementation: after a trim the contents are unspecified.
    async fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _ = (offset, len);
        Ok(())
    }

    /// Sets the range to zeroes. The default writes zero buffers of at most 1 MiB.
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        const PIECE: u64 = 1 << 20;
        let zeroes = vec![0u8; usize::try_from(len.min(PIECE)).unwrap_or(1 << 20)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(PIECE);
            let n_usize = usize::try_from(n).unwrap_or(zeroes.len());
            self.write_at(offset + done, &zeroes[..n_usize]).await?;
            done += n;
        }
        Ok(())
    }

    /// A hint that the range will be read soon (NBD_CMD_CACHE); a lazily loaded
    /// device can start fetching it. Does nothing by default.
    async fn prefetch(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _ = (offset, len);
        Ok(())
    }
}

fn to_usize(offset: u64, len: u64) -> Result<(usize, usize), DeviceError> {
    let bad = || DeviceError::InvalidRange { offset, len };
    let start = usize::try_from(offset).map_err(|_| bad())?;
    let n = usize::try_from(len).map_err(|_| bad())?;
    let end = start.checked_add(n).ok_or_else(bad)?;
    Ok((start, end))
}

/// A device held in memory.
#[derive(Debug)]
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    size: u64,
    read_only: bool,
}

impl MemDevice {
    /// A writable device of `size` zero bytes.
    pub fn new(size: usize) -> Self {
        Self::from_vec(vec![0; size])
    }

    /// A writable device holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self {
            size: data.len() as u64,
            data: RwLock::new(data),
            read_only: false,
        }
    }

    /// The same device, refusing writes.
    pub fn into_read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn range(&self, offset: u64, len: u64) -> Result<(usize, usize), DeviceError> {
        let (start, end) = to_usize(offset, len)?;
        if end as u64 > self.size {
            return Err(DeviceError::InvalidRange { offset, len });
        }
        Ok((start, end))
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let (start, end) = self.range(offset, buf.len() as u64)?;
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        buf.copy_from_slice(&data[start..end]);
        Ok(())
    }

    async fn write_at(&self, offset: u64, src: &[u8]) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        let (start, end) = self.range(offset, src.len() as u64)?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        data[start..end].copy_from_slice(src);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.write_zeroes(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        let (start, end) = self.range(offset, len)?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        data[start..end].fill(0);
        Ok(())
    }
}

/// A device backed by a regular file, read and written with positional I/O on the
/// blocking thread pool.
#[derive(Debug)]
pub struct FileDevice {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

/// A file could not be opened as a device.
#[derive(Debug, thiserror::Error)]
#[error("cannot open {path} as a block device")]
pub struct OpenError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl FileDevice {
    /// Opens `path`; its current length is the device size.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> Result<Self, OpenError> {
        let path = path.as_ref().to_path_buf();
        let err = |source| OpenError {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        Ok(Self {
            file: Arc::new(file),
            path,
            size,
            read_only: !writable,
        })
    }

    /// The file served.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T: Send + 'static>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&File) -> io::Result<T> + Send + 'static,
    ) -> Result<T, DeviceError> {
        let file = Arc::clone(&self.file);
        let io_err = |source| DeviceError::Io {
            offset,
            len,
            source,
        };
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(|join| io_err(io::Error::other(join.to_string())))?
            .map_err(io_err)
    }
}

#[async_trait]
impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let len = buf.len();
        // The borrowed buffer cannot cross into the blocking pool, so read into an
        // owned one and copy: one memcpy beside a syscall.
        let data = self
            .blocking(offset, len as u64, move |f| {
                let mut owned = vec![0u8; len];
                f.read_exact_at(&mut owned, offset)?;
                Ok(owned)
            })
            .await?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        let owned = data.to_vec();
        self.blocking(offset, data.len() as u64, move |f| {
            f.write_all_at(&owned, offset)
        })
        .await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        if self.read_only {
            return Ok(());
        }
        self.blocking(0, self.size, |f| f.sync_data()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mem_device_reads_writes_and_zeroes() {
        let dev = MemDevice::from_vec((0..=255u8).cycle().take(8192).collect());
        let mut buf = [0u8; 4];
        dev.read_at(254, &mut buf).await.unwrap();
        assert_eq!(buf, [254, 255, 0, 1]);
        dev.write_at(0, b"abcd").await.unwrap();
        dev.write_zeroes(2, 4).await.unwrap();
        dev.read_at(0, &mut buf).await.unwrap();
        assert_eq!(&buf, b"ab\0\0");
        assert!(matches!(
            dev.read_at(8190, &mut buf).await,
            Err(DeviceError::InvalidRange { .. })
        ));
        let ro = MemDevice::new(16).into_read_only();
        assert_eq!(
            ro.write_at(0, b"x").await.unwrap_err().errno(),
            Errno::EPERM
        );
    }

    #[tokio::test]
    async fn file_device_round_trips_and_names_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let dev = FileDevice::open(&path, true).unwrap();
        assert_eq!(dev.size(), 10_000);
        dev.write_at(100, b"hello").await.unwrap();
        dev.write_zeroes(9_000, 1_000).await.unwrap();
        dev.flush().await.unwrap();
        let mut buf = [0u8; 7];
        dev.read_at(99, &mut buf).await.unwrap();
        assert_eq!(&buf, b"\x07hello\x07");
        assert_eq!(std::fs::read(&path).unwrap()[9_000..], vec![0u8; 1_000][..]);

        let err = FileDevice::open(dir.path().join("missing"), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot open {} as a block device",
                dir.path().join("missing").display()
            )
        );
        let ro = FileDevice::open(&path, false).unwrap();
        assert!(matches!(
            ro.write_at(0, b"x").await,
            Err(DeviceError::ReadOnly)
        ));
    }

    #[tokio::test]
    async fn default_write_zeroes_goes_through_write_at_in_pieces() {
        #[derive(Debug)]
        struct Counting(MemDevice, std::sync::atomic::AtomicUsize);
        #[async_trait]
        impl BlockDevice for Counting {
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn read_only(&self) -> bool {
                false
            }
            async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
                self.0.read_at(offset, buf).await
            }
            async fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
                self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.0.write_at(offset, data).await
            }
        }
        let dev = Counting(MemDevice::from_vec(vec![1; 3 << 20]), Default::default());
        dev.write_zeroes(1, (3 << 20) - 2).await.unwrap();
        assert_eq!(dev.1.load(std::sync::atomic::Ordering::Relaxed), 3);
        let c = dev.0.contents();
        assert_eq!(
            (c[0], c[1], c[(3 << 20) - 2], c[(3 << 20) - 1]),
            (1, 0, 0, 1)
        );
    }
}

//! Two simple block devices, and the NBD errno of a device error.
//!
//! The server exports any [`BlockDevice`] (the trait lives in `lode-blockdev`; the read
//! path implements it over an image, docs/agent.md); [`MemDevice`] and [`FileDevice`]
//! serve tests, examples and benchmarks. The server checks every range against
//! [`BlockDevice::size`] before calling in, so implementations may assume
//! `offset + len <= size`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use lode_blockdev::{BlockDevice, DeviceError};

use crate::proto::Errno;

impl From<&DeviceError> for Errno {
    /// The NBD errno a device error is sent as.
    fn from(e: &DeviceError) -> Errno {
        match e {
            DeviceError::Io { source, .. } if source.raw_os_error() == Some(28) => Errno::ENOSPC,
            DeviceError::Io { .. } | DeviceError::Other(_) => Errno::EIO,
            DeviceError::ReadOnly => Errno::EPERM,
            DeviceError::NoSpace { .. } => Errno::ENOSPC,
            DeviceError::InvalidRange { .. } => Errno::EINVAL,
            DeviceError::Unsupported(_) => Errno::ENOTSUP,
        }
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
            Errno::from(&ro.write_at(0, b"x").await.unwrap_err()),
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
}

//! The block-device trait: what an attached image is to the code that presents it.
//!
//! Where this fits: docs/architecture.md, "The flow of an image".
//!
//! The read path (`lode-read`'s `ImageDevice`) implements [`BlockDevice`] over an image's
//! chunks; the presentations serve any implementation, `lode-nbd` as an NBD export and
//! `lode-fuse` as a regular file. Each presentation maps a [`DeviceError`] to its own
//! errno. A presentation checks every range against [`BlockDevice::size`] before calling
//! in, so implementations may assume `offset + len <= size`.
//!
//! This crate depends on no other lode crate, so a presentation need not link the read
//! path, and the read path need not link a presentation.

use std::io;

use async_trait::async_trait;

/// A device operation failed. Each presentation answers with the errno it maps the
/// variant to; where its protocol carries a message (NBD structured replies), the
/// rendered message reaches the client too.
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
    /// origin); presentations answer EIO.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// A fixed-size array of bytes a presentation serves.
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

    /// Makes completed writes durable. The NBD server also calls this after a write with
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A writable device over a vector that counts its writes.
    #[derive(Debug)]
    struct Counting {
        data: Mutex<Vec<u8>>,
        writes: AtomicUsize,
    }

    #[async_trait]
    impl BlockDevice for Counting {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            false
        }
        async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
            let at = usize::try_from(offset).unwrap();
            buf.copy_from_slice(&self.data.lock().unwrap()[at..at + buf.len()]);
            Ok(())
        }
        async fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            let at = usize::try_from(offset).unwrap();
            self.data.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    #[tokio::test]
    async fn default_write_zeroes_goes_through_write_at_in_pieces() {
        let dev = Counting {
            data: Mutex::new(vec![1; 3 << 20]),
            writes: AtomicUsize::new(0),
        };
        dev.write_zeroes(1, (3 << 20) - 2).await.unwrap();
        assert_eq!(dev.writes.load(Ordering::Relaxed), 3);
        let c = dev.data.lock().unwrap().clone();
        assert_eq!(
            (c[0], c[1], c[(3 << 20) - 2], c[(3 << 20) - 1]),
            (1, 0, 0, 1)
        );
    }

    #[tokio::test]
    async fn a_device_is_read_only_unless_it_says_otherwise() {
        #[derive(Debug)]
        struct Zeros;
        #[async_trait]
        impl BlockDevice for Zeros {
            fn size(&self) -> u64 {
                4096
            }
            async fn read_at(&self, _offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
                buf.fill(0);
                Ok(())
            }
        }
        assert!(Zeros.read_only());
        let err = Zeros.write_at(0, b"x").await.unwrap_err();
        assert!(matches!(err, DeviceError::ReadOnly));
        assert_eq!(err.to_string(), "device is read-only");
        assert!(matches!(
            Zeros.write_zeroes(0, 10).await,
            Err(DeviceError::ReadOnly)
        ));
        Zeros.flush().await.unwrap();
        Zeros.trim(0, 4096).await.unwrap();
        Zeros.prefetch(0, 4096).await.unwrap();
    }
}

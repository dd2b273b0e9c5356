//! The copy-on-write overlay of a writable attachment (docs/agent.md, the
//! overlay): a sparse file as large as the device and a bitmap of which 4 KiB blocks live
//! in it. Writes never reach the shared chunks or the store.
//!
//! ```text
//!   <path>          sparse file, device-sized; block b at byte b * 4096
//!   <path>.bitmap   one bit per block, little-endian u64 words, written on flush
//!                   (temp + rename), read back at open
//! ```
//!
//! The bitmap is persisted only on flush: after a crash, blocks written since the last
//! flush read from the image again — what a disk without a volatile-cache flush may do.
//! A flush with no write since the last one (or since the open) returns at once: what is
//! on disk is already what a reopen would find. The kernel's loop driver flushes its file
//! when it is set up, so without this every `lode mount --rw` and `lode run` paid two
//! fsyncs of the agent's disk before its first write.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::ReadError;
use crate::error::{blocking, io};

/// The overlay's copy-on-write unit.
pub const BLOCK_SIZE: u64 = 4096;

/// A per-device overlay file and its block bitmap.
#[derive(Debug)]
pub struct Overlay {
    path: PathBuf,
    file: Arc<File>,
    size: u64,
    bitmap: Mutex<Vec<u64>>,
    /// Counts the writes marked so far.
    marks: AtomicU64,
    /// The count of marks the last successful flush covered (0 at open: a fresh overlay
    /// and a reopened one are both as on disk).
    flushed: AtomicU64,
    /// Serialises writes: a partial-block write reads, merges and writes back a whole
    /// block, which must not interleave with another write to that block.
    pub(crate) write_lock: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Bit updates cannot panic half-way.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Overlay {
    /// Opens the overlay at `path` for a device of `size` bytes, creating it empty, or
    /// reopening it with its bitmap when both files exist and match the size.
    pub fn open(path: impl Into<PathBuf>, size: u64) -> Result<Self, ReadError> {
        let path = path.into();
        let words = usize::try_from(size.div_ceil(BLOCK_SIZE).div_ceil(64))
            .map_err(|_| ReadError::Config(format!("device size {size} is too large")))?;
        let bitmap_path = Self::bitmap_path_of(&path);
        let saved = match std::fs::read(&bitmap_path) {
            Ok(b) if b.len() == words * 8 && path.exists() => Some(b),
            _ => None,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(saved.is_none())
            .open(&path)
            .map_err(io("open overlay", &path))?;
        file.set_len(size).map_err(io("size overlay", &path))?;
        let bitmap = match saved {
            Some(b) => b
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
                .collect(),
            None => vec![0; words],
        };
        Ok(Self {
            path,
            file: Arc::new(file),
            size,
            bitmap: Mutex::new(bitmap),
            marks: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            write_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn bitmap_path_of(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".bitmap");
        PathBuf::from(p)
    }

    /// The overlay file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device size it covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether block `block` lives in the overlay.
    pub fn has(&self, block: u64) -> bool {
        let bm = lock(&self.bitmap);
        usize::try_from(block / 64)
            .ok()
            .and_then(|w| bm.get(w))
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// Whether any block in `first..=last` lives in the overlay.
    pub fn any_in(&self, first: u64, last: u64) -> bool {
        (first..=last).any(|b| self.has(b))
    }

    /// Blocks held.
    pub fn blocks_held(&self) -> u64 {
        lock(&self.bitmap)
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Records blocks `first..=last` as written (called after their data was written,
    /// before the write is answered, so a flush asked after the answer covers them).
    pub(crate) fn mark(&self, first: u64, last: u64) {
        let mut bm = lock(&self.bitmap);
        for b in first..=last {
            if let Some(w) = usize::try_from(b / 64).ok().and_then(|w| bm.get_mut(w)) {
                *w |= 1 << (b % 64);
            }
        }
        // Counted even when every bit was set already: the data under them changed.
        self.marks.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) async fn pread(&self, offset: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        let (file, path) = (Arc::clone(&self.file), self.path.clone());
        blocking(move || {
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, offset)
                .map_err(io("read overlay", &path))?;
            Ok(buf)
        })
        .await
    }

    pub(crate) async fn pwrite(&self, offset: u64, data: Vec<u8>) -> Result<(), ReadError> {
        let (file, path) = (Arc::clone(&self.file), self.path.clone());
        blocking(move || {
            file.write_all_at(&data, offset)
                .map_err(io("write overlay", &path))
        })
        .await
    }

    /// Makes written blocks durable: syncs the file, then writes the bitmap beside it.
    /// Nothing to do, and no sync, when nothing was written since the last flush.
    pub async fn flush(&self) -> Result<(), ReadError> {
        // Read before the bitmap: a write marked after this point is flushed again by the
        // next flush, whether or not this one's bitmap caught it.
        let marks = self.marks.load(Ordering::SeqCst);
        if marks == self.flushed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let bytes: Vec<u8> = lock(&self.bitmap)
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let (file, path) = (Arc::clone(&self.file), self.path.clone());
        blocking(move || {
            file.sync_data().map_err(io("sync overlay", &path))?;
            let bm = Self::bitmap_path_of(&path);
            let mut tmp = bm.as_os_str().to_owned();
            tmp.push(".tmp");
            let tmp = PathBuf::from(tmp);
            std::fs::write(&tmp, &bytes).map_err(io("write overlay bitmap", &tmp))?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io("sync overlay bitmap", &tmp))?;
            std::fs::rename(&tmp, &bm).map_err(io("rename overlay bitmap", &bm))
        })
        .await?;
        self.flushed.fetch_max(marks, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bitmap_survives_flush_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ov");
        let o = Overlay::open(&p, 1 << 20).unwrap();
        assert!(!o.any_in(0, 255));
        o.pwrite(8192, vec![7; 4096]).await.unwrap();
        o.mark(2, 2);
        o.mark(100, 101);
        assert!(o.has(2) && o.has(101) && !o.has(3));
        o.flush().await.unwrap();
        drop(o);
        let o = Overlay::open(&p, 1 << 20).unwrap();
        assert_eq!(o.blocks_held(), 3);
        assert_eq!(o.pread(8192, 4096).await.unwrap(), vec![7; 4096]);
        // A different size starts over.
        let o = Overlay::open(&p, 2 << 20).unwrap();
        assert_eq!(o.blocks_held(), 0);
    }

    #[tokio::test]
    async fn a_flush_with_nothing_written_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ov");
        let bm = dir.path().join("ov.bitmap");
        let o = Overlay::open(&p, 1 << 20).unwrap();
        o.flush().await.unwrap();
        assert!(
            !bm.exists(),
            "a fresh overlay with no writes needs no bitmap"
        );
        o.pwrite(0, vec![1; 4096]).await.unwrap();
        o.mark(0, 0);
        o.flush().await.unwrap();
        assert!(bm.exists());
        // A second flush with no write between leaves the bitmap as it was.
        std::fs::remove_file(&bm).unwrap();
        o.flush().await.unwrap();
        assert!(!bm.exists());
        // A rewrite of a block already held is a write: the next flush syncs again.
        o.pwrite(0, vec![2; 4096]).await.unwrap();
        o.mark(0, 0);
        o.flush().await.unwrap();
        assert!(bm.exists());
        drop(o);
        let o = Overlay::open(&p, 1 << 20).unwrap();
        assert_eq!(o.blocks_held(), 1);
        assert_eq!(o.pread(0, 4096).await.unwrap(), vec![2; 4096]);
    }
}

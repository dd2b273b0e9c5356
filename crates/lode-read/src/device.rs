//! An attached image as a block device: [`ImageDevice`] implements
//! [`lode_blockdev::BlockDevice`] over the manifest, its key table and the worker's
//! [`ChunkCache`], with an optional copy-on-write [`Overlay`].
//!
//! A read splits its range at 4 KiB blocks the overlay holds (those come from the
//! overlay file) and otherwise at chunk boundaries: zero chunks are zeros without a
//! fetch, stored chunks come decrypted from the cache, all chunks of one read in
//! parallel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::try_join_all;
use lode_blockdev::{BlockDevice, DeviceError};
use lode_format::{
    ChunkEntry, ChunkFormat, ChunkIndex, ChunkKey, ChunkName, ChunkSize, KeyTable, ManifestId,
    RootId, SegmentIndex,
};

use crate::overlay::{BLOCK_SIZE, Overlay};
use crate::prefetch::Prefetch;
use crate::tier::ChunkRef;
use crate::trace::{DECRYPTED, StartTrace};
use crate::{ChunkCache, OpenedImage, ReadError};

/// The largest piece a trim or write-zeroes is split into, bounding its buffer.
const ZERO_PIECE: u64 = 1 << 20;

/// One attached image.
#[derive(Debug)]
pub struct ImageDevice {
    cache: Arc<ChunkCache>,
    id: ManifestId,
    root: RootId,
    chunk_size: ChunkSize,
    format: ChunkFormat,
    size: u64,
    chunks: Vec<ChunkEntry>,
    keys: KeyTable,
    overlay: Option<Overlay>,
    prefetch: Option<Arc<Prefetch>>,
    trace: Option<Arc<StartTrace>>,
}

fn dev_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> DeviceError {
    DeviceError::Other(e.into())
}

impl ImageDevice {
    /// A read-only device for an image opened with its key table.
    pub fn new(cache: Arc<ChunkCache>, image: OpenedImage) -> Result<Self, ReadError> {
        let keys = image.keys.ok_or(ReadError::NoKeys(image.id))?;
        let header = image.manifest.header();
        Ok(Self {
            cache,
            id: image.id,
            root: image.root,
            chunk_size: header.chunk_size,
            format: header.chunk_format,
            size: header.device_size,
            chunks: image.manifest.chunks().to_vec(),
            keys,
            overlay: None,
            prefetch: None,
            trace: None,
        })
    }

    /// Makes the device writable through `overlay`, which must cover the device's size.
    pub fn with_overlay(mut self, overlay: Overlay) -> Result<Self, ReadError> {
        if overlay.size() != self.size {
            return Err(ReadError::Config(format!(
                "overlay {} covers {} bytes but image {} is {} bytes",
                overlay.path().display(),
                overlay.size(),
                self.id,
                self.size
            )));
        }
        self.overlay = Some(overlay);
        Ok(self)
    }

    /// Reports every read to `prefetch`, which records first touches, counts what was
    /// fetched ahead and reads ahead of sequential runs.
    pub fn with_prefetch(mut self, prefetch: Arc<Prefetch>) -> Self {
        self.prefetch = Some(prefetch);
        self
    }

    /// Records this attachment's first read of each chunk, and where it came from, in
    /// `trace` (the worker's read trace); its drop, with the device's, ends the start.
    pub fn with_trace(mut self, trace: StartTrace) -> Self {
        self.trace = Some(Arc::new(trace));
        self
    }

    /// The attachment's part of the read trace, if the worker records one.
    pub fn trace(&self) -> Option<&Arc<StartTrace>> {
        self.trace.as_ref()
    }

    /// The attachment's prefetch, if it has one.
    pub fn prefetch_state(&self) -> Option<&Arc<Prefetch>> {
        self.prefetch.as_ref()
    }

    /// How many chunks the image has (its manifest's chunk table).
    pub fn chunk_count(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// The manifest id.
    pub fn id(&self) -> ManifestId {
        self.id
    }

    /// The root the image's chunks live under.
    pub fn root(&self) -> RootId {
        self.root
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image's chunk size.
    pub fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }

    /// The image's key table.
    pub fn keys(&self) -> &KeyTable {
        &self.keys
    }

    /// Whether chunk `index` is all zeros (not stored; reading it fetches nothing).
    pub fn is_zero_chunk(&self, index: u64) -> bool {
        self.stored_name(index).is_none()
    }

    /// The worker cache this device reads through.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// The overlay, when writable.
    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_ref()
    }

    /// The chunk indexes `len` bytes at `offset` touch (empty for `len == 0`).
    pub fn chunks_touched(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let cs = self.chunk_size.bytes_u64();
        offset / cs..(offset + len - 1) / cs + 1
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), DeviceError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DeviceError::InvalidRange {
                offset,
                len: len as u64,
            }),
        }
    }

    /// Where chunk `index` is and how to open it, or `None` for a zero chunk.
    pub fn chunk_ref(&self, index: u64) -> Result<Option<(ChunkRef, &ChunkKey)>, ReadError> {
        let i = ChunkIndex(index);
        let Some(name) = self.stored_name(index) else {
            return Ok(None);
        };
        let key = self.keys.get(i).ok_or(ReadError::MissingKey { index: i })?;
        let plain_len = self.chunk_size.len_of(i, self.size);
        let chunk = ChunkRef {
            root: self.root,
            manifest: self.id,
            index: i,
            name,
            format: self.format,
            plain_len: u32::try_from(plain_len).map_err(|_| {
                ReadError::Config(format!("chunk {index} of {} is too large", self.id))
            })?,
            max_bytes: self.format.object_len(plain_len),
        };
        Ok(Some((chunk, key)))
    }

    /// The decrypted chunk `index`, or `None` for a zero chunk.
    pub async fn chunk(&self, index: u64) -> Result<Option<(ChunkName, Bytes)>, ReadError> {
        let Some((chunk, key)) = self.chunk_ref(index)? else {
            self.cache.metrics().zero_chunk();
            return Ok(None);
        };
        let plain = self.cache.chunk(chunk, key).await?;
        Ok(Some((chunk.name, plain)))
    }

    /// The decrypted segment `j` of chunk `index` (a v1 chunk is one segment), or `None`
    /// for a zero chunk.
    pub async fn segment(&self, index: u64, j: SegmentIndex) -> Result<Option<Bytes>, ReadError> {
        let Some((chunk, key)) = self.chunk_ref(index)? else {
            self.cache.metrics().zero_chunk();
            return Ok(None);
        };
        let Some(trace) = &self.trace else {
            return self.cache.segment(chunk, key, j).await.map(Some);
        };
        let started = Instant::now();
        let (b, served) = self.cache.segment_served(chunk, key, j).await?;
        trace.read(
            index,
            &chunk.name,
            chunk.max_bytes,
            served,
            started.elapsed(),
        );
        Ok(Some(b))
    }

    /// The bytes of the image each segment holds but a short last one: the segment size
    /// for v2 images, the chunk size for v1.
    pub fn segment_len(&self) -> u64 {
        match self.format.segment_size() {
            Some(s) => s.bytes_u64().min(self.chunk_size.bytes_u64()),
            None => self.chunk_size.bytes_u64(),
        }
    }

    /// Reads the image (not the overlay) into `buf`; the range must be in bounds. Fetches
    /// only the segments the range touches, all at once.
    pub async fn read_image(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        if buf.is_empty() {
            return Ok(());
        }
        let cs = self.chunk_size.bytes_u64();
        let seg = self.segment_len();
        let end = offset + buf.len() as u64;
        let (i, within) = (offset / cs, offset % cs);
        let j = within / seg;
        if end <= (i * cs + (j + 1) * seg).min((i + 1) * cs) {
            // Within one segment (most reads): no list, no join.
            return self.copy_segment(i, j, within - j * seg, buf).await;
        }
        // (chunk, segment, the image range the piece covers)
        let mut pieces = Vec::new();
        let mut at = offset;
        while at < end {
            let (i, within) = (at / cs, at % cs);
            let j = within / seg;
            let stop = (i * cs + (j + 1) * seg).min((i + 1) * cs).min(end);
            pieces.push((i, j, at, stop));
            at = stop;
        }
        // Segments already decrypted are copied at once, under one lock; zero chunks are
        // zeros; the rest are fetched together.
        let keys: Vec<(ChunkName, SegmentIndex)> = pieces
            .iter()
            .filter_map(|&(i, j, _, _)| self.stored_name(i).map(|n| (n, segment_index(j))))
            .collect();
        let mut hits = self.cache.decrypted_hits(&keys).into_iter();
        let mut misses = Vec::new();
        for (&(i, j, start, _), dst) in pieces.iter().zip(split_at(buf, offset, &pieces)) {
            let from = usize_of(start - i * cs - j * seg);
            if self.stored_name(i).is_none() {
                self.cache.metrics().zero_chunk();
                dst.fill(0);
                continue;
            }
            match hits.next().flatten() {
                Some(d) if d.len() >= from + dst.len() => {
                    dst.copy_from_slice(&d[from..from + dst.len()]);
                    if let (Some(t), Ok(Some((chunk, _)))) = (&self.trace, self.chunk_ref(i)) {
                        t.read(i, &chunk.name, chunk.max_bytes, DECRYPTED, Duration::ZERO);
                    }
                }
                _ => misses.push((i, j, from as u64, dst)),
            }
        }
        try_join_all(
            misses
                .into_iter()
                .map(|(i, j, from, dst)| self.copy_segment(i, j, from, dst)),
        )
        .await?;
        Ok(())
    }

    /// The name of chunk `index` when it is stored (not a zero chunk).
    fn stored_name(&self, index: u64) -> Option<ChunkName> {
        match usize::try_from(index).ok().and_then(|i| self.chunks.get(i)) {
            Some(ChunkEntry::Stored(n)) => Some(*n),
            _ => None,
        }
    }

    /// Copies bytes `from..from + dst.len()` of segment `j` of chunk `i` into `dst`
    /// (zeros for a zero chunk).
    async fn copy_segment(
        &self,
        i: u64,
        j: u64,
        from: u64,
        dst: &mut [u8],
    ) -> Result<(), ReadError> {
        let segment = segment_index(j);
        match (self.segment(i, segment).await?, self.stored_name(i)) {
            (Some(d), Some(chunk)) => {
                let from = usize_of(from);
                // The cache checked the length; this guards the arithmetic above.
                let src =
                    d.get(from..from + dst.len())
                        .ok_or_else(|| ReadError::SegmentLength {
                            chunk,
                            segment,
                            expected: from + dst.len(),
                            got: d.len(),
                        })?;
                dst.copy_from_slice(src);
            }
            _ => dst.fill(0),
        }
        Ok(())
    }

    /// Reads the device as a client sees it: overlay blocks first, the image elsewhere.
    async fn read_merged(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let Some(ov) = &self.overlay else {
            return self.read_image(offset, buf).await;
        };
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / BLOCK_SIZE, (end - 1) / BLOCK_SIZE);
        if !ov.any_in(first, last) {
            return self.read_image(offset, buf).await;
        }
        // Runs of blocks that are all in the overlay or all not.
        let mut b = first;
        while b <= last {
            let here = ov.has(b);
            let mut e = b;
            while e < last && ov.has(e + 1) == here {
                e += 1;
            }
            let start = (b * BLOCK_SIZE).max(offset);
            let stop = ((e + 1) * BLOCK_SIZE).min(end);
            let dst = &mut buf[usize_of(start - offset)..usize_of(stop - offset)];
            if here {
                let data = ov.pread(start, dst.len()).await?;
                dst.copy_from_slice(&data);
                self.cache.metrics().overlay_read(e - b + 1);
            } else {
                self.read_image(start, dst).await?;
            }
            b = e + 1;
        }
        Ok(())
    }

    /// Copy-on-write: writes `data` at `offset` into the overlay, first filling the
    /// partial blocks at either end from the device as it reads now.
    async fn write_overlay(&self, ov: &Overlay, offset: u64, data: &[u8]) -> Result<(), ReadError> {
        if data.is_empty() {
            return Ok(());
        }
        let _guard = ov.write_lock.lock().await;
        let end = offset + data.len() as u64;
        let (first, last) = (offset / BLOCK_SIZE, (end - 1) / BLOCK_SIZE);
        let span_start = first * BLOCK_SIZE;
        let span_end = ((last + 1) * BLOCK_SIZE).min(self.size);
        let mut span = vec![0u8; usize_of(span_end - span_start)];
        if offset > span_start {
            let head = usize_of((BLOCK_SIZE).min(span_end - span_start));
            self.read_merged(span_start, &mut span[..head]).await?;
        }
        if end < span_end {
            let tail_start = (last * BLOCK_SIZE).max(span_start);
            let from = usize_of(tail_start - span_start);
            self.read_merged(tail_start, &mut span[from..]).await?;
        }
        let at = usize_of(offset - span_start);
        span[at..at + data.len()].copy_from_slice(data);
        ov.pwrite(span_start, span).await?;
        ov.mark(first, last);
        self.cache.metrics().overlay_written(last - first + 1);
        Ok(())
    }

    async fn zero_range(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let ov = self.overlay.as_ref().ok_or(DeviceError::ReadOnly)?;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.size)
            .ok_or(DeviceError::NoSpace { offset, len })?;
        let mut at = offset;
        while at < end {
            let n = (end - at).min(ZERO_PIECE);
            self.write_overlay(ov, at, &vec![0; usize_of(n)])
                .await
                .map_err(dev_err)?;
            at += n;
        }
        Ok(())
    }
}

/// Lengths here are bounded by one NBD request (32 MiB) or a chunk, so they fit.
fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

pub(crate) fn segment_index(j: u64) -> SegmentIndex {
    SegmentIndex(u32::try_from(j).unwrap_or(u32::MAX))
}

/// Cuts `buf`, which holds the image from `offset`, into the pieces' ranges (consecutive,
/// covering it).
fn split_at<'a>(
    mut buf: &'a mut [u8],
    mut offset: u64,
    pieces: &[(u64, u64, u64, u64)],
) -> Vec<&'a mut [u8]> {
    let mut out = Vec::with_capacity(pieces.len());
    for &(_, _, start, stop) in pieces {
        debug_assert_eq!(start, offset);
        let (head, rest) = std::mem::take(&mut buf).split_at_mut(usize_of(stop - start));
        out.push(head);
        buf = rest;
        offset = stop;
    }
    out
}

#[async_trait]
impl BlockDevice for ImageDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.overlay.is_none()
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.check_range(offset, buf.len())?;
        let started = Instant::now();
        if let Some(p) = &self.prefetch {
            p.on_read(self, offset, buf.len() as u64);
        }
        let r = self.read_merged(offset, buf).await;
        self.cache
            .metrics()
            .read(buf.len(), started.elapsed(), r.is_ok());
        r.map_err(dev_err)
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let ov = self.overlay.as_ref().ok_or(DeviceError::ReadOnly)?;
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(DeviceError::NoSpace {
                offset,
                len: data.len() as u64,
            });
        }
        self.write_overlay(ov, offset, data).await.map_err(dev_err)
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        match &self.overlay {
            Some(ov) => ov.flush().await.map_err(dev_err),
            None => Ok(()),
        }
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        // Trimmed blocks read back as zeros, as the tests (and ext4's discard) expect.
        self.zero_range(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.zero_range(offset, len).await
    }

    async fn prefetch(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let end = offset.saturating_add(len).min(self.size);
        let touched = self.chunks_touched(offset, end.saturating_sub(offset));
        try_join_all(touched.map(|i| self.chunk(i)))
            .await
            .map_err(dev_err)?;
        Ok(())
    }
}

//! Large files (over 4 GiB, extent index levels) and large directories.

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use common::meta;
use lode_ext4::{Entry, Ext4Writer, Metadata, Options, Tree};
use lode_testkit::{LoopMount, e2fsck_clean};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Bytes of dense data at the start of the big file: more than one extent
/// (32768 blocks) holds.
const DENSE: u64 = 129 * MIB;
/// Spacing of the marker blocks after the dense part: 5 GiB / 2.5 MiB gives
/// about 2000 extents, so the tree needs two index levels.
const EVERY: u64 = 5 * MIB / 2;
const BIG_LEN: u64 = 5 * GIB + 12345;

/// Generates the big file without holding it: dense bytes, then a marker
/// block every `EVERY` bytes, zeros elsewhere.
struct BigFile {
    pos: u64,
}

fn byte_at(pos: u64) -> u8 {
    if pos < DENSE {
        return 0x5A;
    }
    let rel = pos - DENSE;
    if rel % EVERY < 8 {
        let k = rel / EVERY + 1;
        return k.to_le_bytes()[usize::try_from(rel % EVERY).unwrap()];
    }
    if pos == BIG_LEN - 1 {
        return 0xEE;
    }
    0
}

impl Read for BigFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = usize::try_from((buf.len() as u64).min(BIG_LEN - self.pos)).unwrap();
        let buf = &mut buf[..n];
        let start = self.pos;
        if start + n as u64 <= DENSE {
            buf.fill(0x5A);
        } else {
            buf.fill(0);
            // Only the dense part, the markers and the last byte are nonzero.
            for (i, b) in buf
                .iter_mut()
                .enumerate()
                .take(usize::try_from(DENSE.saturating_sub(start)).unwrap().min(n))
            {
                *b = byte_at(start + i as u64);
            }
            let first = start.max(DENSE);
            let mut k = (first - DENSE).div_ceil(EVERY);
            loop {
                let at = DENSE + k * EVERY;
                if at >= start + n as u64 {
                    break;
                }
                for j in 0..8 {
                    let p = at + j;
                    if p >= start && p < start + n as u64 {
                        buf[usize::try_from(p - start).unwrap()] = byte_at(p);
                    }
                }
                k += 1;
            }
            if (start..start + n as u64).contains(&(BIG_LEN - 1)) {
                buf[usize::try_from(BIG_LEN - 1 - start).unwrap()] = 0xEE;
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

fn samples() -> Vec<u64> {
    let mut v = vec![
        0,
        DENSE - 1,
        DENSE,
        DENSE + 8,
        DENSE + EVERY,
        4 * GIB + 3,
        BIG_LEN - 1,
    ];
    for k in [1, 2, 100, 1000, 1500, 2000] {
        v.push(DENSE + k * EVERY);
        v.push(DENSE + k * EVERY + 7);
    }
    v.retain(|&p| p < BIG_LEN);
    v
}

#[test]
fn file_over_4_gib_with_index_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.img");
    let mut w = Ext4Writer::new(File::create(&img).unwrap(), Options::default()).unwrap();
    w.begin_region().unwrap();
    let data = w.append_file(&mut BigFile { pos: 0 }, BIG_LEN).unwrap();
    assert_eq!(data.len(), BIG_LEN);
    // Dense part plus about 2000 marker blocks (and the last block).
    assert!(data.allocated_blocks() > DENSE / 4096 + 1900);
    let mut tree = Tree::new(meta(0o755, 0, 0));
    tree.insert(
        b"big",
        Entry::File {
            meta: meta(0o644, 0, 0),
            data,
        },
    )
    .unwrap();
    let (file, summary) = w.finish(&tree).unwrap();
    assert!(summary.image_size > BIG_LEN);
    // The output stays sparse: far less is allocated than the image size.
    let allocated = std::os::unix::fs::MetadataExt::blocks(&file.metadata().unwrap()) * 512;
    assert!(allocated < GIB, "image allocates {allocated} bytes");
    drop(file);

    e2fsck_clean(&img);
    let fs = ext4_view::Ext4::load_from_path(&img).unwrap();
    let mut f = fs.open("/big").unwrap();
    assert_eq!(f.metadata().len(), BIG_LEN);
    for p in samples() {
        f.seek(SeekFrom::Start(p)).unwrap();
        let mut b = [0u8; 1];
        f.read_exact(&mut b).unwrap();
        assert_eq!(b[0], byte_at(p), "ext4-view byte {p}");
    }
    if let Some(m) = LoopMount::new(&img) {
        let mut f = File::open(m.path().join("big")).unwrap();
        assert_eq!(f.metadata().unwrap().len(), BIG_LEN);
        for p in samples() {
            f.seek(SeekFrom::Start(p)).unwrap();
            let mut b = [0u8; 1];
            f.read_exact(&mut b).unwrap();
            assert_eq!(b[0], byte_at(p), "mounted byte {p}");
        }
    }
}

#[test]
fn directory_with_100k_entries() {
    const N: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("wide.img");
    let mut w = Ext4Writer::new(File::create(&img).unwrap(), Options::default()).unwrap();
    w.begin_region().unwrap();
    let mut tree = Tree::new(meta(0o755, 0, 0));
    tree.insert(b"wide", Entry::Dir(meta(0o755, 0, 0))).unwrap();
    for i in 0..N {
        let name = format!("wide/entry-{i:06}");
        let entry = if i % 1000 == 0 {
            // Some subdirectories and some files with data, among empty files.
            Entry::Dir(meta(0o755, 0, 0))
        } else if i % 100 == 0 {
            let body = format!("file {i}");
            let data = w
                .append_file(&mut body.as_bytes(), body.len() as u64)
                .unwrap();
            Entry::File {
                meta: meta(0o644, 0, 0),
                data,
            }
        } else {
            Entry::File {
                meta: Metadata::new(0o644, 0, 0),
                data: w.append_file(&mut &b""[..], 0).unwrap(),
            }
        };
        tree.insert(name.as_bytes(), entry).unwrap();
    }
    let (_, summary) = w.finish(&tree).unwrap();
    assert!(summary.groups >= 4, "100k inodes need 4 groups of 32768");
    e2fsck_clean(&img);

    let fs = ext4_view::Ext4::load_from_path(&img).unwrap();
    assert_eq!(fs.read_dir("/wide").unwrap().count(), N + 2);
    assert_eq!(fs.read("/wide/entry-099900").unwrap(), b"file 99900");
    if let Some(m) = LoopMount::new(&img) {
        let names: Vec<_> = std::fs::read_dir(m.path().join("wide")).unwrap().collect();
        assert_eq!(names.len(), N);
        let st = std::fs::metadata(m.path().join("wide")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::nlink(&st), 2 + 100);
        assert_eq!(
            std::fs::read(m.path().join("wide/entry-000100")).unwrap(),
            b"file 100"
        );
    }
}

#[test]
fn directory_with_more_subdirs_than_link_max() {
    // 65000+ subdirectories: dir_nlink stores the parent's count as 1.
    const N: usize = 65_100;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("subdirs.img");
    let w = Ext4Writer::new(File::create(&img).unwrap(), Options::default()).unwrap();
    let mut tree = Tree::new(meta(0o755, 0, 0));
    tree.insert(b"d", Entry::Dir(meta(0o755, 0, 0))).unwrap();
    for i in 0..N {
        tree.insert(format!("d/{i}").as_bytes(), Entry::Dir(meta(0o700, 0, 0)))
            .unwrap();
    }
    w.finish(&tree).unwrap();
    e2fsck_clean(&img);
    if let Some(m) = LoopMount::new(&img) {
        let st = std::fs::metadata(m.path().join("d")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::nlink(&st), 1);
        assert_eq!(std::fs::read_dir(m.path().join("d")).unwrap().count(), N);
    }
}

//! Restores through the handler, in one process: the handler on a tokio runtime, the
//! client (the VMM's part, lode_snap::client) on plain threads reading its own
//! userfaultfd-backed memory. Every restore is compared with the snapshot page for page.
// lode-snap builds for 64-bit targets only; offsets here are small test sizes.
#![allow(clippy::cast_possible_truncation)]

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache::CacheConfig;
use lode_format::{ChunkFormat, ChunkSize};
use lode_image::{NoProgress, PublishOptions, Publisher};
use lode_kms::{Keyring, Kms};
use lode_read::ChunkCache;
use lode_snap::client::{self, Restore};
use lode_snap::mapping::{Mapping, PAGE_SIZE};
use lode_snap::{Prefetch, RecordPolicy, ServeOptions, SessionReport, Snapshot, workload};
use lode_store::Store;

#[path = "common/cache.rs"]
mod cache;

const SIZE: u64 = 24 << 20;
const CHUNK: u64 = 64 * 1024;
/// The segment size of the fixture's v2 chunks (the default, lz4 in 16 KiB segments): four
/// a chunk.
const SEGMENT: u64 = 16 * 1024;

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    kms: Keyring,
    memory: Vec<u8>,
    rt: tokio::runtime::Runtime,
}

/// A 24 MiB index image (its upper half zero) with a few chunks of noise far up in the
/// zero area, published at 64 KiB chunks (v2: 32 KiB segments) and tagged `snap`.
fn fixture() -> Fixture {
    fixture_in(None)
}

/// The fixture in chunk format `format` (`None`: the default for new images).
fn fixture_in(format: Option<ChunkFormat>) -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store").to_str().unwrap()).unwrap();
    let kms = Keyring::open_or_create(dir.path().join("keyring")).unwrap();
    let mut memory = workload::build(SIZE, 20_000).unwrap();
    for (i, b) in memory[(20 << 20)..(20 << 20) + 3 * CHUNK as usize]
        .iter_mut()
        .enumerate()
    {
        *b = (i as u8).wrapping_mul(31) ^ 0x5a;
    }
    let path = dir.path().join("mem.snap");
    std::fs::write(&path, &memory).unwrap();
    let opts = PublishOptions {
        chunk_size: ChunkSize::new(CHUNK).unwrap(),
        chunk_format: format,
        tag: Some("snap".into()),
        ..Default::default()
    };
    rt.block_on(
        Publisher::new(&store, &kms, kms.default_key_id()).publish_file(
            &path,
            &opts,
            Arc::new(NoProgress),
        ),
    )
    .unwrap();
    Fixture {
        dir,
        store,
        kms,
        memory,
        rt,
    }
}

struct Served {
    socket: PathBuf,
    reports: Arc<Mutex<Vec<SessionReport>>>,
    cache: Arc<ChunkCache>,
    task: tokio::task::JoinHandle<()>,
    rt: tokio::runtime::Handle,
}

impl Drop for Served {
    /// Stops the handler and waits until its listener is closed, so the next handler on
    /// the same state directory can bind the socket.
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.rt.block_on(&mut self.task);
    }
}

fn serve(fx: &Fixture, config: CacheConfig, opts: ServeOptions) -> Served {
    std::fs::create_dir_all(&config.state_dir).unwrap();
    let socket = config.state_dir.join("uffd.sock");
    let reports: Arc<Mutex<Vec<SessionReport>>> = Arc::default();
    let r = reports.clone();
    let (task, cache) = fx.rt.block_on(async {
        let cache = config.build(&fx.store);
        let snap = Snapshot::open(&fx.store, &fx.kms as &dyn Kms, cache.clone(), "snap")
            .await
            .unwrap();
        let listener = lode_snap::handler::bind(&socket).unwrap();
        let task = tokio::spawn(async move {
            let _ = lode_snap::serve(
                listener,
                Arc::new(snap),
                opts,
                Arc::new(move |rep| r.lock().unwrap().push(rep)),
            )
            .await;
        });
        (task, cache)
    });
    Served {
        socket,
        reports,
        cache,
        task,
        rt: fx.rt.handle().clone(),
    }
}

fn no_prefetch() -> ServeOptions {
    ServeOptions {
        prefetch: Prefetch::None,
        record: RecordPolicy::Never,
        ..Default::default()
    }
}

impl Served {
    /// Waits for the report of restore number `n` (1-based).
    fn report(&self, n: usize) -> SessionReport {
        for _ in 0..1000 {
            if let Some(r) = self.reports.lock().unwrap().get(n - 1) {
                return r.clone();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("restore {n} never reported");
    }

    fn hits(&self, tier: &str) -> u64 {
        self.cache.snapshot().tier(tier).map_or(0, |t| t.hits)
    }

    /// Misses of the decrypted-segment cache so far: one per segment decrypted.
    fn decrypted_misses(&self) -> u64 {
        self.cache
            .snapshot()
            .tier("decrypted")
            .map_or(0, |t| t.misses)
    }
}

/// What memory must read as once `removed` ranges are dropped.
fn expected(fx: &Fixture, removed: &[(u64, u64)]) -> Vec<u8> {
    let mut want = fx.memory.clone();
    for &(o, l) in removed {
        want[o as usize..(o + l) as usize].fill(0);
    }
    want
}

fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.chunks(PAGE_SIZE as usize)
        .zip(want.chunks(PAGE_SIZE as usize))
        .position(|(a, b)| a != b)
        .map(|p| p * PAGE_SIZE as usize)
}

/// Restores, drops `before` unread, reads `after` and then drops it, and checks every
/// page. Ranges are (offset, length) in bytes.
fn restore_and_check(fx: &Fixture, s: &Served, before: &[(u64, u64)], after: &[(u64, u64)]) {
    let r = client::restore(&s.socket, SIZE, 3).unwrap();
    for &(o, l) in before {
        r.memory.remove(o, l).unwrap();
    }
    for &(o, l) in after {
        let got = &r.memory.bytes()[o as usize..(o + l) as usize];
        assert_eq!(got, &fx.memory[o as usize..(o + l) as usize]);
        r.memory.remove(o, l).unwrap();
    }
    let removed: Vec<_> = before.iter().chain(after).copied().collect();
    let want = expected(fx, &removed);
    assert_eq!(
        first_difference(r.memory.bytes(), &want),
        None,
        "restored memory differs from the snapshot"
    );
}

#[test]
fn every_tier_serves_the_snapshot_page_for_page() {
    let fx = fixture();
    let nodes: Vec<_> = fx.rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(
                lode_cache_node::Node::start(lode_cache_node::NodeConfig {
                    listen: "127.0.0.1:0".parse().unwrap(),
                    memory_bytes: Some(64 << 20),
                    ..Default::default()
                })
                .await
                .unwrap(),
            );
        }
        v
    });
    let fleet: Vec<String> = nodes.iter().map(|n| n.local_addr().to_string()).collect();
    let with_az = |dir: &str| {
        let mut c = CacheConfig::new(fx.dir.path().join(dir));
        c.az = Some(lode_az::AzConfig {
            nodes: fleet.clone(),
            ..Default::default()
        });
        c
    };
    // A removed range in the index, one in the noise, one across a zero chunk boundary.
    let before = [((1 << 20) + 4096, 56 << 10), (20 << 20, 8 << 10)];
    let after = [(3 << 20, 200 << 10), ((16 << 20) - 8192, 16384)];

    // Origin: caches empty.
    let a = serve(&fx, with_az("a"), no_prefetch());
    restore_and_check(&fx, &a, &before, &after);
    let rep = a.report(1);
    assert!(rep.error.is_none(), "{rep:?}");
    let nonzero: Vec<&[u8]> = fx
        .memory
        .chunks(CHUNK as usize)
        .filter(|c| c.iter().any(|b| *b != 0))
        .collect();
    let indexes = nonzero.len() as u64;
    let stored = nonzero
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len() as u64;
    assert!(
        stored < indexes,
        "the noise chunks repeat, so some chunks share a name"
    );
    assert_eq!(
        a.hits("origin"),
        stored,
        "every stored chunk once from the origin"
    );
    assert_eq!(
        rep.demand_chunks, indexes,
        "one fetch per non-zero chunk of the snapshot"
    );
    assert!(rep.zero_faults > 0 && rep.pages_removed > 0, "{rep:?}");

    // Memory: the same worker again.
    let origin_before = a.hits("origin");
    restore_and_check(&fx, &a, &before, &after);
    assert!(a.report(2).error.is_none());
    assert_eq!(
        a.hits("origin"),
        origin_before,
        "nothing new from the origin"
    );
    assert!(
        a.hits("decrypted") >= stored,
        "served from decrypted memory"
    );
    fx.rt.block_on(a.cache.settle());
    drop(a);

    // Disk: a new worker over the same state directory.
    let b = serve(&fx, with_az("a"), no_prefetch());
    restore_and_check(&fx, &b, &before, &after);
    let rep = b.report(1);
    assert!(rep.error.is_none());
    // A local file counts a hit per segment it gives: at least one of every stored chunk,
    // at most all of their segments (a segment whose pages are all ballooned out is not
    // fetched; one faulted again comes from the decrypted tier).
    let disk = b.hits("disk");
    assert!(
        disk >= stored && disk <= stored * (CHUNK / SEGMENT),
        "{disk}"
    );
    assert!(disk <= rep.demand_segments, "{disk}: {rep:?}");
    assert_eq!(b.hits("origin") + b.hits("az"), 0);
    drop(b);

    // AZ: a new worker, empty local caches, same fleet.
    let c = serve(&fx, with_az("c"), no_prefetch());
    restore_and_check(&fx, &c, &before, &after);
    assert!(c.report(1).error.is_none());
    assert_eq!(c.hits("az"), stored);
    assert_eq!(c.hits("origin"), 0);
}

#[test]
fn zero_chunks_and_removed_pages_fetch_nothing() {
    let fx = fixture();
    let s = serve(
        &fx,
        CacheConfig::new(fx.dir.path().join("z")),
        no_prefetch(),
    );
    let r = client::restore(&s.socket, SIZE, 1).unwrap();
    // Far into the zero half (the noise is at 20 MiB).
    assert!(
        r.memory.bytes()[(14 << 20)..(16 << 20)]
            .iter()
            .all(|b| *b == 0)
    );
    // Dropped before ever being read: zero, though the snapshot holds data there.
    r.memory.remove(2 << 20, 1 << 20).unwrap();
    assert!(
        r.memory.bytes()[(2 << 20)..(3 << 20)]
            .iter()
            .all(|b| *b == 0)
    );
    drop(r);
    let rep = s.report(1);
    assert!(rep.error.is_none(), "{rep:?}");
    assert_eq!(rep.demand_chunks, 0, "{rep:?}");
    assert_eq!(s.hits("origin") + s.hits("disk") + s.hits("memory"), 0);
    assert_eq!(rep.pages_removed, 256);
    assert!(rep.zero_faults >= 32 + 256, "{rep:?}");
}

#[test]
fn concurrent_faults_on_one_chunk_share_one_fetch() {
    let fx = fixture();
    let s = serve(
        &fx,
        CacheConfig::new(fx.dir.path().join("c")),
        no_prefetch(),
    );
    let r = Arc::new(client::restore(&s.socket, SIZE, 1).unwrap());
    let threads: Vec<_> = (0..16u64)
        .map(|i| {
            let r = r.clone();
            std::thread::spawn(move || r.memory.bytes()[(5 * CHUNK + i * 4096) as usize])
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        assert_eq!(
            t.join().unwrap(),
            fx.memory[(5 * CHUNK) as usize + i * 4096]
        );
    }
    drop(r);
    let rep = s.report(1);
    assert_eq!(rep.demand_chunks, 1, "{rep:?}");
    assert_eq!(rep.demand_segments, CHUNK / SEGMENT, "{rep:?}");
    assert_eq!(
        s.hits("origin"),
        1,
        "every segment from one fetch of the chunk"
    );
    assert!(rep.faults >= 1 && rep.faults <= 16);
    assert_eq!(
        rep.pages_copied,
        CHUNK / PAGE_SIZE,
        "each segment installed once"
    );
}

/// Whether each page of `len` bytes at `addr` is resident, asked without faulting.
fn resident(addr: u64, len: u64) -> Vec<bool> {
    let mut v = vec![0u8; (len / PAGE_SIZE) as usize];
    // SAFETY: `addr` is page-aligned inside a live mapping of at least `len` bytes, and
    // `v` holds one byte per page of it.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len as usize, v.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    v.iter().map(|b| b & 1 == 1).collect()
}

#[test]
fn a_v2_fault_installs_only_its_segment() {
    let fx = fixture();
    let s = serve(
        &fx,
        CacheConfig::new(fx.dir.path().join("seg")),
        no_prefetch(),
    );
    let r = client::restore(&s.socket, SIZE, 1).unwrap();
    let chunk = 7 * CHUNK;
    let before = s.decrypted_misses();
    // A page in the chunk's second segment.
    let at = (chunk + SEGMENT + 3 * PAGE_SIZE) as usize;
    assert_eq!(r.memory.bytes()[at], fx.memory[at]);
    let pages = resident(r.memory.addr() + chunk, CHUNK);
    let per_segment = (SEGMENT / PAGE_SIZE) as usize;
    assert!(
        pages[per_segment..2 * per_segment].iter().all(|p| *p),
        "the faulted segment is installed whole: {pages:?}"
    );
    assert!(
        pages[..per_segment]
            .iter()
            .chain(&pages[2 * per_segment..])
            .all(|p| !*p),
        "the chunk's other segments are not installed: {pages:?}"
    );
    assert_eq!(
        s.decrypted_misses() - before,
        1,
        "one segment decrypted, not the chunk"
    );
    // The other segments then fault on their own and are served from the same fetch.
    for j in (0..CHUNK / SEGMENT).filter(|j| *j != 1) {
        let at = (chunk + j * SEGMENT + PAGE_SIZE) as usize;
        assert_eq!(r.memory.bytes()[at], fx.memory[at]);
    }
    assert!(resident(r.memory.addr() + chunk, CHUNK).iter().all(|p| *p));
    drop(r);
    let rep = s.report(1);
    assert!(rep.error.is_none(), "{rep:?}");
    assert_eq!(rep.segment_bytes, SEGMENT);
    assert_eq!(rep.faults, CHUNK / SEGMENT, "{rep:?}");
    assert_eq!(
        (rep.demand_segments, rep.demand_chunks),
        (CHUNK / SEGMENT, 1),
        "{rep:?}"
    );
    assert_eq!(rep.pages_copied, CHUNK / PAGE_SIZE, "{rep:?}");
    assert_eq!(
        s.hits("origin"),
        1,
        "one fetch of the chunk from the origin"
    );
}

#[test]
fn a_v1_snapshot_restores_page_for_page_a_chunk_at_a_time() {
    let fx = fixture_in(Some(ChunkFormat::V1));
    let s = serve(
        &fx,
        CacheConfig::new(fx.dir.path().join("v1")),
        no_prefetch(),
    );
    let before = [((1 << 20) + 4096, 56 << 10), (20 << 20, 8 << 10)];
    let after = [(3 << 20, 200 << 10), ((16 << 20) - 8192, 16384)];
    restore_and_check(&fx, &s, &before, &after);
    let rep = s.report(1);
    assert!(rep.error.is_none(), "{rep:?}");
    assert_eq!(rep.segment_bytes, CHUNK, "a v1 chunk is one segment");
    assert_eq!(rep.demand_segments, rep.demand_chunks, "{rep:?}");
    // One fault brings the whole chunk.
    let r = client::restore(&s.socket, SIZE, 1).unwrap();
    let at = (9 * CHUNK + SEGMENT) as usize;
    assert_eq!(r.memory.bytes()[at], fx.memory[at]);
    assert!(
        resident(r.memory.addr() + 9 * CHUNK, CHUNK)
            .iter()
            .all(|p| *p)
    );
    drop(r);
    let rep = s.report(2);
    assert_eq!((rep.faults, rep.demand_segments), (1, 1), "{rep:?}");
    assert_eq!(rep.pages_copied, CHUNK / PAGE_SIZE, "{rep:?}");
}

#[test]
fn the_working_set_is_recorded_then_installed_ahead_of_demand() {
    let fx = fixture();
    let s = serve(
        &fx,
        CacheConfig::new(fx.dir.path().join("w")),
        ServeOptions::default(),
    );
    let run = || {
        let r = client::restore(&s.socket, SIZE, 2).unwrap();
        let q = workload::query(r.memory.bytes(), 9, 300).unwrap();
        assert_eq!(q.answered, 300);
        assert_eq!(first_difference(r.memory.bytes(), &fx.memory), None);
    };
    run();
    let first = s.report(1);
    assert!(first.recorded && first.working_set_pages == 0, "{first:?}");
    run();
    let second = s.report(2);
    assert!(!second.recorded, "auto records only the first restore");
    assert!(second.working_set_pages > 0);
    assert!(second.prefetched_chunks > 0, "{second:?}");
    // The full comparison above touched every page, so count the workload's faults
    // separately: a third restore that runs only the workload.
    let r = client::restore(&s.socket, SIZE, 2).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    workload::query(r.memory.bytes(), 9, 300).unwrap();
    drop(r);
    let third = s.report(3);
    assert!(
        third.demand_chunks < first.demand_chunks / 4,
        "prefetch should leave few chunks to demand: {} vs {} without",
        third.demand_chunks,
        first.demand_chunks
    );
}

#[test]
fn each_restore_gets_a_fresh_generation_id_in_memory() {
    let fx = fixture();
    let opts = ServeOptions {
        generation_id_offset: Some(workload::GENERATION_OFFSET),
        ..no_prefetch()
    };
    let s = serve(&fx, CacheConfig::new(fx.dir.path().join("g")), opts);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = client::restore(&s.socket, SIZE, 1).unwrap();
        let announced = r.generation_id.clone().unwrap();
        let q = workload::query(r.memory.bytes(), 1, 10).unwrap();
        assert_eq!(q.generation_id, announced);
        let mut want = fx.memory.clone();
        let at = workload::GENERATION_OFFSET as usize;
        for i in 0..16 {
            want[at + i] = u8::from_str_radix(&announced[2 * i..2 * i + 2], 16).unwrap();
        }
        assert_eq!(first_difference(r.memory.bytes(), &want), None);
        seen.push(announced);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3, "generation ids repeat: {seen:?}");
    assert_eq!(
        s.report(3).generation_id,
        seen.iter()
            .find(|g| **g == s.report(3).generation_id)
            .unwrap()
            .clone()
    );
}

/// Sends a raw handshake and returns the handler's reply line.
fn handshake(socket: &Path, body: &[u8], fds: &[i32]) -> String {
    let stream = UnixStream::connect(socket).unwrap();
    match fds {
        [] => lode_snap::socket::send_handshake(&stream, body, None).unwrap(),
        [fd] => lode_snap::socket::send_handshake(&stream, body, Some(*fd)).unwrap(),
        _ => send_two(&stream, body, fds),
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = String::new();
    (&stream).read_to_string(&mut reply).unwrap();
    reply
}

/// One message carrying several descriptors (what a confused VMM might send).
fn send_two(stream: &UnixStream, body: &[u8], fds: &[i32]) {
    let mut cmsg = vec![0u64; 8];
    let mut iov = libc::iovec {
        iov_base: body.as_ptr() as *mut _,
        iov_len: body.len(),
    };
    // SAFETY: test code building a valid msghdr over live local buffers.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE((fds.len() * 4) as u32) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        assert!(libc::sendmsg(stream.as_raw_fd(), &msg, 0) > 0);
    }
}

#[test]
fn garbage_handshakes_are_refused_by_name_and_the_handler_goes_on() {
    let fx = fixture();
    let opts = ServeOptions {
        handshake_timeout: Duration::from_millis(300),
        ..no_prefetch()
    };
    let s = serve(&fx, CacheConfig::new(fx.dir.path().join("x")), opts);
    let mem = client::GuestMemory::new(SIZE).unwrap();
    let uffd = lode_snap::uffd::Uffd::create(0).unwrap();
    uffd.register(mem.addr(), mem.len()).unwrap();
    let fd = uffd.as_raw_fd();
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let good = client::mappings_json(&client::split_regions(&mem, 2));
    let region = |base: u64, size: u64, offset: u64| {
        client::mappings_json(&[Mapping {
            base,
            size,
            offset,
            page_size: PAGE_SIZE,
        }])
    };
    let base = mem.addr();
    let cases: Vec<(&str, Vec<u8>, Vec<i32>, &str)> = vec![
        (
            "bad json",
            b"[{\"base_host_virt_addr\": ".to_vec(),
            vec![fd],
            "not valid JSON",
        ),
        (
            "not a list",
            b"{\"size\": 1}".to_vec(),
            vec![fd],
            "not valid JSON",
        ),
        ("no regions", b"[]".to_vec(), vec![fd], "0 regions"),
        (
            "overlap",
            client::mappings_json(&[
                Mapping {
                    base,
                    size: 8 << 20,
                    offset: 0,
                    page_size: PAGE_SIZE,
                },
                Mapping {
                    base: base + (4 << 20),
                    size: 8 << 20,
                    offset: 8 << 20,
                    page_size: PAGE_SIZE,
                },
            ]),
            vec![fd],
            "overlap in host addresses",
        ),
        (
            "past the snapshot",
            region(base, SIZE, 4096),
            vec![fd],
            "runs past the end of the 25165824-byte snapshot",
        ),
        (
            "address overflow",
            region(u64::MAX - 4095, 8192, 0),
            vec![fd],
            "past the end of the address space",
        ),
        (
            "unaligned",
            region(base + 1, 4096, 0),
            vec![fd],
            "multiples of the 4096-byte page",
        ),
        (
            "no descriptor",
            good.clone(),
            vec![],
            "carried 0 file descriptors",
        ),
        (
            "two descriptors",
            good.clone(),
            vec![fd, devnull.as_raw_fd()],
            "carried 2 file descriptors",
        ),
        (
            "not a userfaultfd",
            good.clone(),
            vec![devnull.as_raw_fd()],
            "not a userfaultfd",
        ),
    ];
    for (i, (what, body, fds, want)) in cases.iter().enumerate() {
        let reply = handshake(&s.socket, body, fds);
        assert!(
            reply.contains(want),
            "{what}: reply {reply:?} lacks {want:?}"
        );
        let rep = s.report(i + 1);
        let err = rep.error.unwrap_or_default();
        assert!(err.contains(want), "{what}: report error {err:?}");
        assert_eq!(rep.faults, 0);
    }
    // A connection that closes at once, and one that never speaks, are refused too.
    drop(UnixStream::connect(&s.socket).unwrap());
    assert!(
        s.report(cases.len() + 1)
            .error
            .unwrap()
            .contains("closed the connection before the handshake")
    );
    let silent = UnixStream::connect(&s.socket).unwrap();
    let err = s.report(cases.len() + 2).error.unwrap();
    assert_eq!(
        err,
        "refused the VMM's handshake: no handshake within 300ms of connecting"
    );
    drop(silent);
    // The handler still serves a good restore afterwards.
    restore_and_check(&fx, &s, &[], &[]);
    assert!(s.report(cases.len() + 3).error.is_none());
}

#[test]
fn a_fault_outside_every_region_is_refused_and_nothing_is_installed_there() {
    let fx = fixture();
    let s = serve(
        &fx,
        CacheConfig::new(fx.dir.path().join("o")),
        no_prefetch(),
    );
    // Register all the memory but announce only its first half.
    let r: Restore = client::restore_with(&s.socket, SIZE, |m| {
        vec![Mapping {
            base: m.addr(),
            size: SIZE / 2,
            offset: 0,
            page_size: PAGE_SIZE,
        }]
    })
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    r.watch(move |why| {
        let _ = tx.send(why);
    })
    .unwrap();
    assert_eq!(
        r.memory.bytes()[100],
        fx.memory[100],
        "the announced half is served"
    );
    let r = Arc::new(r);
    let reader = r.clone();
    let outside = r.memory.addr() + SIZE / 2 + 4096;
    // This read can never be served; the thread stays blocked (and is left so).
    std::thread::spawn(move || reader.memory.bytes()[(SIZE / 2 + 4096) as usize]);
    let why = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the handler should give up");
    let want = format!("page fault at {outside:#x} lies outside every guest memory region");
    assert!(why.contains(&want), "{why}");
    let rep = s.report(1);
    assert!(rep.error.unwrap().contains(&want));
    // Nothing beyond the announced half was installed.
    assert!(rep.pages_copied + rep.pages_zeroed <= SIZE / 2 / PAGE_SIZE);
    // The blocked reader holds the memory; leak it rather than unmap under it.
    std::mem::forget(r);
}

#[test]
fn a_corrupt_chunk_is_never_served_as_a_page() {
    let fx = fixture();
    // Damage every stored chunk file in the store: flip one byte in each.
    let mut damaged = 0;
    for e in walk(&fx.dir.path().join("store")) {
        if e.to_string_lossy().contains("/chunks/") {
            let mut b = std::fs::read(&e).unwrap();
            b[100] ^= 1;
            std::fs::write(&e, b).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0);
    let s = serve(
        &fx,
        CacheConfig::new(fx.dir.path().join("k")),
        no_prefetch(),
    );
    let r = client::restore(&s.socket, SIZE, 1).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    r.watch(move |why| {
        let _ = tx.send(why);
    })
    .unwrap();
    let r = Arc::new(r);
    let reader = r.clone();
    let (got_tx, got_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = got_tx.send(reader.memory.bytes()[4096 * 3]);
    });
    let why = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the handler should give up");
    assert!(
        why.contains("cannot serve snapshot offset 0: chunk 0"),
        "{why}"
    );
    assert!(
        got_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the faulting read must not complete with some other bytes"
    );
    let rep = s.report(1);
    assert_eq!(rep.pages_copied, 0, "{rep:?}");
    std::mem::forget(r);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn prefetch_all_installs_everything_and_record_never_stores_nothing() {
    let fx = fixture();
    let opts = ServeOptions {
        prefetch: Prefetch::All,
        record: RecordPolicy::Never,
        ..Default::default()
    };
    let s = serve(&fx, CacheConfig::new(fx.dir.path().join("all")), opts);
    let r = client::restore(&s.socket, SIZE, 2).unwrap();
    // Give the prefetch time to finish before touching anything.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(first_difference(r.memory.bytes(), &fx.memory), None);
    drop(r);
    let rep = s.report(1);
    assert!(rep.error.is_none(), "{rep:?}");
    assert_eq!(
        rep.prefetched_chunks,
        SIZE / CHUNK,
        "every chunk, zero ones included"
    );
    assert_eq!(rep.prefetched_segments, SIZE / SEGMENT, "{rep:?}");
    assert_eq!(rep.faults, 0, "nothing left to fault: {rep:?}");
    assert!(!rep.recorded);
    let stored = fx.rt.block_on(async {
        let cache = CacheConfig::new(fx.dir.path().join("q")).build(&fx.store);
        Snapshot::open(&fx.store, &fx.kms as &dyn Kms, cache, "snap")
            .await
            .unwrap()
            .working_set()
            .await
            .unwrap()
    });
    assert_eq!(stored, None, "--record never stores no working set");
}

//! Restores through the handler, in one process: the handler on a tokio runtime, the
//! client (the VMM's part) on plain threads reading its own userfaultfd-backed memory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lode_agent::AgentConfig;
use lode_format::ChunkSize;
use lode_image::{NoProgress, PublishOptions, Publisher};
use lode_kms::{Keyring, Kms};
use lode_snap::client;
use lode_snap::{ServeOptions, SessionReport, Snapshot, workload};
use lode_store::Store;

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    kms: Keyring,
    memory: Vec<u8>,
    tag: String,
}

const SIZE: u64 = 24 << 20;

fn fixture(rt: &tokio::runtime::Runtime) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store").to_str().unwrap()).unwrap();
    let kms = Keyring::open_or_create(dir.path().join("keyring")).unwrap();
    let memory = workload::build(SIZE, 20_000).unwrap();
    let path = dir.path().join("mem.snap");
    std::fs::write(&path, &memory).unwrap();
    let opts = PublishOptions {
        chunk_size: ChunkSize::new(64 * 1024).unwrap(),
        tag: Some("snap".into()),
        ..Default::default()
    };
    rt.block_on(
        Publisher::new(&store, &kms, kms.default_key_id()).publish_file(&path, &opts, Arc::new(NoProgress)),
    )
    .unwrap();
    Fixture { dir, store, kms, memory, tag: "snap".into() }
}

struct Served {
    socket: PathBuf,
    reports: Arc<Mutex<Vec<SessionReport>>>,
    task: tokio::task::JoinHandle<()>,
}

fn serve(rt: &tokio::runtime::Runtime, fx: &Fixture, state: &Path, opts: ServeOptions) -> Served {
    let socket = state.join("uffd.sock");
    let reports: Arc<Mutex<Vec<SessionReport>>> = Arc::default();
    let r = reports.clone();
    let task = rt.block_on(async {
        let (cache, _) = lode_agent::build_cache(&AgentConfig::new(state), fx.store.clone()).unwrap();
        let snap = Snapshot::open(&fx.store, &fx.kms as &dyn Kms, cache, &fx.tag).await.unwrap();
        let listener = lode_snap::handler::bind(&socket).unwrap();
        tokio::spawn(async move {
            let _ = lode_snap::serve(listener, Arc::new(snap), opts, Arc::new(move |rep| r.lock().unwrap().push(rep))).await;
        })
    });
    Served { socket, reports, task }
}

fn wait_report(s: &Served, n: usize) -> SessionReport {
    for _ in 0..500 {
        if let Some(r) = s.reports.lock().unwrap().get(n - 1) {
            return r.clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("no report {n}");
}

#[test]
fn restored_memory_equals_the_snapshot_page_for_page() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let fx = fixture(&rt);
    let state = fx.dir.path().join("state");
    let s = serve(&rt, &fx, &state, ServeOptions::default());
    let r = client::restore(&s.socket, SIZE, 3).unwrap();
    assert_eq!(r.mappings.len(), 3);
    assert_eq!(r.memory.bytes(), &fx.memory[..]);
    drop(r);
    let rep = wait_report(&s, 1);
    assert!(rep.error.is_none(), "{rep:?}");
    assert!(rep.recorded);
    eprintln!("{}", serde_json::to_string(&SessionReport { fault_us: vec![], ..rep }).unwrap());
    s.task.abort();
}

//! Test parts: a real `docker-registry` on 127.0.0.1, a hand-built OCI image, skopeo to push
//! it, and a tiny HTTP server for faults a real registry will not commit.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// sha256 of `bytes` as `sha256:HEX`.
pub fn digest(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
    )
}

/// docker-registry's path, or `None` after `lode_testkit::skip` said it is missing.
pub fn registry_bin() -> Option<PathBuf> {
    lode_testkit::tool_from("docker-registry", "docker-registry")
}

/// A `docker-registry` process on 127.0.0.1, killed on drop.
pub struct Registry {
    pub addr: String,
    child: Child,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Registry {
    /// Starts a registry whose config has `auth_yaml` (already indented under `auth:`) if any.
    /// Returns `None` (after printing why) when docker-registry or skopeo is not installed.
    pub fn start(auth_yaml: Option<&str>) -> Option<Registry> {
        lode_testkit::tool_from("skopeo", "skopeo")?;
        let bin = registry_bin()?;
        let dir = tempfile::tempdir().unwrap();
        let port = lode_testkit::free_port();
        let addr = format!("127.0.0.1:{port}");
        let auth = auth_yaml.map_or(String::new(), |a| format!("auth:\n{a}"));
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n{auth}",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("registry.log");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config_path)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("registry.err")).unwrap())
            .spawn()
            .unwrap();
        let registry = Registry {
            addr,
            child,
            _dir: dir,
            log,
        };
        registry.wait_ready();
        Some(registry)
    }

    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(&self.addr) {
                let _ = write!(
                    s,
                    "GET /v2/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                    self.addr
                );
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.starts_with("HTTP/1.1") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let err = std::fs::read_to_string(self.dir().join("registry.err")).unwrap_or_default();
        panic!("docker-registry on {} did not come up: {err}", self.addr);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A layer's compressed bytes.
pub struct Layer {
    pub gz: Vec<u8>,
    pub diff_id: String,
}

/// A gzip tar with the given files (path, contents).
pub fn layer(files: &[(&str, &[u8])]) -> Layer {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, path, *data).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let diff_id = digest(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    Layer {
        gz: gz.finish().unwrap(),
        diff_id,
    }
}

/// The source image written by [`build_layout`].
pub struct SourceImage {
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digests: Vec<String>,
    /// For the multi-platform tag: the index and the arm64 manifest.
    pub index_digest: String,
    pub arm64_manifest_digest: String,
}

fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let d = digest(bytes);
    std::fs::write(
        dir.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:")),
        bytes,
    )
    .unwrap();
    d
}

fn image_manifest(
    dir: &Path,
    arch: &str,
    layers: &[(String, usize)],
    diff_ids: &[String],
) -> (String, String, usize) {
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = put_blob(dir, &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest, "size": config.len(),
        },
        "layers": layers.iter().map(|(d, size)| json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d, "size": size,
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let manifest_digest = put_blob(dir, &manifest);
    (manifest_digest, config_digest, manifest.len())
}

/// Writes an OCI layout with two tags: `TAG` (a two-layer linux/amd64 image) and `multi`
/// (an image index with that image for amd64 and a second manifest for arm64).
pub fn build_layout(dir: &Path, tag: &str) -> SourceImage {
    build_layout_with(dir, tag, b"hello from the app layer\n")
}

/// [`build_layout`] with the app layer's one file holding `app`, so that two layouts built
/// with different `app` are different images.
pub fn build_layout_with(dir: &Path, tag: &str, app: &[u8]) -> SourceImage {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let base = layer(&[("etc/hostname", b"lode\n"), ("bin/tool", &[7u8; 70_000])]);
    let app = layer(&[("app/main.txt", app)]);
    let mut layers = Vec::new();
    for l in [&base, &app] {
        layers.push((put_blob(dir, &l.gz), l.gz.len()));
    }
    let diff_ids = vec![base.diff_id.clone(), app.diff_id.clone()];
    let (manifest_digest, config_digest, manifest_size) =
        image_manifest(dir, "amd64", &layers, &diff_ids);
    let (arm_digest, _, arm_size) = image_manifest(dir, "arm64", &layers[..1], &diff_ids[..1]);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm_digest,
             "size": arm_size, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
             "size": manifest_size, "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }))
    .unwrap();
    let index_digest = put_blob(dir, &index);
    let top = json!({
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
             "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": tag}},
            {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest,
             "size": index.len(), "annotations": {"org.opencontainers.image.ref.name": "multi"}},
        ],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    SourceImage {
        manifest_digest,
        config_digest,
        layer_digests: layers.into_iter().map(|(d, _)| d).collect(),
        index_digest,
        arm64_manifest_digest: arm_digest,
    }
}

/// `skopeo copy` from `src` to `dest` with extra args; panics with skopeo's stderr on failure.
pub fn skopeo_copy(extra: &[&str], src: &str, dest: &str) {
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ])
        .args(extra)
        .args([src, dest])
        .stdin(Stdio::null())
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {src} {dest} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The blob bytes of `digest` in a layout.
pub fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .unwrap_or_else(|e| panic!("blob {digest} in {}: {e}", layout.display()))
}

/// Checks every file under `blobs/sha256` hashes to its name and nothing else lies in `blobs/`.
pub fn check_blobs(layout: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(layout.join("blobs")).unwrap() {
        let entry = entry.unwrap();
        assert_eq!(entry.file_name(), "sha256", "stray file in blobs/");
    }
    for entry in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let bytes = std::fs::read(entry.path()).unwrap();
        assert_eq!(
            digest(&bytes),
            format!("sha256:{name}"),
            "blob {name} corrupt"
        );
        n += 1;
    }
    n
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// One response of the fake server.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Send the body one byte at a time with this pause between bytes (a hostile registry
    /// holding the client); the server gives up when the client hangs up.
    pub drip: Option<Duration>,
    /// Leave out `Content-Length`: the body then ends when the connection closes, and its
    /// size is known to the client only as it reads.
    pub no_length: bool,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
            drip: None,
            no_length: false,
        }
    }

    pub fn without_length(mut self) -> Reply {
        self.no_length = true;
        self
    }

    pub fn drip(mut self, pause: Duration) -> Reply {
        self.drip = Some(pause);
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// A parsed request: method, path with query, headers (lower-cased names).
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 server on 127.0.0.1: one thread, one request per connection.
pub struct FakeServer {
    pub addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeServer {
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + 'static) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            // Bounded: the server lives at most a minute even if never dropped.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        serve_one(stream, &handler);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(stream: TcpStream, handler: &dyn Fn(&Request) -> Reply) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // A client that gave up may leave its socket open without reading (its runtime busy
    // elsewhere): the server must not wait on it forever.
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.is_empty() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let req = Request {
        method,
        target,
        headers,
    };
    let reply = handler(&req);
    let mut out = stream;
    let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", reply.status);
    if !reply.no_length {
        head.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
    }
    for (n, v) in &reply.headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = out.write_all(head.as_bytes());
    if req.method != "HEAD" {
        match reply.drip {
            None => {
                let _ = out.write_all(&reply.body);
            }
            Some(pause) => {
                let _ = out.flush();
                for byte in &reply.body {
                    if out.write_all(&[*byte]).and_then(|()| out.flush()).is_err() {
                        return;
                    }
                    std::thread::sleep(pause);
                }
            }
        }
    }
    let _ = out.flush();
}

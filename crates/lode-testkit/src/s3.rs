//! An S3 server in the test's own process: s3s-fs, which keeps each bucket as a directory
//! and each object as a file (so a test can damage one behind the client's back), and
//! checks every request's SigV4 signature against one access key. It can also fail a
//! seeded share of requests, as S3 does under load (503 SlowDown) or when it breaks (500).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};

/// The access key the server accepts.
pub const S3_ACCESS_KEY: &str = "lode-test-access";
/// Its secret.
pub const S3_SECRET_KEY: &str = "lode-test-secret";
/// The region clients sign for.
pub const S3_REGION: &str = "us-east-1";

/// An s3s-fs server on a free port of 127.0.0.1 over a temporary directory, holding one
/// empty bucket. It answers from [`serve`](Self::serve) until dropped, on a runtime of
/// its own.
#[derive(Debug)]
pub struct S3Fs {
    endpoint: String,
    bucket_dir: PathBuf,
    listener: Option<std::net::TcpListener>,
    faults: Arc<Faults>,
    runtime: Option<tokio::runtime::Runtime>,
    // Declared last: the runtime stops before the files go.
    root: tempfile::TempDir,
}

impl S3Fs {
    /// [`bind`](Self::bind), then [`serve`](Self::serve).
    pub fn start(bucket: &str) -> S3Fs {
        let mut s3 = S3Fs::bind(bucket);
        s3.serve();
        s3
    }

    /// Makes the bucket and binds the port, and starts no thread: a test that points
    /// lode at the server through the process's environment sets it now, while no other
    /// thread can be reading it.
    pub fn bind(bucket: &str) -> S3Fs {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        S3Fs::on(bucket, listener)
    }

    /// As [`bind`](Self::bind), on a socket the caller bound: one in another network
    /// namespace, say ([`TestNet::bind_tcp`](crate::TestNet::bind_tcp)).
    pub fn on(bucket: &str, listener: std::net::TcpListener) -> S3Fs {
        let root = tempfile::tempdir().expect("a temporary directory for s3s-fs");
        let bucket_dir = root.path().join(bucket);
        std::fs::create_dir(&bucket_dir).expect("make the bucket's directory");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener for tokio");
        let endpoint = format!("http://{}", listener.local_addr().expect("bound address"));
        S3Fs {
            endpoint,
            bucket_dir,
            listener: Some(listener),
            faults: Arc::new(Faults::default()),
            runtime: None,
            root,
        }
    }

    /// Starts answering, on a runtime of two threads. Once is enough: later calls do
    /// nothing.
    pub fn serve(&mut self) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3s-fs")
            .enable_all()
            .build()
            .expect("a runtime for s3s-fs");
        let root = self.root.path().to_owned();
        let faults = Arc::clone(&self.faults);
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            serve_dir(root, listener, faults).await;
        });
        self.runtime = Some(runtime);
    }

    /// From now on, answers `per_million` of every million requests (drawn from `seed`)
    /// with `status` (503: S3's `SlowDown`; 500: `InternalError`) without looking at
    /// them; 0 stops that. Takes effect at once, also while serving.
    pub fn fail_requests(&self, per_million: u32, status: u16, seed: u64) {
        // splitmix64 of the seed: xorshift from a small seed starts out small.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.faults
            .state
            .store((z ^ (z >> 31)) | 1, Ordering::Relaxed);
        self.faults
            .status
            .store(u32::from(status), Ordering::Relaxed);
        self.faults
            .per_million
            .store(per_million, Ordering::Relaxed);
    }

    /// Requests answered with a failure so far.
    pub fn failed_requests(&self) -> u64 {
        self.faults.failed.load(Ordering::Relaxed)
    }

    /// Its URL, `http://ADDRESS:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bucket's directory: the object `a/b` is the file `a/b` under it.
    pub fn bucket_dir(&self) -> &Path {
        &self.bucket_dir
    }

    /// The AWS environment that points a client (lode among them) at this server.
    pub fn env(&self) -> [(&'static str, String); 4] {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.to_owned()),
            ("AWS_REGION", S3_REGION.to_owned()),
        ]
    }
}

/// Answers S3 requests on `listener` for ever: each directory under `root` a bucket,
/// signatures checked against [`S3_ACCESS_KEY`], `faults` applied. The server of
/// [`S3Fs`], and of the `lode-s3-server` binary (the origin of the evaluation's test
/// network, which outlives any one test).
pub async fn serve_dir(root: PathBuf, listener: tokio::net::TcpListener, faults: Arc<Faults>) {
    let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs over its directory");
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(S3_ACCESS_KEY, S3_SECRET_KEY));
    let service = Faulty {
        inner: builder.build(),
        faults,
    };
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// The share of requests to fail, and a seeded generator to pick them.
#[derive(Debug, Default)]
pub struct Faults {
    per_million: AtomicU32,
    status: AtomicU32,
    state: AtomicU64,
    failed: AtomicU64,
}

impl Faults {
    /// Whether to fail this request: xorshift64* steps, so a seed gives the same picks
    /// in the same order of requests.
    fn pick(&self) -> Option<hyper::StatusCode> {
        let share = self.per_million.load(Ordering::Relaxed);
        if share == 0 {
            return None;
        }
        let step = |mut x: u64| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x
        };
        let prev = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(step(x)))
            .unwrap_or_else(|x| x);
        let draw = step(prev).wrapping_mul(0x2545_f491_4f6c_dd1d) % 1_000_000;
        if draw >= u64::from(share) {
            return None;
        }
        self.failed.fetch_add(1, Ordering::Relaxed);
        let status = u16::try_from(self.status.load(Ordering::Relaxed)).unwrap_or(503);
        Some(hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::SERVICE_UNAVAILABLE))
    }
}

/// The S3 service, with [`Faults`] in front.
#[derive(Clone)]
struct Faulty {
    inner: S3Service,
    faults: Arc<Faults>,
}

type Reply = Result<s3s::HttpResponse, s3s::HttpError>;

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Faulty {
    type Response = s3s::HttpResponse;
    type Error = s3s::HttpError;
    type Future = Pin<Box<dyn Future<Output = Reply> + Send>>;

    fn call(&self, req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let Some(status) = self.faults.pick() else {
            return Box::pin(hyper::service::Service::call(&self.inner, req));
        };
        let code = if status == hyper::StatusCode::SERVICE_UNAVAILABLE {
            "SlowDown"
        } else {
            "InternalError"
        };
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
             <Message>injected by the test server</Message></Error>"
        );
        let reply = hyper::Response::builder()
            .status(status)
            .header("content-type", "application/xml")
            .body(s3s::Body::from(body))
            .map_err(|e| s3s::HttpError::new(Box::new(e)));
        Box::pin(std::future::ready(reply))
    }
}

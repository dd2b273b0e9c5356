//! An S3 server in the test's own process: s3s-fs, which keeps each bucket as a directory
//! and each object as a file (so a test can damage one behind the client's back), and
//! checks every request's SigV4 signature against one access key.

use std::path::{Path, PathBuf};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

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
        let root = tempfile::tempdir().expect("a temporary directory for s3s-fs");
        let bucket_dir = root.path().join(bucket);
        std::fs::create_dir(&bucket_dir).expect("make the bucket's directory");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener for tokio");
        let endpoint = format!("http://{}", listener.local_addr().expect("bound address"));
        S3Fs {
            endpoint,
            bucket_dir,
            listener: Some(listener),
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
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs over its directory");
            let mut builder = S3ServiceBuilder::new(fs);
            builder.set_auth(SimpleAuth::from_single(S3_ACCESS_KEY, S3_SECRET_KEY));
            let service = builder.build();
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let (socket, _) = listener.accept().await.expect("accept a connection");
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        self.runtime = Some(runtime);
    }

    /// Its URL, `http://127.0.0.1:PORT`.
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

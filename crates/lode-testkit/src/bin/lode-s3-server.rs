//! The S3-protocol server of lode's tests (s3s-fs, SigV4 checked against the testkit's
//! access key) as a process of its own, for the evaluation's test network, where the
//! origin runs on a host of its own: `lode-s3-server --listen ADDR --dir DIR`. Each
//! directory under DIR is a bucket (`--bucket NAME` makes one). It prints `listening on
//! ADDR` once it accepts connections, and serves until killed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    let mut listen = None;
    let mut dir = None;
    let mut buckets = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next(),
            "--dir" => dir = args.next().map(PathBuf::from),
            "--bucket" => buckets.extend(args.next()),
            "-h" | "--help" => {
                println!(
                    "usage: lode-s3-server --listen ADDR:PORT --dir DIR [--bucket NAME]...\n\
                     Serves S3 over DIR (one directory per bucket) with the access key {} \
                     and its secret {} (region {}).",
                    lode_testkit::S3_ACCESS_KEY,
                    lode_testkit::S3_SECRET_KEY,
                    lode_testkit::S3_REGION
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("lode-s3-server: unknown argument {other:?} (see --help)");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(listen), Some(dir)) = (listen, dir) else {
        eprintln!("lode-s3-server: --listen and --dir are required (see --help)");
        return ExitCode::from(2);
    };
    for b in &buckets {
        if let Err(e) = std::fs::create_dir_all(dir.join(b)) {
            eprintln!(
                "lode-s3-server: making bucket {b} under {}: {e}",
                dir.display()
            );
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lode-s3-server: a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("lode-s3-server: listening on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("listening on {listen}");
        lode_testkit::serve_dir(dir, listener, Arc::new(lode_testkit::Faults::default())).await;
        ExitCode::SUCCESS
    })
}

//! Serves a file (or a zeroed in-memory disk) over NBD until Ctrl-C.
//!
//! ```text
//! cargo run -p lode-nbd --example serve_file -- [--tcp ADDR] [--unix PATH]
//!     [--name NAME] [--rw] (FILE | --memory BYTES)
//! nbdinfo --list nbd://127.0.0.1:10809
//! ```

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;

use lode_blockdev::BlockDevice;
use lode_nbd::{Export, Exports, FileDevice, MemDevice, Server};

struct Args {
    tcp: Option<String>,
    unix: Option<String>,
    name: String,
    writable: bool,
    file: Option<String>,
    memory: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        tcp: None,
        unix: None,
        name: String::new(),
        writable: false,
        file: None,
        memory: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| it.next().ok_or(format!("{flag} needs a value"));
        match arg.as_str() {
            "--tcp" => args.tcp = Some(value("--tcp")?),
            "--unix" => args.unix = Some(value("--unix")?),
            "--name" => args.name = value("--name")?,
            "--rw" => args.writable = true,
            "--memory" => {
                let v = value("--memory")?;
                args.memory = Some(v.parse().map_err(|_| format!("bad --memory {v:?}"))?);
            }
            s if s.starts_with("--") => return Err(format!("unknown flag {s}")),
            _ => args.file = Some(arg),
        }
    }
    if args.file.is_none() == args.memory.is_none() {
        return Err("give exactly one of FILE or --memory BYTES".into());
    }
    if args.tcp.is_none() && args.unix.is_none() {
        args.tcp = Some("127.0.0.1:10809".into());
    }
    Ok(args)
}

async fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let device: Arc<dyn BlockDevice> = match (&args.file, args.memory) {
        (Some(path), _) => Arc::new(FileDevice::open(path, args.writable)?),
        (None, Some(size)) => {
            let dev = MemDevice::new(size);
            Arc::new(if args.writable {
                dev
            } else {
                dev.into_read_only()
            })
        }
        (None, None) => unreachable!("checked in parse_args"),
    };
    let exports = Exports::new();
    exports.add(args.name.clone(), Export::new(device))?;
    exports.set_default(Some(args.name.clone()));
    let server = Server::builder(exports)
        .on_connection_error(|peer, e| {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("connection from {peer} closed: {msg}");
        })
        .build()?;
    if let Some(addr) = &args.tcp {
        let bound = server.listen_tcp(addr.parse()?).await?;
        println!("listening on nbd://{bound}/{}", args.name);
    }
    if let Some(path) = &args.unix {
        server.listen_unix(path)?;
        println!("listening on nbd+unix:///{}?socket={path}", args.name);
    }
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    if let Some(path) = &args.unix {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("serve_file: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serve_file: {e}");
            ExitCode::FAILURE
        }
    }
}

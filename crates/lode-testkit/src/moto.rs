//! moto's server: S3, KMS and IAM as AWS speaks them, for the tests of lode's AWS KMS
//! backend, the store role policies and the control service.

use crate::{free_port, tool};

/// Runs moto's server with one fix to its IAM signature check: moto 5.2 checks a request's
/// SigV4 signature against the query string as its web framework decoded it (`%2F` back
/// to `/`), so every signed S3 request whose query holds an encoded byte — a listing
/// under a prefix — fails with SignatureDoesNotMatch once IAM is enforced, for boto3 as
/// for any other client. The fix hands the check the query exactly as it was sent.
const MOTO_SERVER: &str = r#"
import sys
from moto.iam import access_control

_original = access_control.IAMRequestBase._create_aws_request

def _create_aws_request(self):
    request = _original(self)
    from flask import has_request_context, request as incoming
    if has_request_context() and incoming.query_string:
        request.url = self._path.partition("?")[0] + "?" + incoming.query_string.decode()
    return request

access_control.IAMRequestBase._create_aws_request = _create_aws_request
from moto.server import main
main(sys.argv[1:])
"#;

/// A real AWS-protocol server (moto's `moto_server`, from PyPI: S3, KMS, IAM and more)
/// on a free port of 127.0.0.1, killed when dropped.
#[derive(Debug)]
pub struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Moto {
    /// Starts `moto_server` and waits (at most 60 s) until it answers. `None` after
    /// [`skip`](crate::skip) when it is not installed (scripts/test.sh installs
    /// `moto[server]`).
    pub fn start() -> Option<Moto> {
        tool("moto_server")?;
        let python = tool("python3")?;
        let port = free_port();
        // moto_server's own interpreter is the python3 on PATH wherever pip installed it
        // (scripts/test.sh, a virtualenv, pyenv).
        let child = std::process::Command::new(python)
            .args([
                "-c",
                MOTO_SERVER,
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let moto = Moto { child, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while moto.get("/moto-api/data.json").is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto_server on port {port} did not answer within 60 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Some(moto)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its endpoint URL, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Turns on moto's IAM enforcement from now on: every later request must be signed by
    /// a known access key whose policies allow it. Make the users, policies and access
    /// keys before calling this.
    pub fn enforce_iam(&self) {
        let reply = self
            .request("POST", "/moto-api/reset-auth", "0")
            .expect("moto answers /moto-api/reset-auth");
        assert!(
            reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"),
            "moto refused to enforce IAM: {reply}"
        );
    }

    fn get(&self, path: &str) -> Option<String> {
        self.request("GET", path, "")
    }

    fn request(&self, method: &str, path: &str, body: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .ok()?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).ok()?;
        reply.starts_with("HTTP/").then_some(reply)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

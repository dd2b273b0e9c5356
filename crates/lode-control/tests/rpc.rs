//! The transport on its own: real TLS with client certificates on loopback, and the Unix
//! socket, against a handler that answers with the caller's identity.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use lode_control::api::{Identity, Role};
use lode_control::pki::{self, Credentials};
use lode_control::rpc::{self, Client, Endpoint, Handler, Listener, Reply, RpcError};

struct WhoAmI;

#[async_trait::async_trait]
impl Handler for WhoAmI {
    async fn handle(&self, peer: Identity, path: &str, body: Bytes) -> Reply {
        if path != "/v1/whoami" {
            return Reply::error(404, format!("no route {path}"));
        }
        let said: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return Reply::error(400, e.to_string()),
        };
        Reply::json(&serde_json::json!({ "peer": peer, "said": said }))
    }
}

fn worker(id: &str) -> Identity {
    Identity {
        role: Role::Worker,
        id: id.to_owned(),
    }
}

async fn tls_server(dir: &std::path::Path) -> (Endpoint, tokio::task::JoinHandle<()>) {
    let creds = Arc::new(Credentials::load(dir, &pki::control_identity()).unwrap());
    let listener = Listener::tls("127.0.0.1:0", creds).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = rpc::serve(listener, Arc::new(WhoAmI));
    (format!("https://{addr}").parse().unwrap(), task)
}

#[tokio::test]
async fn tls_names_the_caller_by_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(dir.path(), &["127.0.0.1".to_owned()], 1).unwrap();
    pki::issue(dir.path(), &worker("w1"), &[], 1).unwrap();
    let (endpoint, _server) = tls_server(dir.path()).await;
    let creds = Arc::new(Credentials::load(dir.path(), &worker("w1")).unwrap());
    let client = Client::new(endpoint.clone(), creds).unwrap();
    let answer: serde_json::Value = client
        .call("/v1/whoami", &serde_json::json!({"x": 1}))
        .await
        .unwrap();
    assert_eq!(answer["peer"]["role"], "worker");
    assert_eq!(answer["peer"]["id"], "w1");
    assert_eq!(answer["said"]["x"], 1);

    let err = client
        .call::<_, serde_json::Value>("/v1/nowhere", &())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RpcError::Refused { status: 404, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("/v1/nowhere") && text.contains(&endpoint.to_string()),
        "{text}"
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(dir.path(), &["127.0.0.1".to_owned()], 1).unwrap();
    let forger = tempfile::tempdir().unwrap();
    pki::init(forger.path(), &["127.0.0.1".to_owned()], 1).unwrap();
    pki::issue(forger.path(), &worker("w1"), &[], 1).unwrap();
    let (endpoint, _server) = tls_server(dir.path()).await;

    // The forger's worker, trusting the real CA so only the server's check can stop it.
    std::fs::copy(dir.path().join("ca.pem"), forger.path().join("ca.pem")).unwrap();
    let forged = Arc::new(Credentials::load(forger.path(), &worker("w1")).unwrap());
    let err = Client::new(endpoint.clone(), forged)
        .unwrap()
        .call::<_, serde_json::Value>("/v1/whoami", &())
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Transport { .. }), "{err}");

    // A server with a forged certificate: the client refuses it.
    let fake = tempfile::tempdir().unwrap();
    pki::init(fake.path(), &["127.0.0.1".to_owned()], 1).unwrap();
    let (fake_endpoint, _fake) = tls_server(fake.path()).await;
    pki::issue(dir.path(), &worker("w1"), &[], 1).unwrap();
    let real = Arc::new(Credentials::load(dir.path(), &worker("w1")).unwrap());
    let err = Client::new(fake_endpoint, real)
        .unwrap()
        .call::<_, serde_json::Value>("/v1/whoami", &())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("TLS handshake"), "{text}");
}

#[tokio::test]
async fn an_expired_certificate_fails_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(dir.path(), &["127.0.0.1".to_owned()], 1).unwrap();
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    pki::issue_valid(dir.path(), &worker("old"), &[], now - 3 * day, now - day).unwrap();
    let (endpoint, _server) = tls_server(dir.path()).await;
    let creds = Arc::new(Credentials::load(dir.path(), &worker("old")).unwrap());
    let err = Client::new(endpoint, creds)
        .unwrap()
        .call::<_, serde_json::Value>("/v1/whoami", &())
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Transport { .. }), "{err}");
}

#[tokio::test]
async fn the_unix_socket_is_private_and_takes_the_stated_identity() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(dir.path(), &[], 1).unwrap();
    pki::issue(dir.path(), &worker("w2"), &[], 1).unwrap();
    let socket = dir.path().join("control.sock");
    let listener = Listener::unix(&socket).unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let _server = rpc::serve(listener, Arc::new(WhoAmI));
    let creds = Arc::new(Credentials::load(dir.path(), &worker("w2")).unwrap());
    let client = Client::new(Endpoint::Unix(socket), creds).unwrap();
    let answer: serde_json::Value = client.call("/v1/whoami", &1).await.unwrap();
    assert_eq!(answer["peer"]["id"], "w2");

    // A body over the limit is refused, not read whole.
    let big = vec![b' '; rpc::MAX_REQUEST + 1];
    let (status, _) = client.exchange("/v1/whoami", big).await.unwrap();
    assert_eq!(status, 413);
}

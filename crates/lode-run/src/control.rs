//! The client half of the agent's control API, as `lode mount` and `lode run` use it:
//! one blocking request per call over the agent's Unix socket.

use std::path::Path;

use lode_agent::AgentError;
use serde_json::Value;

/// A control request that failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The agent could not be reached, or answered with an error.
    #[error("{method} {path} to the agent: {source}")]
    Request {
        /// The HTTP method.
        method: String,
        /// The API path.
        path: String,
        /// What went wrong (boxed: it is large, and rare).
        source: Box<AgentError>,
    },
}

/// Sends `method path` with an optional JSON body to the agent at `socket` and returns
/// its JSON answer.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, ControlError> {
    let wrap = |source| ControlError::Request {
        method: method.to_string(),
        path: path.to_string(),
        source: Box::new(source),
    };
    lode_agent::control::request(socket, method, path, body)
        .map_err(wrap)?
        .json()
        .map_err(wrap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_agent_names_the_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("control.sock");
        let e = call(&sock, "GET", "/ls", None).expect_err("no agent");
        let msg = e.to_string();
        assert!(
            msg.starts_with("GET /ls to the agent: no agent listening on ")
                && msg.contains("control.sock"),
            "{msg}"
        );
    }
}

//! The daemon's own counters, beside the read path's ([`lode_read::MetricsSnapshot`]) and
//! the AZ client's ([`lode_read::az_prometheus`]): the NBD server's and the read alarms',
//! as JSON and in the Prometheus text format, for the control API's `/stats` and
//! `/metrics`.

use std::fmt::Write as _;

/// The NBD server's counters and limits as JSON (`lode stats --json`, under `nbd`).
pub fn nbd_json(s: &lode_nbd::ServerStats, limits: &crate::NbdLimits) -> serde_json::Value {
    serde_json::json!({
        "connections_open": s.connections_active,
        "connections_accepted": s.connections_accepted,
        "connections_refused": s.connections_refused,
        "connection_errors": s.connection_errors,
        "requests": s.requests,
        "request_errors": s.request_errors,
        "buffered_bytes": s.buffered_bytes,
        "peak_buffered_bytes": s.peak_buffered_bytes,
        "max_connections": limits.max_connections,
        "max_buffered_bytes": limits.max_buffered_bytes,
    })
}

/// The NBD server's counters in the Prometheus text format.
pub fn nbd_prometheus(s: &lode_nbd::ServerStats, limits: &crate::NbdLimits) -> String {
    let rows: [(&str, &str, &str, u64); 10] = [
        (
            "connections_open",
            "gauge",
            "NBD connections open, handshakes included.",
            s.connections_active,
        ),
        (
            "connections_accepted_total",
            "counter",
            "NBD connections admitted.",
            s.connections_accepted,
        ),
        (
            "connections_refused_total",
            "counter",
            "NBD connections closed at once for max_connections.",
            s.connections_refused,
        ),
        (
            "connection_errors_total",
            "counter",
            "NBD connections ended by an error (handshake timeout, protocol violation, I/O).",
            s.connection_errors,
        ),
        ("requests_total", "counter", "NBD requests.", s.requests),
        (
            "request_errors_total",
            "counter",
            "NBD requests answered with an error.",
            s.request_errors,
        ),
        (
            "buffered_bytes",
            "gauge",
            "Payload bytes held for NBD connections: unread replies and write data.",
            s.buffered_bytes,
        ),
        (
            "buffered_bytes_peak",
            "gauge",
            "The most buffered_bytes has been since the agent started.",
            s.peak_buffered_bytes,
        ),
        (
            "max_connections",
            "gauge",
            "The connection limit.",
            limits.max_connections as u64,
        ),
        (
            "max_buffered_bytes",
            "gauge",
            "The byte budget of one connection.",
            limits.max_buffered_bytes,
        ),
    ];
    let mut o = String::new();
    for (name, kind, help, v) in rows {
        let _ = writeln!(o, "# HELP lode_nbd_{name} {help}");
        let _ = writeln!(o, "# TYPE lode_nbd_{name} {kind}");
        let _ = writeln!(o, "lode_nbd_{name} {v}");
    }
    o
}

/// Reads of roots past expiry (each raised a read alarm, docs/gc.md), per root, in the
/// Prometheus text format; the HELP and TYPE lines even when there are none.
pub fn root_alarms_prometheus(
    reads: &std::collections::BTreeMap<lode_format::RootId, u64>,
) -> String {
    let name = "lode_root_alarm_reads_total";
    let mut o = format!(
        "# HELP {name} Reads from the origin store (chunks, and manifests at attach) of a root \
         that is expired, deleting or deleted: each raised a read alarm.\n# TYPE {name} counter\n"
    );
    for (root, n) in reads {
        let _ = writeln!(o, "{name}{{root=\"{root}\"}} {n}");
    }
    o
}

/// Each image's prefetch figures in the Prometheus text format, labelled by manifest
/// and kind (`working_set`, `readahead`); the HELP and TYPE lines even when there are none.
pub fn prefetch_prometheus(
    images: &std::collections::BTreeMap<String, lode_read::PrefetchSnapshot>,
) -> String {
    type Field = fn(&lode_read::AheadSnapshot) -> u64;
    let rows: [(&str, &str, &str, Field); 5] = [
        (
            "chunks_total",
            "counter",
            "Chunks fetched ahead of demand from the AZ cache or the origin.",
            |a| a.chunks,
        ),
        (
            "bytes_total",
            "counter",
            "Plaintext bytes of the chunks fetched ahead.",
            |a| a.bytes,
        ),
        (
            "used_bytes_total",
            "counter",
            "Bytes fetched ahead that a read then touched.",
            |a| a.used_bytes,
        ),
        (
            "wasted_bytes_total",
            "counter",
            "Bytes fetched ahead and never read before the attachment ended.",
            |a| a.wasted_bytes,
        ),
        (
            "errors_total",
            "counter",
            "Fetches ahead that failed.",
            |a| a.errors,
        ),
    ];
    let mut o = String::new();
    for (name, kind, help, field) in rows {
        let _ = writeln!(o, "# HELP lode_prefetch_{name} {help}");
        let _ = writeln!(o, "# TYPE lode_prefetch_{name} {kind}");
        for (id, s) in images {
            for (k, a) in [("working_set", &s.working_set), ("readahead", &s.readahead)] {
                let _ = writeln!(
                    o,
                    "lode_prefetch_{name}{{manifest=\"{id}\",kind=\"{k}\"}} {}",
                    field(a)
                );
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_counters_render() {
        let s = lode_nbd::ServerStats {
            connections_accepted: 5,
            connections_active: 2,
            connections_refused: 3,
            buffered_bytes: 4096,
            peak_buffered_bytes: 1 << 20,
            ..Default::default()
        };
        let limits = crate::NbdLimits::default();
        let p = nbd_prometheus(&s, &limits);
        for line in [
            "# TYPE lode_nbd_connections_open gauge",
            "lode_nbd_connections_open 2",
            "lode_nbd_connections_refused_total 3",
            "lode_nbd_buffered_bytes 4096",
            "lode_nbd_buffered_bytes_peak 1048576",
            "lode_nbd_max_buffered_bytes 4194304",
        ] {
            assert!(p.lines().any(|l| l == line), "{line} missing from\n{p}");
        }
        let j = nbd_json(&s, &limits);
        assert_eq!(j["connections_refused"], 3);
        assert_eq!(j["max_connections"], 64);
    }

    #[test]
    fn prefetch_figures_render_per_image_and_kind() {
        let mut s = lode_read::PrefetchSnapshot::default();
        s.working_set.used_bytes = 4096;
        s.readahead.chunks = 3;
        let p = prefetch_prometheus(&std::collections::BTreeMap::from([("ab".to_owned(), s)]));
        for line in [
            "# TYPE lode_prefetch_used_bytes_total counter",
            "lode_prefetch_used_bytes_total{manifest=\"ab\",kind=\"working_set\"} 4096",
            "lode_prefetch_chunks_total{manifest=\"ab\",kind=\"readahead\"} 3",
            "lode_prefetch_wasted_bytes_total{manifest=\"ab\",kind=\"readahead\"} 0",
        ] {
            assert!(p.lines().any(|l| l == line), "{line} missing from\n{p}");
        }
    }

    #[test]
    fn root_alarm_reads_render_per_root() {
        let p = root_alarms_prometheus(&std::collections::BTreeMap::from([
            (lode_format::RootId(2), 7),
            (lode_format::RootId(10), 1),
        ]));
        assert_eq!(
            p.lines().skip(1).collect::<Vec<_>>(),
            [
                "# TYPE lode_root_alarm_reads_total counter",
                "lode_root_alarm_reads_total{root=\"2\"} 7",
                "lode_root_alarm_reads_total{root=\"10\"} 1",
            ]
        );
    }
}

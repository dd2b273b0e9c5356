//! The agent's TOML configuration file and byte sizes written for people (`512MiB`).
//!
//! ```toml
//! state_dir = "/var/lib/lode/agent"   # attachment table, disk cache, overlays
//! store = "s3://images/prod"          # where chunks and manifests live
//! kms = "/etc/lode/keyring.json"      # the keyring (or key service) for image keys
//! control = "/run/lode/control.sock"  # the control API
//! files = "/run/lode/files"           # FUSE mount: one file per attachment; "" = none
//!
//! [nbd]
//! unix = "/run/lode/nbd.sock"
//! tcp = "127.0.0.1:10809"
//! max_connections = 64                # open at once, handshakes included
//! # max_connections_per_peer = 8      # from one IP (TCP) or user id (Unix); default: off
//! max_buffered_bytes = "4MiB"         # per connection: unread replies, write data
//! max_in_flight = 64                  # requests per connection at once
//! handshake_timeout_ms = 10000        # from connect to choosing an export
//!
//! [metrics]
//! listen = "127.0.0.1:9464"           # Prometheus text at http://ADDR/metrics
//!
//! [cache]
//! decrypted = "256MiB"                # decrypted segments in memory
//! memory = "512MiB"                   # ciphertext in memory
//! disk = "10GiB"                      # ciphertext on local disk
//! policy = "s3-fifo"                  # eviction in all three: lru, lru-2, s3-fifo, w-tinylfu
//!
//! [az]                                # the AZ cache fleet (memcached protocol)
//! nodes = ["10.0.1.5:11211", "10.0.2.5:11211", "10.0.3.5:11211",
//!          "10.0.1.6:11211", "10.0.2.6:11211", "10.0.3.6:11211"]
//! k = 4                               # data stripes; any k rebuild a chunk
//! m = 2                               # parity stripes
//! timeout_ms = 200                    # per node request
//! placement = "rendezvous"            # or "bounded": capped at (1 + epsilon) x mean
//! epsilon = 0.25                      # bounded placement's slack
//! hedge = "p95"                       # ask k nodes, more when one is late; "off", "all"
//!
//! [origin]
//! concurrency = 64                    # chunk fetches from the store at once
//!
//! [prefetch]
//! concurrency = 16                    # prefetch and readahead fetches at once
//! working_set = true                  # fetch an image's recorded working set at attach
//! readahead_max_chunks = 8            # largest readahead window; 0 = no readahead
//! record_window_ms = 10000            # how long after an attach its reads are recorded
//! record_max_chunks = 4096            # the most chunks one recording keeps
//! ```
//!
//! Every key is optional; unknown keys are refused by name so a typo is not silently
//! ignored. Flags given on the command line win over the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::AgentError;

/// An eviction policy by name, as `[cache] policy` gives it.
pub use lode_read::PolicyKind;

/// Largest configuration file read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The configuration file, as written.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Object store URL or directory.
    pub store: Option<String>,
    /// Key service (keyring path).
    pub kms: Option<String>,
    /// Control socket.
    pub control: Option<PathBuf>,
    /// FUSE mount directory; an empty string turns the FUSE files off.
    pub files: Option<PathBuf>,
    /// NBD listeners.
    #[serde(default)]
    pub nbd: NbdSection,
    /// Metrics listener.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Cache sizes.
    #[serde(default)]
    pub cache: CacheSection,
    /// The AZ cache fleet.
    pub az: Option<AzSection>,
    /// The origin store.
    #[serde(default)]
    pub origin: OriginSection,
    /// Prefetch, readahead and working-set recording.
    #[serde(default)]
    pub prefetch: PrefetchSection,
    /// The control service this agent works for, if any.
    pub worker: Option<WorkerSection>,
}

/// `[worker]`: run as a worker of a control service (`lode control`), which sends the
/// attach orders and grants the image keys; the agent then opens no KMS.
///
/// ```toml
/// [worker]
/// control = "https://control.internal:7443"  # or "unix:/run/lode/control-api.sock"
/// credentials = "/etc/lode/pki"             # worker-<id>.pem/.key and the fleet's CA
/// id = "worker-1"                           # must match its certificate
/// listen = "0.0.0.0:7444"                   # attach orders (mTLS, control replicas only)
/// advertise = "10.0.1.5:7444"               # the address registered [default: listen's]
/// capacity = 32                             # images attached at once
/// ```
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    /// The control service's endpoint: `https://host:port` or `unix:/path`.
    pub control: Option<String>,
    /// The directory of this worker's certificate and key and the fleet's CA.
    pub credentials: Option<PathBuf>,
    /// The worker's id.
    pub id: Option<String>,
    /// Where attach orders are taken.
    pub listen: Option<SocketAddr>,
    /// The address registered with the control service.
    pub advertise: Option<String>,
    /// Images attached at once, at most.
    pub capacity: Option<u32>,
}

/// `[az]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzSection {
    /// `host:port` of every node; every worker must list the same nodes.
    pub nodes: Vec<String>,
    /// Data stripes.
    pub k: Option<usize>,
    /// Parity stripes.
    pub m: Option<usize>,
    /// Per-node request timeout.
    pub timeout_ms: Option<u64>,
    /// Placement: `rendezvous` or `bounded`.
    pub placement: Option<lode_az::PlacementKind>,
    /// Bounded placement's ε.
    pub epsilon: Option<Float>,
    /// Which nodes a read asks: `p95`, `off` or `all`.
    pub hedge: Option<lode_az::Hedge>,
}

/// A float key, compared bit for bit so the sections stay `Eq`; its range is checked
/// where it is used.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(transparent)]
pub struct Float(pub f64);

impl PartialEq for Float {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Float {}

impl AzSection {
    /// The client configuration: these fields over the client's defaults.
    pub fn to_config(&self) -> lode_az::AzConfig {
        let mut c = lode_az::AzConfig::new(self.nodes.iter().cloned());
        if let Some(k) = self.k {
            c.k = k;
        }
        if let Some(m) = self.m {
            c.m = m;
        }
        if let Some(t) = self.timeout_ms {
            c.node_timeout = std::time::Duration::from_millis(t);
        }
        if let Some(p) = self.placement {
            c.placement = p;
        }
        if let Some(Float(e)) = self.epsilon {
            c.epsilon = e;
        }
        if let Some(h) = self.hedge {
            c.hedge = h;
        }
        c
    }
}

/// `[origin]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginSection {
    /// Chunk fetches from the store at once.
    pub concurrency: Option<usize>,
}

/// `[prefetch]`: what [`lode_read::PrefetchConfig`] says; keys left out keep its
/// defaults.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchSection {
    /// Prefetch and readahead fetches at once, over all attachments.
    pub concurrency: Option<usize>,
    /// Whether attaching fetches the recorded working set.
    pub working_set: Option<bool>,
    /// The largest readahead window, in chunks (0: none).
    pub readahead_max_chunks: Option<u64>,
    /// How long after an attach its reads are recorded, in milliseconds.
    pub record_window_ms: Option<u64>,
    /// The most chunks one recording keeps.
    pub record_max_chunks: Option<usize>,
}

impl PrefetchSection {
    /// Sets what the section gives in `c`.
    pub fn apply(&self, c: &mut lode_read::PrefetchConfig) {
        if let Some(n) = self.concurrency {
            c.concurrency = n;
        }
        if let Some(b) = self.working_set {
            c.working_set = b;
        }
        if let Some(n) = self.readahead_max_chunks {
            c.readahead_max_chunks = n;
        }
        if let Some(ms) = self.record_window_ms {
            c.record_window = std::time::Duration::from_millis(ms);
        }
        if let Some(n) = self.record_max_chunks {
            c.record_max_chunks = n;
        }
    }
}

/// `[nbd]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdSection {
    /// Unix socket path.
    pub unix: Option<PathBuf>,
    /// TCP address.
    pub tcp: Option<SocketAddr>,
    /// Connections open at once, over both listeners, handshakes included.
    pub max_connections: Option<usize>,
    /// Connections open at once from one IP address (TCP) or user id (Unix socket).
    pub max_connections_per_peer: Option<usize>,
    /// Payload bytes one connection may hold (replies its client has not read, write
    /// data being served); also the largest request it may make.
    #[serde(default, deserialize_with = "size_opt")]
    pub max_buffered_bytes: Option<u64>,
    /// Requests one connection may have in flight.
    pub max_in_flight: Option<usize>,
    /// Time from connecting to choosing an export, in milliseconds.
    pub handshake_timeout_ms: Option<u64>,
}

impl NbdSection {
    /// The limits these fields set over `limits`.
    pub fn apply(&self, limits: &mut crate::NbdLimits) {
        if let Some(n) = self.max_connections {
            limits.max_connections = n;
        }
        if let Some(n) = self.max_connections_per_peer {
            limits.max_connections_per_peer = Some(n);
        }
        if let Some(n) = self.max_buffered_bytes {
            limits.max_buffered_bytes = n;
        }
        if let Some(n) = self.max_in_flight {
            limits.max_in_flight = n;
        }
        if let Some(ms) = self.handshake_timeout_ms {
            limits.handshake_timeout = std::time::Duration::from_millis(ms);
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// TCP address serving `/metrics`.
    pub listen: Option<SocketAddr>,
}

/// `[cache]`: the local tiers' sizes, in bytes, and their eviction policy.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// The eviction policy of the decrypted, memory and disk tiers.
    #[serde(default, deserialize_with = "policy_opt")]
    pub policy: Option<PolicyKind>,
    /// Decrypted chunks in memory.
    #[serde(default, deserialize_with = "size_opt")]
    pub decrypted: Option<u64>,
    /// Ciphertext in memory.
    #[serde(default, deserialize_with = "size_opt")]
    pub memory: Option<u64>,
    /// Ciphertext on disk.
    #[serde(default, deserialize_with = "size_opt")]
    pub disk: Option<u64>,
}

impl ConfigFile {
    /// Parses configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, AgentError> {
        toml::from_str(text).map_err(|e| {
            AgentError::Config(format!(
                "{}: {}",
                origin.display(),
                e.to_string().trim_end()
            ))
        })
    }

    /// Reads and parses the file at `path`.
    pub fn read(path: &Path) -> Result<Self, AgentError> {
        use std::io::Read;
        let f = std::fs::File::open(path).map_err(crate::error::io("opening", path))?;
        let mut text = String::new();
        f.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(crate::error::io("reading", path))?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(AgentError::Config(format!(
                "{}: larger than {MAX_CONFIG_BYTES} bytes",
                path.display()
            )));
        }
        Self::parse(&text, path)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

fn size_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match RawSize::deserialize(d)? {
        RawSize::Bytes(n) => Ok(Some(n)),
        RawSize::Text(s) => parse_size(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

fn policy_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PolicyKind>, D::Error> {
    String::deserialize(d)?
        .parse()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Parses a byte count: a number, optionally followed by `K`, `M`, `G` or `T` (with or
/// without `iB`/`B`; all powers of 1024), e.g. `4096`, `512MiB`, `10G`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    if num.is_empty() {
        return Err(format!(
            "{text:?} is not a size (a number of bytes, optionally with K, M, G or T, e.g. 512MiB)"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is too large a size"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use K, M, G or T, powers of 1024)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large a size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size(" 3 kb "), Ok(3 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("").unwrap_err().contains("not a size"));
        assert!(parse_size("MiB").unwrap_err().contains("not a size"));
        assert!(
            parse_size("5 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(
            parse_size("99999999999T")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_size("99999999999999999999999")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn the_documented_example_parses() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start()))
            .collect();
        let c = ConfigFile::parse(&example, Path::new("example.toml")).unwrap();
        assert_eq!(c.state_dir, Some(PathBuf::from("/var/lib/lode/agent")));
        assert_eq!(c.store.as_deref(), Some("s3://images/prod"));
        assert_eq!(c.nbd.tcp, Some("127.0.0.1:10809".parse().unwrap()));
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.cache.decrypted, Some(256 << 20));
        assert_eq!(c.cache.memory, Some(512 << 20));
        assert_eq!(c.cache.disk, Some(10 << 30));
        assert_eq!(c.cache.policy, Some(lode_read::PolicyKind::default()));
        assert_eq!(c.files, Some(PathBuf::from("/run/lode/files")));
        let az = c.az.expect("[az]").to_config();
        assert_eq!((az.nodes.len(), az.k, az.m), (6, 4, 2));
        assert_eq!(az.node_timeout, std::time::Duration::from_millis(200));
        let defaults = lode_az::AzConfig::default();
        assert_eq!(
            (az.placement, az.epsilon, az.hedge),
            (defaults.placement, defaults.epsilon, defaults.hedge),
            "the example shows the AZ defaults"
        );
        assert_eq!(c.origin.concurrency, Some(64));
        let mut prefetch = lode_read::PrefetchConfig::default();
        c.prefetch.apply(&mut prefetch);
        assert_eq!(
            prefetch,
            lode_read::PrefetchConfig::default(),
            "the example shows the prefetch defaults"
        );
        let mut nbd = crate::NbdLimits::default();
        c.nbd.apply(&mut nbd);
        assert_eq!(
            nbd,
            crate::NbdLimits::default(),
            "the example shows the defaults"
        );
    }

    #[test]
    fn the_az_placement_and_hedging_keys_parse() {
        let text =
            "[az]\nnodes = [\"a:1\"]\nplacement = \"bounded\"\nepsilon = 0.1\nhedge = \"all\"\n";
        let az = ConfigFile::parse(text, Path::new("a.toml"))
            .unwrap()
            .az
            .expect("[az]")
            .to_config();
        assert_eq!(
            (az.placement, az.epsilon, az.hedge),
            (lode_az::PlacementKind::Bounded, 0.1, lode_az::Hedge::All)
        );
        let bad = "[az]\nnodes = [\"a:1\"]\nhedge = \"fast\"\n";
        let e = ConfigFile::parse(bad, Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a.toml") && e.contains("hedge") && e.contains("unknown variant `fast`"),
            "{e}"
        );
    }

    #[test]
    fn the_worker_section_parses() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("/// ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("/// ```"))
            .map(|l| format!("{}\n", l.trim_start_matches("///").trim_start()))
            .collect();
        let c = ConfigFile::parse(&example, Path::new("example.toml")).unwrap();
        let w = c.worker.expect("[worker]");
        assert_eq!(w.control.as_deref(), Some("https://control.internal:7443"));
        assert_eq!(w.credentials, Some(PathBuf::from("/etc/lode/pki")));
        assert_eq!(w.id.as_deref(), Some("worker-1"));
        assert_eq!(w.listen, Some("0.0.0.0:7444".parse().unwrap()));
        assert_eq!(w.advertise.as_deref(), Some("10.0.1.5:7444"));
        assert_eq!(w.capacity, Some(32));
        let e = ConfigFile::parse("[worker]\nkeyring = \"/x\"\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("keyring"), "{e}");
    }

    #[test]
    fn mistakes_are_named() {
        let p = Path::new("/etc/lode/agent.toml");
        let e = ConfigFile::parse("stat_dir = \"/x\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/lode/agent.toml") && e.contains("stat_dir"),
            "{e}"
        );
        let e = ConfigFile::parse("[cache]\nmemory = \"lots\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lots") && e.contains("not a size"), "{e}");
        let e = ConfigFile::parse("[cache]\ndisk = \"1GiB\"\npolicy = \"lfu\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("policy = \"lfu\"") && e.contains("unknown eviction policy \"lfu\": expected one of lru, lru-2, s3-fifo, w-tinylfu"),
            "{e}"
        );
        for &kind in lode_read::PolicyKind::ALL {
            let text = format!("[cache]\npolicy = \"{kind}\"\n");
            assert_eq!(
                ConfigFile::parse(&text, p).unwrap().cache.policy,
                Some(kind)
            );
        }
        let e = ConfigFile::parse("[nbd]\ntcp = \"localhost\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tcp"), "{e}");
        let e = ConfigFile::parse("[nbd]\nmax_connection = 5\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_connection"), "{e}");
        let e = ConfigFile::parse("[nbd]\nmax_buffered_bytes = \"big\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_buffered_bytes") && e.contains("not a size"),
            "{e}"
        );
        let mut nbd = crate::NbdLimits::default();
        ConfigFile::parse("[nbd]\nmax_connections_per_peer = 8\n", p)
            .unwrap()
            .nbd
            .apply(&mut nbd);
        assert_eq!(nbd.max_connections_per_peer, Some(8));
        assert_eq!(
            ConfigFile::parse("", p).unwrap(),
            ConfigFile::default(),
            "an empty file is all defaults"
        );
        assert_eq!(
            ConfigFile::parse("[cache]\ndisk = 1048576\n", p)
                .unwrap()
                .cache
                .disk,
            Some(1 << 20)
        );
    }
}

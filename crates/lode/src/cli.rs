//! Command-line syntax. Every flag that names a store or a key also reads an environment
//! variable, so a platform can set them once.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use lode_format::ChunkSize;

/// lode loads container images and microVM snapshots on demand.
///
/// Images are cut into 512 KiB chunks, convergently encrypted (identical chunks are
/// stored once across every image, while stores hold only ciphertext) and kept in an
/// object store: a local directory by default, or S3.
///
/// Data lives under $LODE_HOME (default ~/.local/share/lode): the store in `store/`, the
/// keyring that wraps every image's keys in `keyring.json` (mode 0600, created on first
/// use; lose it and the images cannot be decrypted).
#[derive(Debug, Parser)]
#[command(name = "lode", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// Object store: a directory, file:///dir, or s3://bucket/prefix (endpoint and
    /// credentials from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY). [default: $LODE_HOME/store]
    #[arg(long, global = true, env = "LODE_STORE", value_name = "STORE")]
    pub store: Option<String>,

    /// Key service: the path of a keyring file, or aws:KEY_ID_OR_ARN for AWS KMS
    /// (region, endpoint and credentials from AWS_REGION, AWS_ENDPOINT_URL,
    /// AWS_ACCESS_KEY_ID, …). [default: $LODE_HOME/keyring.json]
    #[arg(long, global = true, env = "LODE_KMS", value_name = "KMS")]
    pub kms: Option<String>,

    /// The KMS key that wraps new images' keys. [default: the keyring's default key, or
    /// the key of aws:KEY]
    #[arg(long, global = true, env = "LODE_KMS_KEY", value_name = "NAME")]
    pub kms_key: Option<String>,

    /// Print results as JSON on stdout (and no progress bars).
    #[arg(long, global = true)]
    pub json: bool,

    /// No progress bars.
    #[arg(long, short, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Import a raw disk image (ext4 or any block image) into the store.
    ///
    /// The file is cut into chunks; all-zero chunks are not stored; the rest are
    /// sealed and uploaded only if the store lacks them. Prints the manifest id.
    #[command(after_help = "Example:\n  lode import rootfs.ext4 --tag myapp:1.0")]
    Import(ImportArgs),

    /// Flatten an OCI image into a deterministic ext4 image and publish it.
    ///
    /// SOURCE is `oci:DIR[:TAG]` (an OCI image layout, as skopeo and umoci write),
    /// `docker-archive:FILE` (as `docker save` writes) or `docker://HOST/REPO[:TAG]` (a
    /// registry; plain HTTP only to loopback; credentials from LODE_REGISTRY_USER and
    /// LODE_REGISTRY_PASSWORD, or LODE_REGISTRY_TOKEN; pulled blobs are kept under
    /// $LODE_HOME/cache/registry). Layers are applied with OCI
    /// semantics (whiteouts, opaque directories, hardlinks) onto one ext4 filesystem in
    /// which each layer's files sit in their own chunk-aligned region, so images that
    /// share a base layer share its chunks. Prints the manifest id and what deduplicated.
    #[command(
        after_help = "Examples:\n  lode flatten oci:./layout:latest --tag myapp:1.0\n  \
                            lode flatten docker-archive:app.tar --tag myapp:1.0"
    )]
    Flatten(FlattenArgs),

    /// Rebuild an image file byte for byte from the store.
    ///
    /// Every chunk is checked against its name and its key before it is written; the
    /// output appears under OUT only when complete.
    #[command(after_help = "Example:\n  lode export myapp:1.0 rootfs.ext4")]
    Export(ExportArgs),

    /// Print a manifest as JSON (never its keys), and whether the image has a recorded
    /// working set (`working_set`: its entries and bytes, or null).
    Inspect(ImageArg),

    /// An image's recorded working set: the chunks its first start read, which later
    /// starts fetch ahead of demand (docs/agent.md).
    #[command(subcommand)]
    Prefetch(PrefetchCommand),

    /// Check that every chunk of an image is present, matches its name and decrypts.
    ///
    /// Reports every fault, not just the first; exits 2 if there is any.
    Verify(VerifyArgs),

    /// Remove a tag, every tag of a manifest, or (--manifest) a manifest nothing holds.
    ///
    /// `lode rm TAG` removes the tag; `lode rm ID` removes every tag naming the manifest.
    /// Neither removes the manifest or its chunks. `lode rm --manifest ID` removes a
    /// manifest no tag names and no pin holds (it is refused, naming them, otherwise);
    /// its chunks stay until their root is collected. See docs/gc.md.
    #[command(after_help = "Examples:\n  lode rm myapp:1.0\n  lode rm --manifest 3f5a…")]
    Rm(RmArgs),

    /// Keep a manifest live without a tag (for images a platform must not lose).
    Pin(ImageArg),

    /// Remove the pin `lode pin` put on a manifest (its tags, if any, still hold it).
    Unpin(ImageArg),

    /// The store's roots: list them, rotate the active one (docs/gc.md).
    #[command(subcommand)]
    Root(RootCommand),

    /// Take every root as far along its life as is safe, and say what each waits for.
    ///
    /// A retired root has its live manifests copied forward and is expired; an expired
    /// root whose grace period has passed with no read alarm, and in which nothing is
    /// live, is deleted (every object but its record and forwarding records). Every
    /// step is a conditional write and can be interrupted: run again, it carries on. A
    /// root that cannot move is reported, nothing of it is deleted, and the others go
    /// on; the exit status is then 2.
    #[command(
        after_help = "Examples:\n  lode gc --dry-run\n  lode root rotate && lode gc --grace 7d\n  \
                            lode --json gc | jq .reclaimed_bytes"
    )]
    Gc(GcArgs),

    /// Store-wide figures, tags, and a consistency check (fsck).
    #[command(subcommand)]
    Store(StoreCommand),

    /// Manage the local keyring.
    #[command(subcommand)]
    Kms(KmsCommand),

    /// Show what lode does, end to end, on a generated image (no outside services).
    Demo(DemoArgs),

    /// Run the worker agent in the foreground until SIGINT or SIGTERM.
    ///
    /// Attached images are served over NBD (a Unix socket, and TCP if asked) and read
    /// lazily through one verified chunk cache (memory, then disk under the state
    /// directory, then the store). Attachments are kept in the state directory and come
    /// back when the agent restarts. The control socket takes HTTP/1.1 with JSON bodies.
    #[command(
        after_help = "Example:\n  lode agent &\n  lode attach myapp:1.0 --name app\n  \
                            nbdcopy 'nbd+unix:///app?socket='$LODE_HOME/agent/nbd.sock out.img"
    )]
    Agent(Box<AgentArgs>),

    /// The assignment service: its certificates, the service itself, its state.
    ///
    /// `lode control` is the control plane of a fleet: workers register and heartbeat,
    /// `lode start` places an image on a worker (one with it warm first, else by
    /// consistent hashing with bounded load) under a lease, and the service, the only
    /// process with KMS access, hands an image's data key only to the worker it is
    /// assigned to while the lease lasts. Its state lives in the store (--store), so it
    /// survives restarts and replicas over one store share it.
    #[command(
        subcommand,
        after_help = "A fleet in four steps:\n  \
                      lode control init --dir ca --host control.internal\n  \
                      lode control issue --dir ca --worker w1 --host w1.internal\n  \
                      lode control issue --dir ca --admin ops\n  \
                      lode control serve --listen 0.0.0.0:7443 --creds ca --store s3://bucket/lode\n\
                      then, from an operator's machine:\n  \
                      lode start myapp:1.0 --control https://control.internal:7443 --creds ca --as ops"
    )]
    Control(ControlCommand),

    /// Start an image on the fleet: the control service places it on a worker.
    ///
    /// Prints the start's id, the worker, the manifest, how it was placed and where the
    /// image appears on the worker (its NBD export or its file). Needs an admin
    /// certificate (`lode control issue --admin NAME`).
    #[command(
        after_help = "Example:\n  lode start myapp:1.0 --control https://control.internal:7443 --creds ca --as ops"
    )]
    Start(StartArgs),

    /// Attach an image to the running agent (served as the NBD export NAME).
    Attach(AttachArgs),

    /// Detach an image from the running agent (its overlay is deleted unless kept).
    Detach(DetachArgs),

    /// List the running agent's attachments.
    Ls(ControlArg),

    /// The running agent's cache and read figures.
    Stats(ControlArg),

    /// Mount an image's ext4 on a directory, lazily loaded through the running agent.
    ///
    /// Attaches the image, sets up a loop device on its file in the agent's FUSE mount
    /// and mounts it. Read-only unless --rw, which sends writes into an overlay (the
    /// store is never written). The mount is nosuid,nodev: setuid bits, file
    /// capabilities and device nodes of the image do nothing (see
    /// --allow-setuid-and-devices). Needs root. `lode umount DIR` undoes it all.
    #[command(
        after_help = "Example:\n  lode mount python:3.11 /mnt/py && ls /mnt/py/usr/bin\n  lode umount /mnt/py"
    )]
    Mount(MountArgs),

    /// Unmount what `lode mount` mounted: unmount, release the loop device, detach.
    Umount(UmountArgs),

    /// Run an AZ cache node: the memcached text protocol over memory and flash tiers.
    ///
    /// Workers (`lode agent --az-node ADDR ...`) keep erasure-coded stripes of chunks on a
    /// fleet of these; plain memcached servers work too. Hot items stay in memory (a
    /// tenth of the capacity by default), the rest on flash (files in --flash-dir); both
    /// evict by LRU-K (K = 2), so a one-off scan does not flush the hot set. Runs until
    /// SIGINT or SIGTERM.
    #[command(
        name = "cache-node",
        after_help = "Example:\n  lode cache-node --listen 0.0.0.0:11211 --flash-dir /var/cache/lode --flash-size 100G"
    )]
    CacheNode(CacheNodeArgs),

    /// Run a command inside an image, lazily loaded: mount, run, clean up.
    ///
    /// The command runs with the image config's environment, working directory and
    /// user (names looked up inside the image), in a writable overlay that is dropped
    /// afterwards. With crun on PATH it runs in a container from a generated OCI bundle
    /// (own pid, mount, ipc and uts namespaces, a private /dev, no CAP_MKNOD); otherwise
    /// chrooted, with a read-only /proc and a private /dev mounted, which shares the
    /// host's pids, network and IPC (docs/run.md). The image is mounted nosuid,nodev.
    /// Exits with the command's status; a SIGTERM, SIGINT or SIGHUP before the command
    /// starts undoes the mount and exits 128 + the signal. Needs root and a running agent.
    /// With --json, an object with the exit status and the time of each step follows the
    /// command's own output on stdout; --timings prints those times on stderr.
    #[command(
        after_help = "Example:\n  lode run python -- python3 -c 'import json; print(json.dumps([1]))'"
    )]
    Run(RunArgs),

    /// Memory snapshots: store them, serve their page faults, restore them lazily.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),

    /// MicroVMs booted from an image the agent serves.
    #[command(subcommand)]
    Vm(VmCommand),

    /// Predict a fleet's snapshot burst capacity: how many clones of one memory snapshot
    /// its workers can restore at once within a first-answer goal, from lode-snap's burst
    /// bench; prints the clones per worker, the fleet's capacity, and for a burst of N
    /// sessions the workers it spreads over, the first-answer times and the origin's load
    /// (docs/scale.md, "Snapshot bursts").
    #[command(
        name = "sim-burst",
        after_help = "Example:\n  BURSTS=1,8,32 cargo bench -p lode-snap --bench burst > burst.jsonl\n  lode sim-burst --measured burst.jsonl --workers 100 --goal p99=300ms --sessions 1000..10000/1000"
    )]
    SimBurst(Box<crate::simburst::SimBurstArgs>),

    /// Simulate a fleet: workers' local tiers, the AZ cache and the origin under a
    /// synthetic Zipf workload or recorded traces; prints hit rates, origin load, AZ node
    /// load and start latency percentiles (docs/scale.md).
    #[command(
        after_help = "Example:\n  lode sim --workers 10000 --rate 15000 --duration 1h\n  lode sim --trace w1.trace --trace w2.trace --calibration calibration.json"
    )]
    Sim(Box<crate::sim::SimArgs>),

    /// Size the tiers (worker memory, worker disk, the AZ fleet's memory) for a workload
    /// at given prices: the five-minute rule's size, the size a latency goal needs, and
    /// what the simulator predicts at the larger (docs/scale.md).
    #[command(
        after_help = "Example:\n  lode advise --workers 100 --rate 200 --memory-price 0.005 --flash-price 0.0002 \\\n    --origin-request-price 0.0004 --origin-gib-price 0.02 --latency-goal p99=300ms"
    )]
    Advise(Box<crate::sim::AdviseArgs>),
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a QEMU machine whose root disk is an image, run a command in it, exit with its
    /// status.
    ///
    /// Attaches the image through the running agent and hands QEMU the attachment as a
    /// virtio disk: the agent's FUSE file of it (--via file), or its NBD export over the
    /// agent's Unix socket (--via nbd). The guest boots Debian's cloud kernel with an
    /// initramfs lode writes itself (busybox-static, the kernel's virtio modules, an
    /// init), mounts the image's ext4 as its root (read-only unless --rw, whose writes go
    /// to the attachment's overlay), applies the image config (env, working directory,
    /// user looked up in the image) and runs the command; its output comes to stdout.
    /// The machine has no network. Detaches afterwards unless --keep. Needs a running
    /// agent, QEMU (qemu-system-x86) and a kernel (linux-image-cloud-amd64); see
    /// docs/vm.md.
    #[command(
        after_help = "Examples:\n  lode vm run python -- python3 -c 'print(1)'\n  \
                      lode vm run --via nbd --timings busybox -- sh -c 'echo hi; exit 7'"
    )]
    Run(VmRunArgs),
}

/// How the guest reaches the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// The agent's FUSE file of the attachment.
    File,
    /// The attachment's NBD export on the agent's Unix socket.
    Nbd,
}

/// The accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelArg {
    /// KVM if /dev/kvm opens and the CPU shows vmx or svm, else TCG.
    Auto,
    /// KVM.
    Kvm,
    /// TCG (QEMU's binary translation).
    Tcg,
}

#[derive(Debug, Args)]
pub struct VmRunArgs {
    /// A tag, or a manifest id (64 hex digits).
    #[arg(required_unless_present = "attachment")]
    pub image: Option<String>,
    /// The command and its arguments. [default: the image's entrypoint and cmd]
    #[arg(last = true)]
    pub command: Vec<String>,
    /// How QEMU reads the image.
    #[arg(long, value_enum, default_value_t = Via::File)]
    pub via: Via,
    /// Mount the image read-write: the guest's writes go to the attachment's overlay.
    #[arg(long)]
    pub rw: bool,
    /// The attachment's name. [default: vm- and a random suffix]
    #[arg(long)]
    pub name: Option<String>,
    /// Leave the attachment (and a --rw run's overlay) in place after the run.
    #[arg(long)]
    pub keep: bool,
    /// Run on this existing attachment instead of attaching IMAGE (it stays attached).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["image", "name", "keep"])]
    pub attachment: Option<String>,
    /// Extra environment, KEY=VALUE (repeatable; wins over the image's).
    #[arg(long, short, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Run as this user[:group] instead of the image's (names looked up in the image).
    #[arg(long, short)]
    pub user: Option<String>,
    /// QEMU's machine type: pc, or microvm (virtio-mmio; needs the kernel's virtio_mmio).
    #[arg(long, default_value = "pc", value_parser = ["pc", "microvm"])]
    pub machine: String,
    /// The accelerator.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 512, value_name = "MIB", value_parser = clap::value_parser!(u32).range(64..=65536))]
    pub memory: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: u32,
    /// Kill the VM after this many seconds.
    #[arg(long, default_value_t = 600, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// The guest kernel. [default: the newest /boot/vmlinuz-*-cloud-amd64]
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// The kernel's modules directory. [default: /lib/modules/VERSION of the kernel]
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,
    /// A statically linked busybox for the initramfs.
    #[arg(long, value_name = "FILE", default_value = "/bin/busybox")]
    pub busybox: PathBuf,
    /// The QEMU executable.
    #[arg(long, value_name = "FILE", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// The agent's NBD socket, for --via nbd with --attachment. [default: nbd.sock beside
    /// the control socket]
    #[arg(long, value_name = "PATH")]
    pub nbd_socket: Option<PathBuf>,
    /// Print a line of timings and the share of the image fetched on stderr.
    #[arg(long)]
    pub timings: bool,
    #[command(flatten)]
    pub control: ControlArg,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Store a memory image (a Firecracker memory file or any raw memory dump).
    ///
    /// Like `lode import`, with a chunk size suited to memory (64 KiB: restores read
    /// scattered pages, so a smaller fetch unit wastes less; docs/snapshots.md has the
    /// measurement). All-zero chunks are not stored and are served as zero pages.
    #[command(after_help = "Example:\n  lode snapshot import vm.mem --tag fn-hello:v3")]
    Import(SnapshotImportArgs),

    /// Serve a snapshot's page faults: Firecracker's UFFD handler protocol on a socket.
    ///
    /// Listens on --socket for a VMM, which sends its userfaultfd (SCM_RIGHTS) with the
    /// guest memory regions as JSON (base_host_virt_addr, size, offset, page_size). Each
    /// connection is one restore: faults are served from the worker's tiers (memory, disk
    /// under STATE_DIR/cache, the AZ fleet, the store), a fault waiting only for its
    /// page's segment (16 KiB of a new chunk; a v1 chunk whole); zero chunks and
    /// ballooned-out pages as zero pages. The first restore's faults are stored
    /// as the snapshot's working set and installed ahead of demand by later restores.
    /// Each restore gets a fresh 128-bit generation id (printed, sent on the socket, and
    /// written into guest memory at --generation-id-offset). Runs until SIGINT/SIGTERM.
    #[command(
        after_help = "Example:\n  lode snapshot serve fn-hello:v3 --socket /run/fc-uffd.sock &\n  \
        # Firecracker: PUT /snapshot/load with mem_backend {\"backend_type\": \"Uffd\", \
        \"backend_path\": \"/run/fc-uffd.sock\"}"
    )]
    Serve(SnapshotServeArgs),

    /// Restore memory from a handler and run a workload on it (plays Firecracker's part).
    ///
    /// Maps anonymous memory, creates a userfaultfd, registers the memory, connects to
    /// the handler's socket and sends the descriptor with the regions as JSON, exactly as
    /// Firecracker does; then runs --workload on the restored memory. If the handler goes
    /// away, says so and exits 3 (a faulting thread would otherwise wait for ever).
    #[command(
        after_help = "Example:\n  lode snapshot demo-image idx.mem --size 256MiB\n  \
        lode snapshot import idx.mem --tag idx\n  lode snapshot serve idx --socket /tmp/uffd.sock &\n  \
        lode snapshot restore --socket /tmp/uffd.sock --size 256MiB --workload index"
    )]
    Restore(SnapshotRestoreArgs),

    /// Write a memory image holding an in-memory key-value index (for restore demos).
    DemoImage(SnapshotDemoArgs),

    /// Describe a stored snapshot: size, chunks, zero chunks, working-set record.
    Info(ImageArg),
}

#[derive(Debug, Args)]
pub struct SnapshotImportArgs {
    /// The memory file.
    pub file: PathBuf,
    /// Point this tag at the new manifest.
    #[arg(long, short)]
    pub tag: Option<String>,
    /// Chunk size in bytes: a power of two from 4096 to 67108864.
    #[arg(long, default_value_t = lode_format::ChunkSize::new(u64::from(lode_snap::DEFAULT_CHUNK_SIZE)).unwrap_or_default(), value_parser = parse_chunk_size)]
    pub chunk_size: ChunkSize,
    #[command(flatten)]
    pub put_only: PutOnlyArg,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PrefetchArg {
    /// The stored working set, in fault order.
    Recorded,
    /// Nothing; every page on demand.
    None,
    /// Every chunk (eager).
    All,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum RecordArg {
    /// When the snapshot has no record yet.
    Auto,
    /// After every restore.
    Always,
    /// Never.
    Never,
}

#[derive(Debug, Args)]
pub struct SnapshotServeArgs {
    /// The snapshot: a tag or manifest id.
    pub snapshot: String,
    /// The Unix socket to listen on (a stale socket file is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// A TOML configuration file, as for `lode agent` (its cache, az, origin, store and
    /// kms settings apply); flags win over it.
    #[arg(long, env = "LODE_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to install ahead of demand.
    #[arg(long, value_enum, default_value_t = PrefetchArg::Recorded)]
    pub prefetch: PrefetchArg,
    /// When to store a restore's faulted pages as the working set.
    #[arg(long, value_enum, default_value_t = RecordArg::Auto)]
    pub record: RecordArg,
    /// Chunks prefetched at once.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub prefetch_concurrency: usize,
    /// Write each restore's 16-byte generation id into guest memory at this snapshot
    /// offset (16-aligned), where restored code can read it (`demo-image` keeps a slot at
    /// 64).
    #[arg(long, value_name = "OFFSET")]
    pub generation_id_offset: Option<u64>,
    /// Restores served at once; a VMM connecting past this is refused with the reason
    /// (each restore holds a few bits per page of the snapshot and a word per page it
    /// faults; the cache is shared).
    #[arg(long, default_value_t = lode_snap::handler::DEFAULT_MAX_SESSIONS, value_name = "N")]
    pub max_sessions: usize,
    /// Exit after one restore (its report is the output).
    #[arg(long)]
    pub once: bool,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadArg {
    /// Query the index `demo-image` wrote, checking every answer.
    Index,
    /// Compare every page with --against (a local copy of the snapshot).
    Verify,
    /// Nothing: restore, report, wait for --hold, exit.
    None,
}

#[derive(Debug, Args)]
pub struct SnapshotRestoreArgs {
    /// The handler's socket.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Guest memory size (the snapshot's size), e.g. 256MiB.
    #[arg(long, value_name = "SIZE", value_parser = lode_agent::config::parse_size)]
    pub size: u64,
    /// Split the memory into this many regions (Firecracker sends one per guest memory
    /// region).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub regions: usize,
    /// What to run on the restored memory.
    #[arg(long, value_enum, default_value_t = WorkloadArg::Index)]
    pub workload: WorkloadArg,
    /// Index queries to run.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub queries: u64,
    /// Which keys the queries look up (the same seed touches the same pages).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub seed: u64,
    /// The snapshot file to compare with, for --workload verify.
    #[arg(long, value_name = "FILE")]
    pub against: Option<PathBuf>,
    /// Before verifying, read and then drop OFFSET:LEN (bytes; a balloon's madvise): it
    /// must read as zero afterwards. Repeatable.
    #[arg(long, value_name = "OFFSET:LEN")]
    pub remove: Vec<String>,
    /// Where the handler writes the generation id (checked by verify).
    #[arg(long, value_name = "OFFSET")]
    pub generation_id_offset: Option<u64>,
    /// Seconds to wait after the handshake before the workload.
    #[arg(long, default_value_t = 0.0, value_name = "SECS")]
    pub wait: f64,
    /// Seconds to keep the memory after the workload.
    #[arg(long, default_value_t = 0.0, value_name = "SECS")]
    pub hold: f64,
    /// Do not watch the handler's socket: if the handler dies, a fault blocks for ever,
    /// as it does in a VMM that does not watch (for demonstrating exactly that).
    #[arg(long)]
    pub no_watch: bool,
}

#[derive(Debug, Args)]
pub struct SnapshotDemoArgs {
    /// The memory file to write.
    pub file: PathBuf,
    /// Memory size, e.g. 256MiB.
    #[arg(long, default_value = "256MiB", value_parser = lode_agent::config::parse_size)]
    pub size: u64,
    /// Keys in the index. [default: enough to fill about half the memory]
    #[arg(long)]
    pub keys: Option<u64>,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// A tag, or a manifest id (64 hex digits).
    pub image: String,
    /// An existing empty directory.
    pub dir: PathBuf,
    /// Accept writes, into an overlay in the agent's state directory.
    #[arg(long)]
    pub rw: bool,
    /// The attachment's name. [default: mnt- and a hash of DIR]
    #[arg(long)]
    pub name: Option<String>,
    /// Kernel readahead of the loop device, KiB. [default: the kernel's]
    #[arg(long, value_name = "KIB")]
    pub readahead_kb: Option<u32>,
    /// UNSAFE for images you do not trust: mount the image without nosuid,nodev, so its
    /// setuid binaries, file capabilities and device nodes work (a setuid-root binary in
    /// it gives root to whoever runs it; a device node in it reads the host's devices).
    #[arg(long)]
    pub allow_setuid_and_devices: bool,
    #[command(flatten)]
    pub control: ControlArg,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    /// The directory `lode mount` mounted on.
    pub dir: PathBuf,
    /// Keep the overlay of a --rw mount instead of deleting it.
    #[arg(long)]
    pub keep_overlay: bool,
    #[command(flatten)]
    pub control: ControlArg,
}

#[derive(Debug, Args)]
pub struct CacheNodeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:11211", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// Bytes of the memory tier. [default: a tenth of memory + flash; 64MiB without flash]
    #[arg(long, value_name = "SIZE", value_parser = lode_agent::config::parse_size)]
    pub memory: Option<u64>,
    /// Directory of the flash tier (one file per item). Without it the node keeps items in
    /// memory only, like memcached.
    #[arg(long, value_name = "DIR")]
    pub flash_dir: Option<PathBuf>,
    /// Bytes of the flash tier.
    #[arg(long, value_name = "SIZE", default_value = "10GiB", value_parser = lode_agent::config::parse_size)]
    pub flash_size: u64,
    /// The largest value accepted (memcached's -I).
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = lode_agent::config::parse_size)]
    pub item_size_limit: u64,
    /// Eviction policy: lru-k (LRU-2) or lru.
    #[arg(long, default_value = "lru-k", value_parser = ["lru-k", "lru"])]
    pub policy: String,
}

/// How `lode run` isolates the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    /// crun if it is on PATH, else chroot.
    Auto,
    /// A container from a generated OCI bundle.
    Crun,
    /// chroot(2) with a read-only /proc and a private /dev mounted (not a container).
    Chroot,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A tag, or a manifest id (64 hex digits).
    pub image: String,
    /// The command and its arguments. [default: the image's entrypoint and cmd]
    #[arg(last = true)]
    pub command: Vec<String>,
    /// How to run it.
    #[arg(long, value_enum, default_value_t = Runtime::Auto)]
    pub runtime: Runtime,
    /// Extra environment, KEY=VALUE (repeatable; wins over the image's).
    #[arg(long, short, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Run as this user[:group] instead of the image's.
    #[arg(long, short)]
    pub user: Option<String>,
    /// Kernel readahead of the loop device, KiB. [default: the kernel's]
    #[arg(long, value_name = "KIB")]
    pub readahead_kb: Option<u32>,
    /// UNSAFE for images you do not trust: mount the image without nosuid,nodev, so its
    /// setuid binaries, file capabilities and device nodes work (a setuid-root binary in
    /// it gives root to whoever runs it; a device node in it reads the host's devices).
    #[arg(long)]
    pub allow_setuid_and_devices: bool,
    /// Print the time of each step (attach, FUSE file, loop device, mount, user lookup,
    /// runtime, unmount, loop release, detach) on stderr when the run ends.
    #[arg(long)]
    pub timings: bool,
    #[command(flatten)]
    pub control: ControlArg,
}

#[derive(Debug, Args)]
pub struct ControlArg {
    /// The agent's control socket. [default: $LODE_HOME/agent/control.sock]
    #[arg(long, env = "LODE_AGENT_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// A TOML configuration file (see docs/agent.md); flags given here win over it.
    #[arg(long, env = "LODE_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// NBD Unix socket. [default: STATE_DIR/nbd.sock]
    #[arg(long, value_name = "PATH")]
    pub nbd_unix: Option<PathBuf>,
    /// Also serve NBD on this TCP address (e.g. 127.0.0.1:10809).
    #[arg(long, value_name = "ADDR")]
    pub nbd_tcp: Option<std::net::SocketAddr>,
    /// Control socket. [default: STATE_DIR/control.sock]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// FUSE mount holding one file per attachment (for loop devices and VMMs).
    /// [default: STATE_DIR/files]
    #[arg(long, value_name = "DIR", conflicts_with = "no_files")]
    pub files: Option<PathBuf>,
    /// No FUSE mount (NBD only; `lode mount` and `lode run` then cannot work).
    #[arg(long)]
    pub no_files: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub prefetch: PrefetchArgs,
    #[command(flatten)]
    pub trace: TraceArgs,
}

/// Recording a read trace for `lode sim` and `lode advise` (docs/scale.md, "Traces").
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Record every attach, and each chunk's first read by it with the tier that served
    /// it, in FILE (created or truncated; the trace ends at a clean shutdown).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// The worker's name in the trace. [default: the worker id, else the host name]
    #[arg(long, value_name = "NAME", requires = "trace")]
    pub trace_worker: Option<String>,
    /// The trace file's bound, e.g. 1GiB: past it the trace ends and later events are
    /// dropped. [default: 1GiB]
    #[arg(long, value_name = "SIZE", value_parser = lode_agent::config::parse_size, requires = "trace")]
    pub trace_max_bytes: Option<u64>,
}

/// Fetching ahead of demand (the config file's `[prefetch]`; flags win).
#[derive(Debug, Args)]
pub struct PrefetchArgs {
    /// Prefetch and readahead fetches at once, over all attachments; at most half of
    /// --origin-concurrency, so demand fetches keep slots of their own. [default: 16]
    #[arg(long, value_name = "N")]
    pub prefetch_concurrency: Option<usize>,
    /// Do not fetch an image's recorded working set at attach (recording and readahead
    /// go on).
    #[arg(long)]
    pub no_prefetch: bool,
    /// The largest sequential readahead window, in chunks; 0 turns readahead off.
    /// [default: 8]
    #[arg(long, value_name = "CHUNKS")]
    pub readahead_max_chunks: Option<u64>,
    /// How long after an image's first attach its reads are recorded, in milliseconds
    /// (the recording also ends at 4096 chunks or at detach). [default: 10000]
    #[arg(long, value_name = "MS")]
    pub prefetch_record_window_ms: Option<u64>,
}

/// Running as a worker of a control service (`lode control`): the agent then takes
/// attach orders from it, gets each image's key as a grant for that start, and opens no
/// KMS (--kms and a config file's `kms` are refused).
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The control service: https://HOST:PORT or unix:/PATH. Makes this agent a worker.
    #[arg(long, env = "LODE_CONTROL_ENDPOINT", value_name = "URL")]
    pub control_endpoint: Option<String>,
    /// The directory holding this worker's certificate and key (`lode control issue`)
    /// and the fleet's CA.
    #[arg(long, value_name = "DIR")]
    pub credentials: Option<PathBuf>,
    /// This worker's id (its certificate's).
    #[arg(long, value_name = "ID")]
    pub worker_id: Option<String>,
    /// Where attach orders are taken (mTLS, control replicas only). [default: 127.0.0.1:0]
    #[arg(long, value_name = "ADDR")]
    pub orders_listen: Option<std::net::SocketAddr>,
    /// The address registered with the control service. [default: the one bound]
    #[arg(long, value_name = "HOST:PORT")]
    pub orders_advertise: Option<String>,
    /// Images attached at once, at most. [default: 16]
    #[arg(long, value_name = "N")]
    pub capacity: Option<u32>,
}

/// Where a worker keeps its cache and how big the cache's tiers are (the agent and the
/// snapshot handler share these flags and the config file's sections).
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// State directory (the disk cache is in STATE_DIR/cache). [default: $LODE_HOME/agent
    /// for the agent, $LODE_HOME/snap for the snapshot handler]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Decrypted chunks kept in memory (e.g. 256MiB). [default: 256MiB]
    #[arg(long, value_name = "SIZE", value_parser = lode_agent::config::parse_size)]
    pub cache_decrypted: Option<u64>,
    /// Ciphertext cached in memory. [default: 512MiB]
    #[arg(long, value_name = "SIZE", value_parser = lode_agent::config::parse_size)]
    pub cache_memory: Option<u64>,
    /// Ciphertext cached on local disk. [default: 10GiB]
    #[arg(long, value_name = "SIZE", value_parser = lode_agent::config::parse_size)]
    pub cache_disk: Option<u64>,
    /// How the decrypted, memory and disk caches evict: lru, lru-2, s3-fifo or
    /// w-tinylfu. [default: s3-fifo]
    #[arg(long, value_name = "POLICY")]
    pub cache_policy: Option<lode_agent::config::PolicyKind>,
    /// An AZ cache node, host:port (repeat for each node of the fleet; replaces the
    /// config file's list). Chunks are erasure-coded across the nodes.
    #[arg(long = "az-node", value_name = "ADDR")]
    pub az_nodes: Vec<String>,
    /// AZ data stripes per chunk (any k rebuild it). [default: 4]
    #[arg(long, value_name = "K")]
    pub az_k: Option<usize>,
    /// AZ parity stripes per chunk (nodes that may be lost). [default: 2]
    #[arg(long, value_name = "M")]
    pub az_m: Option<usize>,
    /// Chunk fetches from the origin store at once. [default: 64]
    #[arg(long, value_name = "N")]
    pub origin_concurrency: Option<usize>,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// A tag, or a manifest id (64 hex digits).
    pub image: String,
    /// The attachment's name (and NBD export name). [default: IMAGE]
    #[arg(long)]
    pub name: Option<String>,
    /// Accept writes, into an overlay file in the agent's state directory.
    #[arg(long)]
    pub rw: bool,
    #[command(flatten)]
    pub control: ControlArg,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// The attachment's name.
    pub name: String,
    /// Keep the overlay file instead of deleting it.
    #[arg(long)]
    pub keep_overlay: bool,
    #[command(flatten)]
    pub control: ControlArg,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The image file (or block device) to import.
    pub file: PathBuf,
    /// Point this tag (e.g. `myapp:1.0`) at the new manifest.
    #[arg(long, short)]
    pub tag: Option<String>,
    /// Chunk size in bytes: a power of two from 4096 to 67108864.
    #[arg(long, default_value = "524288", value_parser = parse_chunk_size)]
    pub chunk_size: ChunkSize,
    #[command(flatten)]
    pub put_only: PutOnlyArg,
}

#[derive(Debug, Args)]
pub struct FlattenArgs {
    /// `oci:DIR[:TAG]`, `docker-archive:FILE` or `docker://HOST/REPO[:TAG|@sha256:…]`.
    pub source: String,
    /// Point this tag at the new manifest.
    #[arg(long, short)]
    pub tag: Option<String>,
    /// Chunk size in bytes (also each layer region's alignment).
    #[arg(long, default_value = "524288", value_parser = parse_chunk_size)]
    pub chunk_size: ChunkSize,
    /// Also keep the ext4 image at this path.
    #[arg(long, value_name = "PATH")]
    pub keep_image: Option<PathBuf>,
    /// Scratch directory for the ext4 image while it is published. [default: $LODE_HOME/tmp]
    /// Scratch images left there by flattens that were killed are deleted first.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Slowest average rate a registry blob download may keep over any --pull-rate-window
    /// (bytes per second, e.g. 64KiB; 0 turns the check off). A registry that drips or
    /// stalls fails with the blob, the bytes received and the rate named.
    #[arg(
        long,
        env = "LODE_PULL_MIN_RATE",
        value_name = "SIZE",
        default_value = "64KiB",
        value_parser = lode_agent::config::parse_size
    )]
    pub pull_min_rate: u64,
    /// Window, in seconds, over which --pull-min-rate is averaged; token and manifest
    /// requests must finish within it plus 4 MiB at the minimum rate.
    #[arg(
        long,
        env = "LODE_PULL_RATE_WINDOW",
        value_name = "SECONDS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub pull_rate_window: u64,
    #[command(flatten)]
    pub put_only: PutOnlyArg,
}

/// How a publishing command may touch the store.
#[derive(Debug, Args)]
pub struct PutOnlyArg {
    /// Publish with put-only credentials (a flattener's; docs/policies/flattener.json):
    /// chunks and manifests are created by conditional puts that refuse an existing name
    /// (S3 `If-None-Match: *`), a name already there counts as stored, and no chunk or
    /// manifest is ever read or probed. Root records (wrapped salts only) are still read.
    /// Given up: the read-back that replaces a damaged chunk already in the store. Readers
    /// still detect damage (names are hashes; the AEAD tag fails), and `lode verify
    /// --repair` with read credentials removes it, so the next publish uploads it again.
    #[arg(
        long,
        env = "LODE_PUT_ONLY",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub put_only: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A tag, or a manifest id (64 hex digits).
    pub image: String,
    /// Where to write the image (a file, or a block device written in place).
    pub out: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum RootCommand {
    /// Each root: its state, stored bytes, live manifests, live and dead bytes, alarms.
    Ls,
    /// Retire the active root and make a new active root with a fresh salt.
    ///
    /// The salt is wrapped by the KMS key of --kms-key. Images published from now on
    /// go to the new root; the same plaintext gets new chunk keys and names there. The
    /// retired root stays readable. Every step is a conditional write: of racing
    /// rotations one wins and the others fail having changed nothing. Run again after
    /// an interrupted rotation, it finishes it.
    #[command(after_help = "Example:\n  lode root rotate && lode root ls")]
    Rotate,
    /// Copy every live manifest of a retired root into the active root.
    ///
    /// Each chunk is fetched, checked, decrypted and sealed again under the active
    /// root's salt (new keys, new names); a new manifest is written, the tags naming the
    /// old one are moved to it by compare-and-swap, a pin is moved, and a forwarding
    /// record tells a reader holding the old id where it went. Safe to interrupt: run
    /// again, it carries on. Deletes nothing.
    #[command(
        name = "copy-forward",
        after_help = "Example:\n  lode root rotate && lode root copy-forward 1"
    )]
    CopyForward {
        /// The retired root (its number, as `lode root ls` shows it).
        root: u32,
    },
    /// Clear the read alarms of an expired root, so that `lode gc` may delete it.
    ///
    /// An alarm means a reader (an agent, `lode export`…) read a manifest of the root
    /// after it expired: something still uses it. Find the reader the alarm names and
    /// move it to the image's new manifest (detach and attach by tag) before clearing.
    /// The grace period starts again from now.
    #[command(
        name = "clear-alarm",
        after_help = "Example:\n  lode root ls && lode root clear-alarm 1 && lode gc --dry-run"
    )]
    ClearAlarm {
        /// The expired root (its number, as `lode root ls` shows it).
        root: u32,
    },
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Only print what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long an expired root waits, with no read alarm, before it is deleted (a
    /// number with s, m, h or d). Make it longer than the longest an attachment stays
    /// on an image, so that every reader still on an old root raises its alarm first.
    #[arg(
        long,
        env = "LODE_GC_GRACE",
        value_name = "DURATION",
        default_value = "24h",
        value_parser = lode_image::parse_duration
    )]
    pub grace: std::time::Duration,
    /// Only this root (its number, as `lode root ls` shows it); every root by default.
    #[arg(long, value_name = "N")]
    pub root: Option<u32>,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// A tag, or a manifest id (64 hex digits) whose tags all go.
    pub image: String,
    /// Remove the manifest IMAGE (an id) itself, if no tag names it and no pin holds it.
    #[arg(long)]
    pub manifest: bool,
}

#[derive(Debug, Args)]
pub struct ImageArg {
    /// A tag, or a manifest id (64 hex digits).
    pub image: String,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A tag, or a manifest id (64 hex digits).
    pub image: String,
    /// Check names only, without the KMS (what a holder of ciphertext alone can check).
    #[arg(long)]
    pub no_decrypt: bool,
    /// Remove each damaged chunk object found (bytes that do not hash to its name, an
    /// object larger than the chunk can be, a link or special file), so that importing
    /// or publishing the image again uploads it anew. Still exits 2: the image stays
    /// broken until then.
    #[arg(long)]
    pub repair: bool,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Chunk count, stored bytes, logical bytes, the dedup ratio, and live and dead
    /// bytes per root (dead: chunks no live manifest of the root names; see docs/gc.md).
    Stats,
    /// List tags and the manifests they point at. A tag that cannot be read is named
    /// on stderr, with why, and the rest are still listed.
    Tags,
    /// Check the store's consistency and reclaim what killed writers left.
    ///
    /// Removes staging files (`<object>#<n>`, written before an object is published)
    /// older than --older-than; reads and parses every tag, root record and manifest;
    /// names every object under a content-addressed prefix that is not one. Chunk
    /// contents are checked per image by `lode verify`. Exits 2 if any fault remains.
    Fsck(FsckArgs),
}

#[derive(Debug, Args)]
pub struct FsckArgs {
    /// Report staging files without removing them.
    #[arg(long)]
    pub dry_run: bool,
    /// Leave staging files younger than this many seconds: a writer may still be using
    /// them.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub older_than: u64,
}

#[derive(Debug, Subcommand)]
pub enum PrefetchCommand {
    /// Record the image's working set again at its next start, replacing the one stored
    /// (which is still prefetched until then). Needs the image's keys (the KMS).
    Record(ImageArg),
    /// Remove the image's recorded working set (its next start records a new one).
    Clear(ImageArg),
}

#[derive(Debug, Subcommand)]
pub enum KmsCommand {
    /// List the keyring's keys.
    List,
    /// Create a new random key.
    Create {
        /// The key's name (1-64 of A-Z a-z 0-9 . _ -).
        name: String,
        /// Make it the key that wraps new images.
        #[arg(long)]
        default: bool,
    },
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the generated image, in MiB.
    #[arg(long, default_value_t = 64)]
    pub size_mib: u64,
}

fn parse_chunk_size(s: &str) -> Result<ChunkSize, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    ChunkSize::new(n).map_err(|e| e.to_string())
}

/// `$LODE_HOME`, else `~/.local/share/lode`.
pub fn data_dir() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("LODE_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither LODE_HOME nor HOME is set: set LODE_HOME to lode's data directory")?;
    Ok(PathBuf::from(home).join(".local/share/lode"))
}

#[derive(Debug, Subcommand)]
pub enum ControlCommand {
    /// Create the fleet's CA in DIR and the control service's certificate.
    ///
    /// Writes ca.pem (give it to every member), ca.key (keep it where certificates are
    /// issued, mode 0600) and control-control.pem/.key. Each --host (a DNS name or an IP
    /// address) is a name the service answers TLS under.
    #[command(
        after_help = "Example:\n  lode control init --dir ca --host control.internal --host 10.0.0.5"
    )]
    Init {
        /// The credentials directory.
        #[arg(long, value_name = "DIR")]
        dir: std::path::PathBuf,
        /// A name or address the control service is reached at (repeatable).
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        /// How long the certificates are valid.
        #[arg(long, value_name = "N", default_value_t = 365)]
        days: u32,
    },
    /// Issue a certificate from DIR's CA: DIR/<role>-<id>.pem and .key (mode 0600).
    ///
    /// Exactly one of --worker, --admin, --control names who it is for; the identity is
    /// in the certificate, so the service knows a caller by its certificate alone. Copy
    /// ca.pem and the two files to the holder.
    #[command(
        after_help = "Examples:\n  lode control issue --dir ca --worker w1 --host w1.internal\n  \
                            lode control issue --dir ca --admin ops\n  \
                            lode control issue --dir ca --control replica-b --host control-b.internal"
    )]
    Issue(IssueArgs),
    /// Run the assignment service.
    ///
    /// Listens for TLS with client certificates on --listen, or on a Unix socket
    /// (--socket, mode 0600, a single host). Uses the global --store for its state and
    /// --kms to unwrap image keys.
    #[command(
        after_help = "Examples:\n  lode control serve --listen 0.0.0.0:7443 --creds ca --store s3://bucket/lode\n  \
                            lode control serve --socket /run/lode/control.sock --creds ca"
    )]
    Serve(ServeArgs),
    /// Print the workers and the assignments the service knows.
    Status(ControlClientArgs),
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("who").required(true).args(["worker", "admin", "control"])))]
pub struct IssueArgs {
    /// The credentials directory holding the CA.
    #[arg(long, value_name = "DIR")]
    pub dir: std::path::PathBuf,
    /// A worker's certificate, for worker ID.
    #[arg(long, value_name = "ID")]
    pub worker: Option<String>,
    /// An operator's or front end's certificate.
    #[arg(long, value_name = "NAME")]
    pub admin: Option<String>,
    /// Another control service replica's certificate.
    #[arg(long, value_name = "NAME")]
    pub control: Option<String>,
    /// A name or address the holder serves TLS under (repeatable).
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// How long the certificate is valid.
    #[arg(long, value_name = "N", default_value_t = 365)]
    pub days: u32,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("on").required(true).args(["listen", "socket"])))]
pub struct ServeArgs {
    /// Listen for TLS on ADDR (host:port; port 0 picks one, printed on start).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Listen on a Unix socket at PATH instead (single host).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<std::path::PathBuf>,
    /// The credentials directory (ca.pem and this replica's certificate).
    #[arg(long, value_name = "DIR")]
    pub creds: std::path::PathBuf,
    /// This replica's name: its certificate is control-NAME.pem.
    #[arg(long, value_name = "NAME", default_value = "control")]
    pub name: String,
    /// How long an assignment lasts unless the worker's heartbeats renew it.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = lode_image::parse_duration)]
    pub lease: std::time::Duration,
    /// How often workers heartbeat; a worker silent for three of these takes no starts.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = lode_image::parse_duration)]
    pub heartbeat_interval: std::time::Duration,
    /// How long one KMS unwrap may take before the key request fails.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = lode_image::parse_duration)]
    pub kms_timeout: std::time::Duration,
}

#[derive(Debug, clap::Args)]
pub struct ControlClientArgs {
    /// The control service: https://HOST:PORT or unix:/PATH.
    #[arg(long, value_name = "ENDPOINT", env = "LODE_CONTROL")]
    pub control: String,
    /// The credentials directory (ca.pem and admin-NAME.pem/.key).
    #[arg(long, value_name = "DIR", env = "LODE_CONTROL_CREDS")]
    pub creds: std::path::PathBuf,
    /// The admin identity to call as.
    #[arg(long = "as", value_name = "NAME", default_value = "admin")]
    pub as_name: String,
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The image: a tag or a manifest id.
    pub image: String,
    #[command(flatten)]
    pub client: ControlClientArgs,
}

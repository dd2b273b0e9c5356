#!/usr/bin/python3
"""lode's evaluation: every benchmark beside its peer, in one run.

Measures, writes one JSON file per section into RESULTS, then scripts/evaluation.py
turns them into docs/EVALUATION.md and its plots. scripts/bench.sh is the entry point
(it installs what is missing, builds lode and checks the image family); run this file
directly only to re-run single sections:

    scripts/bench.py --quick --sections starts,replay --results /var/tmp/lode-eval/results

Sections:
  dedup     1: stored against logical bytes over the image family and function images
  starts    2, 6 and part of 5: cold starts per image and tier, lazy against pulling
  replay    3, 4: a Zipf workload of functions on three agents sharing six cache nodes
  peers     5: NBD against nbdkit, cache node against memcached, the agent against nbdkit
  snapshot  7: memory snapshot restore, lazy against eager, with and without working set
  startcost 8: the fixed cost of `lode run` of a tiny warm image against a chroot, step by step
  network   9: the starts of 2 and the replay of 4 again on scripts/testnet.sh's hosts
  vm       10: `lode vm run` of the python image (QEMU) beside `lode run` of it
  scale    11: the fleet simulator calibrated, checked against a traced replay and run at
              fleet scale; caches sized by `lode advise`; eviction policies under bursts;
              AZ hedging; snapshot session bursts
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

FAMILY = ["base", "python", "pyweb", "node", "gcc"]

# The command each family image starts with: what a function on it would run first.
COMMANDS = {
    "base": ["sh", "-c", "dpkg-query -W >/dev/null && cat /etc/debian_version"],
    "python": ["python3", "-c", "import json, sqlite3, email"],
    "pyweb": ["python3", "-c", "import flask; flask.Flask('app')"],
    "node": ["node", "-e", "require('http'); require('crypto'); console.log(process.version)"],
    "gcc": ["sh", "-c", "printf 'int main(void){return 0;}\\n' >/tmp/a.c && gcc -o /tmp/a /tmp/a.c && /tmp/a"],
}

# A function's own start: its runtime's command, then its code and data (/srv/fn).
FUNCTION_COMMANDS = {
    "base": ["sh", "-c", "dpkg-query -W >/dev/null && cat /srv/fn/data.bin >/dev/null"],
    "python": ["python3", "/srv/fn/main.py"],
    "pyweb": ["python3", "/srv/fn/main.py"],
    "node": ["node", "/srv/fn/main.js"],
    "gcc": ["sh", "-c", "gcc -c /srv/fn/main.c -o /tmp/main.o && cat /srv/fn/data.bin >/dev/null"],
}
FUNCTION_CODE = {
    "python": ("main.py", "import json, sqlite3, email\nprint(len(open('/srv/fn/data.bin', 'rb').read()))\n"),
    "pyweb": ("main.py", "import flask\napp = flask.Flask('fn')\nprint(len(open('/srv/fn/data.bin', 'rb').read()))\n"),
    "node": ("main.js", "const fs = require('fs'); require('http');\nconsole.log(fs.readFileSync('/srv/fn/data.bin').length);\n"),
    "gcc": ("main.c", "#include <stdio.h>\nint main(void) { puts(\"fn\"); return 0; }\n"),
    "base": ("main.sh", "cat /srv/fn/data.bin >/dev/null\n"),
}

LOCAL_TIERS = ("decrypted", "memory", "disk")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Fail(Exception):
    pass


def run(cmd, **kw):
    """Runs cmd, raising Fail with its stderr if it fails; returns stdout."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    p = subprocess.run(cmd, text=True, **kw)
    if p.returncode != 0:
        raise Fail(f"{' '.join(map(str, cmd))} exited {p.returncode}: {(p.stderr or '')[-2000:]}")
    return p.stdout


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ctx:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.lode = os.path.realpath(args.lode)
        self.s3_server = args.s3_server and os.path.realpath(args.s3_server)
        self.layout = os.path.realpath(args.layout)
        self.work = os.path.realpath(args.work)
        self.results = os.path.realpath(args.results)
        self.repo = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
        self.home = os.path.join(self.work, "home")
        self.store = os.path.join(self.home, "store")
        self.kms = os.path.join(self.home, "keyring.json")
        os.makedirs(self.results, exist_ok=True)
        os.makedirs(self.home, exist_ok=True)
        self.env = dict(os.environ, LODE_HOME=self.home)
        for k in ("LODE_STORE", "LODE_KMS", "LODE_KMS_KEY", "LODE_AGENT_CONTROL", "LODE_AGENT_CONFIG"):
            self.env.pop(k, None)
        self.procs = []

    def lode_json(self, *args):
        out = run([self.lode, "--json", "-q", *args], env=self.env)
        return json.loads(out)

    def save(self, name, data):
        data["recorded_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        data["quick"] = self.quick
        path = os.path.join(self.results, f"{name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(path + ".tmp", path)
        log(f"wrote {path}")

    def load(self, name):
        path = os.path.join(self.results, f"{name}.json")
        with open(path) as f:
            return json.load(f)

    def spawn(self, cmd, logname, env=None):
        with open(os.path.join(self.work, logname), "ab") as logf:
            p = subprocess.Popen(cmd, env=env or self.env, stdout=logf, stderr=logf, start_new_session=True)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []


# ------------------------------------------------------------------ OCI layout helpers


def blob_path(layout, digest):
    algo, hexd = digest.split(":", 1)
    return os.path.join(layout, "blobs", algo, hexd)


def read_blob(layout, digest):
    with open(blob_path(layout, digest), "rb") as f:
        return f.read()


def index_manifests(layout):
    with open(os.path.join(layout, "index.json")) as f:
        return json.load(f)


def tag_manifest(layout, tag):
    for m in index_manifests(layout)["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return json.loads(read_blob(layout, m["digest"]))
    raise Fail(f"no tag {tag!r} in the OCI layout {layout}")


def write_blob(layout, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(layout, digest)
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    return digest


def add_function_image(layout, base_tag, tag, files):
    """Adds `tag` to layout: base_tag plus one layer holding /srv/fn/<files>."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("srv", "srv/fn"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            tar.addfile(ti)
        for name, data in files:
            ti = tarfile.TarInfo(f"srv/fn/{name}")
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1700000000
            tar.addfile(ti, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    gz = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    layer_digest = write_blob(layout, gz)
    manifest = tag_manifest(layout, base_tag)
    config = json.loads(read_blob(layout, manifest["config"]["digest"]))
    config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(tar_bytes).hexdigest())
    if "history" in config:
        config["history"].append({"created_by": "lode bench: function code", "created": "2023-11-14T22:13:20Z"})
    cfg = json.dumps(config).encode()
    manifest["config"] = dict(manifest["config"], digest=write_blob(layout, cfg), size=len(cfg))
    manifest["layers"] = manifest["layers"] + [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": len(gz)}
    ]
    mbytes = json.dumps(manifest).encode()
    index = index_manifests(layout)
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
    ] + [
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": write_blob(layout, mbytes),
            "size": len(mbytes),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }
    ]
    # Replace, never rewrite in place: the layout's files are hard links to the family's.
    path = os.path.join(layout, "index.json")
    with open(path + ".tmp", "w") as f:
        json.dump(index, f)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------ agents and the fleet


class Agent:
    """A `lode agent` with its own state directory. On the test network (section 9) it
    runs in a worker host's network namespace (`host`: the command's prefix), with the
    store's environment and a configuration file of its own."""

    def __init__(self, ctx, name, az=None, caches=None, lode=None, host=None, env=None, config=None, extra=None):
        self.ctx, self.name = ctx, name
        self.extra = extra or []
        self.lode = lode or ctx.lode
        self.state = os.path.join(ctx.work, "agents", name)
        self.control = os.path.join(self.state, "control.sock")
        self.az = az or []
        self.caches = caches or {}
        self.host = host or []
        self.env = env
        self.config = config
        self.proc = None

    def start(self):
        os.makedirs(self.state, exist_ok=True)
        cmd = [*self.host, self.lode, "-q", "agent", "--state-dir", self.state]
        if self.config:
            cmd += ["--config", self.config]
        for k, v in self.caches.items():
            cmd += [f"--cache-{k}", v]
        for a in self.az:
            cmd += ["--az-node", a]
        cmd += self.extra
        self.proc = self.ctx.spawn(cmd, f"agent-{self.name}.log", env=self.env)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise Fail(f"agent {self.name} exited {self.proc.returncode}; see {self.ctx.work}/agent-{self.name}.log")
            if os.path.exists(self.control):
                try:
                    self.stats()
                    return self
                except Fail:
                    pass
            time.sleep(0.05)
        raise Fail(f"agent {self.name} did not answer on {self.control} within 30 s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None

    def stats(self):
        out = run([self.lode, "stats", "--json", "--control", self.control], env=self.ctx.env)
        return json.loads(out)

    def start_fn(self, tag, cmd):
        """One start: `lode run` (attach, loop, mount, run, clean up); returns seconds and
        the tier counters it moved."""
        before = self.stats()
        t0 = time.perf_counter()
        run([self.lode, "run", "-q", "--control", self.control, tag, "--", *cmd], env=self.ctx.env)
        secs = time.perf_counter() - t0
        return secs, delta(before, self.stats())

    def wipe(self):
        self.stop()
        shutil.rmtree(self.state, ignore_errors=True)


def tier_map(stats):
    return {t["name"]: t for t in stats["tiers"]}


def delta(before, after):
    b, a = tier_map(before), tier_map(after)
    tiers = {}
    for name, t in a.items():
        o = b.get(name, {})
        tiers[name] = {
            "hits": t["hits"] - o.get("hits", 0),
            "misses": t["misses"] - o.get("misses", 0),
            "bytes": t["bytes"] - o.get("bytes", 0),
        }
    return {
        "tiers": tiers,
        "reads": after["reads"] - before["reads"],
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "zero_chunk_reads": after["zero_chunk_reads"] - before["zero_chunk_reads"],
        "joined_fetches": after["joined_fetches"] - before["joined_fetches"],
    }


class Fleet:
    """Six lode cache nodes on loopback, memory only, k=4 m=2 from the agents' side."""

    def __init__(self, ctx, name, nodes=6, memory="1GiB"):
        self.ctx, self.addrs = ctx, []
        for i in range(nodes):
            port = free_port()
            addr = f"127.0.0.1:{port}"
            ctx.spawn([ctx.lode, "-q", "cache-node", "--listen", addr, "--memory", memory], f"node-{name}-{i}.log")
            self.addrs.append(addr)
        for addr in self.addrs:
            host, port = addr.split(":")
            deadline = time.time() + 20
            while True:
                try:
                    socket.create_connection((host, int(port)), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise Fail(f"cache node {addr} did not listen within 20 s")
                    time.sleep(0.05)


# ------------------------------------------------------------------ 1. dedup


def ensure_family(ctx):
    """The family flattened into the shared store (by the dedup section, or here)."""
    for t in FAMILY:
        try:
            ctx.lode_json("inspect", t)
        except Fail:
            log(f"flattening {t} into the shared store")
            ctx.lode_json("flatten", f"oci:{ctx.layout}:{t}", "--tag", t, "--work-dir", os.path.join(ctx.work, "tmp"))


def section_dedup(ctx):
    runs = 2 if ctx.quick else 3
    naive_store = os.path.join(ctx.work, "naive-store")
    env = dict(ctx.env, E2FSPROGS_FAKE_TIME="1700000000")
    fixed = "00000000-0000-0000-0000-00000000a0de"
    images = []
    # Scratch (the extracted trees, the naive image, lode's work dir) goes to tmpfs where
    # there is one: a root ext4 that has just deleted a lot creates inodes slowly for
    # minutes, which would weigh on whichever side ran next. The stores stay on disk.
    scratch = tempfile.mkdtemp(prefix="lode-eval-", dir="/dev/shm" if os.path.isdir("/dev/shm") else ctx.work)
    try:
        dedup_passes(ctx, runs, naive_store, env, fixed, images, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ctx.save("dedup", {"images": images, "layout": ctx.layout, "runs": runs, "scratch": os.path.dirname(scratch)})


def dedup_passes(ctx, runs, naive_store, env, fixed, images, scratch):
    for r in range(runs):
        # Every pass starts from empty stores, so each measures the same dedup; the byte
        # counts must come out identical (both pipelines are deterministic).
        shutil.rmtree(ctx.store, ignore_errors=True)
        shutil.rmtree(naive_store, ignore_errors=True)
        seen_layers = set()
        for n, t in enumerate(FAMILY):
            log(f"dedup: {t} (pass {r + 1}/{runs})")
            os.sync()
            t0 = time.perf_counter()
            flat = ctx.lode_json("flatten", f"oci:{ctx.layout}:{t}", "--tag", t, "--work-dir", os.path.join(scratch, "tmp"))
            os.sync()
            lode_secs = time.perf_counter() - t0
            manifest = ctx.lode_json("inspect", t)

            rootfs = os.path.join(scratch, f"rootfs-{t}")
            img = os.path.join(scratch, f"naive-{t}.ext4")
            shutil.rmtree(rootfs, ignore_errors=True)
            t0 = time.perf_counter()
            run(["umoci", "raw", "unpack", "--image", f"{ctx.layout}:{t}", rootfs], env=env)
            kib = int(run(["du", "-sk", rootfs]).split()[0])
            run(["mkfs.ext4", "-q", "-F", "-U", fixed, "-E", f"hash_seed={fixed},root_owner=0:0", "-d", rootfs, img,
                 f"{kib * 13 // 10 + 32768}k"], env=env)
            naive = json.loads(run([ctx.lode, "--json", "-q", "--store", naive_store, "--kms", ctx.kms, "import", img,
                                    "--tag", t], env=env))
            os.sync()
            naive_secs = time.perf_counter() - t0
            shutil.rmtree(rootfs)
            os.unlink(img)

            layers = tag_manifest(ctx.layout, t)["layers"]
            new_gz = new_tar = 0
            for layer in layers:
                if layer["digest"] in seen_layers:
                    continue
                seen_layers.add(layer["digest"])
                new_gz += layer["size"]
                with gzip.open(blob_path(ctx.layout, layer["digest"])) as f:
                    while chunk := f.read(1 << 20):
                        new_tar += len(chunk)
            # The base layer's region: how many of its chunks were already stored (by the
            # base image itself, flattened first).
            cs = manifest["chunk_size"]
            region = flat["layers"][0]
            lo, hi = region["region_start"] // cs, -(-region["region_end"] // cs)
            names = [c for c in manifest["chunks"][lo:hi] if c]
            if n == 0:
                base_names = set(c for c in manifest["chunks"] if c)
            rec = {
                "tag": t,
                "layers": len(layers),
                "base_region_chunks": len(names),
                "base_region_stored": sum(1 for c in names if c in base_names),
                "image_size": flat["image_size"],
                "chunk_size": manifest["chunk_size"],
                "chunks": manifest["chunk_count"],
                "lode_uploaded": flat["stats"]["uploaded_bytes"],
                "lode_dedup_share": flat["dedup_share"],
                "naive_size": naive["stats"]["device_size"],
                "naive_uploaded": naive["stats"]["uploaded_bytes"],
                "naive_dedup_share": naive["dedup_share"],
                "registry_new_gz": new_gz,
                "registry_new_tar": new_tar,
            }
            # mkfs.ext4 writes a random UUID, hash seed and timestamps, so the naive path's
            # chunks differ from pass to pass, and with lz4 so do their stored sizes (by a
            # few hundred bytes); pass 1's is reported. lode's own figures must repeat.
            varies = {"naive_uploaded"}
            if r == 0:
                images.append(dict(rec, lode_secs=[], naive_secs=[]))
            elif any(images[n][k] != v for k, v in rec.items() if k not in varies):
                raise Fail(f"dedup: pass {r + 1} stored different bytes for {t} than pass 1: {rec} against {images[n]}")
            images[n]["lode_secs"].append(lode_secs)
            images[n]["naive_secs"].append(naive_secs)


# ------------------------------------------------------------------ 2, 6, 5: starts


def pull_and_run(ctx, tag, how):
    """The peer of a lazy start: fetch the whole image first, then start from local disk.
    `export`: lode's own full fetch of the flattened image (`lode export`), loop mount.
    `unpack`: what a registry pull does locally (umoci raw unpack of every layer)."""
    # On tmpfs where there is one (see section_dedup): the peers' best case.
    base = "/dev/shm" if os.path.isdir("/dev/shm") else ctx.work
    root = os.path.join(base, f"lode-eval-pull-{tag}")
    img = os.path.join(base, f"lode-eval-pull-{tag}.ext4")
    mounted = []
    try:
        drop_caches()
        t0 = time.perf_counter()
        if how == "export":
            run([ctx.lode, "-q", "export", tag, img], env=ctx.env)
            os.makedirs(root, exist_ok=True)
            run(["mount", "-o", "loop", img, root])
            mounted.append(root)
        else:
            run(["umoci", "raw", "unpack", "--image", f"{ctx.layout}:{tag}", root])
        pulled = time.perf_counter() - t0
        # What crun gives `lode run`'s side: /proc, and a tmpfs /tmp (lode's ext4 images
        # are built full, with no room to write).
        for fs, where in (("proc", "proc"), ("tmpfs", "tmp")):
            os.makedirs(os.path.join(root, where), exist_ok=True)
            run(["mount", "-t", fs, fs, os.path.join(root, where)])
            mounted.append(os.path.join(root, where))
        run([shutil.which("chroot") or "/usr/sbin/chroot", root, *COMMANDS[tag]], env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root"})
        total = time.perf_counter() - t0
        return {"pull_secs": pulled, "total_secs": total}
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", m], check=False)
        shutil.rmtree(root, ignore_errors=True)
        if os.path.exists(img):
            os.unlink(img)


def section_starts(ctx):
    ensure_family(ctx)
    runs = 3 if ctx.quick else 5
    fleet = Fleet(ctx, "starts")
    out = {"runs": runs, "images": {}, "commands": COMMANDS, "fleet": {"nodes": 6, "k": 4, "m": 2}}
    try:
        for tag in FAMILY:
            size = ctx.lode_json("inspect", tag)["device_size"]
            rec = {"image_size": size, "origin": [], "az": [], "disk": [], "memory": [], "export": [], "unpack": []}
            # Fill the fleet once for this image, from an agent of its own.
            filler = Agent(ctx, f"fill-{tag}", az=fleet.addrs).start()
            filler.start_fn(tag, COMMANDS[tag])
            filler.wipe()
            for r in range(runs):
                log(f"starts: {tag} run {r + 1}/{runs}")
                a = Agent(ctx, f"origin-{tag}").start()
                drop_caches()
                secs, d = a.start_fn(tag, COMMANDS[tag])
                rec["origin"].append({"secs": secs, **d})
                a.wipe()

                a = Agent(ctx, f"az-{tag}", az=fleet.addrs).start()
                drop_caches()
                secs, d = a.start_fn(tag, COMMANDS[tag])
                rec["az"].append({"secs": secs, **d})
                a.stop()
                a.start()  # the same state directory: memory empty, disk full
                drop_caches()
                secs, d = a.start_fn(tag, COMMANDS[tag])
                rec["disk"].append({"secs": secs, **d})
                drop_caches()
                secs, d = a.start_fn(tag, COMMANDS[tag])
                rec["memory"].append({"secs": secs, **d})
                a.wipe()

                rec["export"].append(pull_and_run(ctx, tag, "export"))
                rec["unpack"].append(pull_and_run(ctx, tag, "unpack"))
            out["images"][tag] = rec
        out["pull_scratch"] = "/dev/shm" if os.path.isdir("/dev/shm") else ctx.work
    finally:
        ctx.stop_all()
    ctx.save("starts", out)


# ------------------------------------------------------------------ 3, 4: replay


def zipf_weights(n, s):
    return [1.0 / (k ** s) for k in range(1, n + 1)]


def section_replay(ctx):
    ensure_family(ctx)
    q = ctx.quick
    ctx.save("replay", replay(ctx, nfun=16 if q else 48, nstart=120 if q else 480))


def replay(ctx, nfun, nstart, net=None):
    """The Zipf replay: `nfun` function images over the family, `nstart` starts on three
    agents sharing six cache nodes. With `net` (a TestNet) the store is the S3 server on
    the origin host, the nodes run on the cache hosts and the agents on the workers."""
    rng = random.Random(REPLAY_SEED)
    layout = os.path.join(ctx.work, "fn-layout")
    shutil.rmtree(layout, ignore_errors=True)
    functions = make_functions(ctx, layout, nfun, rng, net)
    fn_weights = popularity(functions, rng)
    try:
        out = run_starts(ctx, functions, fn_weights, rng, nstart, REPLAY_CACHES, net=net)
    finally:
        shutil.rmtree(layout, ignore_errors=True)
    return out


REPLAY_SEED = 7
REPLAY_ZIPF = 1.1
REPLAY_AGENTS = 3
REPLAY_CACHES = {"decrypted": "32MiB", "memory": "32MiB", "disk": "96MiB"}


def make_functions(ctx, layout, nfun, rng, net=None, prefix="fn", bases=None, data_bits=(17, 23)):
    """`nfun` function images over the family, flattened into the store: each a family
    image plus its code and a data file of log-uniform size (2**data_bits bytes)."""
    if not os.path.exists(layout):
        run(["cp", "-al", ctx.layout, layout])
    functions = []
    for i in range(nfun):
        base = rng.choice(bases or FAMILY)
        data_size = int(2 ** rng.uniform(*data_bits))
        data = rng.getrandbits(8 * data_size).to_bytes(data_size, "little")
        name, code = FUNCTION_CODE[base]
        tag = f"{prefix}{i:02d}-{base}"
        add_function_image(layout, base, tag, [(name, code.encode()), ("data.bin", data)])
        log(f"flattening function {tag} ({data_size >> 10} KiB of data)")
        flatten = ["flatten", f"oci:{layout}:{tag}", "--tag", tag, "--work-dir", os.path.join(ctx.work, "tmp")]
        flat = net.publish_json(*flatten) if net else ctx.lode_json(*flatten)
        functions.append({"tag": tag, "base": base, "data_bytes": data_size, "image_size": flat["image_size"],
                          "dedup_share": flat["dedup_share"], "uploaded": flat["stats"]["uploaded_bytes"]})
    return functions


def popularity(functions, rng, s=REPLAY_ZIPF):
    """Each function's Zipf weight, by a shuffled popularity rank (kept in `functions`)."""
    n = len(functions)
    rank = list(range(n))
    rng.shuffle(rank)
    weights = zipf_weights(n, s)
    for f, r in zip(functions, rank):
        f["rank"] = r
    return [weights[rank[i]] for i in range(n)]


def run_starts(ctx, functions, fn_weights, rng, nstart, caches, net=None, label="replay", trace_dir=None,
               policy=None, bursts=None, node_memory="1GiB"):
    """`nstart` starts of functions drawn by weight, each on a random one of three agents
    sharing a fresh fleet of six cache nodes. `trace_dir`: each agent records a read
    trace there. `policy`: the agents' local eviction policy. `bursts`: (every, one_offs,
    per_tick) — after every `every` starts, the next `per_tick` of the one-off functions
    `one_offs` are started once each (a cron job's images, never seen again)."""
    agents_n = REPLAY_AGENTS
    extra = []
    if policy:
        extra += ["--cache-policy", policy]
    traces = []
    if net:
        nodes = net.fleet()
        agents = [net.agent(f"{label}-{i}", f"worker{i + 1}", az=nodes, caches=caches).start() for i in range(agents_n)]
    else:
        nodes = Fleet(ctx, label, memory=node_memory).addrs
        agents = []
        for i in range(agents_n):
            args = list(extra)
            if trace_dir:
                path = os.path.join(trace_dir, f"{label}-{i}.trace")
                traces.append(path)
                args += ["--trace", path, "--trace-worker", f"{label}-{i}"]
            agents.append(Agent(ctx, f"{label}-{i}", az=nodes, caches=caches, extra=args).start())
    starts = []
    pending = list(bursts[1]) if bursts else []
    try:
        n = 0
        while n < nstart:
            if bursts and n and n % bursts[0] == 0 and pending:
                # A cron tick: a batch of one-off images, each started once.
                batch, pending = pending[:bursts[2]], pending[bursts[2]:]
                for fn in batch:
                    a = rng.randrange(agents_n)
                    secs, d = agents[a].start_fn(fn["tag"], FUNCTION_COMMANDS[fn["base"]])
                    starts.append({"fn": fn["tag"], "agent": a, "secs": secs, "one_off": True,
                                   "tiers": {k: v["hits"] for k, v in d["tiers"].items()},
                                   "bytes": {k: v["bytes"] for k, v in d["tiers"].items()}})
            f = rng.choices(range(len(functions)), fn_weights)[0]
            a = rng.randrange(agents_n)
            fn = functions[f]
            secs, d = agents[a].start_fn(fn["tag"], FUNCTION_COMMANDS[fn["base"]])
            starts.append({"fn": f, "agent": a, "secs": secs, "tiers": {k: v["hits"] for k, v in d["tiers"].items()},
                           "bytes": {k: v["bytes"] for k, v in d["tiers"].items()}})
            n += 1
            if n % 20 == 0:
                log(f"{label}: {n}/{nstart} starts")
        final = [a.stats() for a in agents]
    finally:
        ctx.stop_all()
    return {
        "functions": functions, "popularity_rank": [f["rank"] for f in functions], "zipf_s": REPLAY_ZIPF,
        "agents": agents_n, "caches": caches, "fleet": {"nodes": 6, "k": 4, "m": 2, "memory_per_node": node_memory},
        "starts": starts, "agent_stats": final, "seed": REPLAY_SEED, "traces": traces, "policy": policy,
    }


# ------------------------------------------------------------------ 11: fleet scale


# Example prices for `lode advise` (USD): about what a cloud charges for memory and local
# flash by the GiB-hour and an object store per request and per GiB out of the region.
PRICES = {"memory_gib_hour": 0.005, "flash_gib_hour": 0.0002, "origin_per_1000_requests": 0.0004,
          "origin_per_gib": 0.02}
# The paper's shares of chunks served: worker-local, AZ cache, S3.
PAPER_SHARES = {"local": 0.67, "az": 0.32, "origin": 0.0006}


def trace_shares(paths, skip=None):
    """Chunk reads per tier class in read traces: each chunk's first read by each start
    (`skip`: a predicate on image names whose starts are left out)."""
    counts = {"local": 0, "az": 0, "origin": 0}
    for p in paths:
        images = {}
        with open(p) as f:
            for line in f:
                w = line.split()
                if len(w) == 4 and w[1] == "start":
                    images[w[2]] = w[3]
                elif len(w) == 7 and w[1] == "read":
                    if skip and skip(images.get(w[2], "")):
                        continue
                    t = w[5]
                    counts[t if t in ("az", "origin") else "local"] += 1
    total = sum(counts.values()) or 1
    return {"reads": sum(counts.values()), **{k: v / total for k, v in counts.items()}}


def calibrate(ctx, functions, path):
    """The simulator's calibration, measured apart from the replay it predicts: each
    function started cold on one agent (from the origin, filling a fleet of its own),
    then on a fresh agent (from that AZ fleet) and again (warm); per-tier latency
    histograms from those agents' stats, each function's warm start time, and the
    per-worker read bandwidth of the AZ tier and of the origin (a whole image file read
    through a fresh agent)."""
    fleet = Fleet(ctx, "calib")
    caches = REPLAY_CACHES
    cold = Agent(ctx, "calib-cold", az=fleet.addrs, caches=caches).start()
    for fn in functions:
        cold.start_fn(fn["tag"], FUNCTION_COMMANDS[fn["base"]])
    warm = Agent(ctx, "calib-warm", az=fleet.addrs, caches=caches).start()
    warm_ms = {}
    for fn in functions:
        warm.start_fn(fn["tag"], FUNCTION_COMMANDS[fn["base"]])
        secs, _ = warm.start_fn(fn["tag"], FUNCTION_COMMANDS[fn["base"]])
        warm_ms[fn["tag"]] = round(secs * 1000, 1)
    stats = [cold.stats(), warm.stats()]
    cold.wipe()
    warm.wipe()
    big = max(functions, key=lambda f: f["image_size"])["tag"]
    bandwidth = {}
    for tier, az in (("az", fleet.addrs), ("origin", [])):
        a = Agent(ctx, f"calib-bw-{tier}", az=az, caches=caches).start()
        bandwidth[tier] = read_whole_file(ctx, a, big)
        a.wipe()
    ctx.stop_all()
    for fn in functions:
        # The replay starts as section 4's did: each function's first start records.
        ctx.lode_json("prefetch", "clear", fn["tag"])
    bounds = stats[0]["read_latency_buckets_us"]
    counts = {}
    for t in ("memory", "disk", "az", "origin"):
        counts[t] = [sum(x) for x in zip(*[tier_map(st)[t]["hit_latency_counts"] for st in stats])]
    cal = {
        "format": "lode-calibration", "version": 1,
        "chunk_size": 524288,
        "read_latency_buckets_us": bounds,
        "hit_latency_counts": counts,
        "bandwidth_bytes_per_s": {k: round(v) for k, v in bandwidth.items()},
        "lanes": 16,
        "warm_start_ms": {"default": round(med(list(warm_ms.values())), 1), "images": warm_ms},
    }
    with open(path, "w") as f:
        json.dump(cal, f, indent=1)
    return cal


def med(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2) if n else 0


def read_whole_file(ctx, agent, tag):
    """Bytes per second of reading `tag`'s attachment file whole, 1 MiB at a time."""
    name = "bw"
    run([ctx.lode, "-q", "attach", tag, "--name", name, "--control", agent.control], env=ctx.env)
    path = os.path.join(agent.state, "files", name)
    drop_caches()
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            n += len(b)
    secs = time.perf_counter() - t0
    run([ctx.lode, "-q", "detach", name, "--control", agent.control], env=ctx.env)
    return n / secs


def sim_json(ctx, *args):
    t0 = time.perf_counter()
    out = run([ctx.lode, "-q", "sim", "--json", *args], env=ctx.env)
    r = json.loads(out)
    r["bench_wall_secs"] = time.perf_counter() - t0
    return r


def sim_tiers(caches):
    """`lode sim --tier` arguments for an agent's caches: its ciphertext memory and disk
    (decrypted segments are part of what those hold, at chunk granularity)."""
    return ["--tier", f"memory:{caches['memory']}", "--tier", f"disk:{caches['disk']}"]


def section_scale(ctx):
    q = ctx.quick
    nfun, nstart = (16, 120) if q else (48, 480)
    out = {"prices": PRICES, "paper_shares": PAPER_SHARES}
    rng = random.Random(REPLAY_SEED)
    layout = os.path.join(ctx.work, "fn-layout")
    shutil.rmtree(layout, ignore_errors=True)
    functions = make_functions(ctx, layout, nfun, rng)
    fn_weights = popularity(functions, rng)
    after_functions = rng.getstate()
    cal_path = os.path.join(ctx.results, "calibration.json")
    log("scale: calibrating the simulator")
    out["calibration"] = calibrate(ctx, functions, cal_path)

    # The replay of section 4 (same seed, workload, agents, caches), with read traces.
    tdir = os.path.join(ctx.work, "traces")
    os.makedirs(tdir, exist_ok=True)
    rng.setstate(after_functions)
    rep = run_starts(ctx, functions, fn_weights, rng, nstart, REPLAY_CACHES, label="traced", trace_dir=tdir)
    measured = {"shares": trace_shares(rep["traces"]), "start_p50": med([s["secs"] for s in rep["starts"]]),
                "start_secs": [s["secs"] for s in rep["starts"]]}
    pred = sim_json(ctx, *sum((["--trace", t] for t in rep["traces"]), []), "--calibration", cal_path,
                    *sim_tiers(REPLAY_CACHES), "--nodes", "6", "--node-memory", "1GiB")
    out["validation"] = {"measured": measured, "predicted": pred, "caches": REPLAY_CACHES, "nstart": nstart}
    ctx.save("scale", out)
    # The goal: a start p99 5% below what the simulator predicts at the hand-sized caches
    # (the p50 is the warm start's, which no cache size moves).
    out["advise"] = advise_and_replay(ctx, functions, fn_weights, after_functions, rep["traces"], cal_path,
                                      goal_ms=round(pred["start_latency"]["p99_ms"] * 0.95))
    ctx.save("scale", out)
    out["scale"] = scale_run(ctx, cal_path)
    ctx.save("scale", out)
    out["bursts"] = snapshot_bursts(ctx)
    ctx.save("scale", out)
    out["az_tail"] = az_tail(ctx)
    ctx.save("scale", out)
    out["eviction"] = eviction_study(ctx, functions, fn_weights, after_functions, cal_path)
    ctx.save("scale", out)
    shutil.rmtree(layout, ignore_errors=True)


POLICIES = ["lru", "lru-2", "s3-fifo", "w-tinylfu"]


def eviction_study(ctx, functions, fn_weights, rng_state, cal_path):
    """Every local eviction policy on the replay's Zipf workload with cron-like bursts of
    one-off images, in the simulator and on real agents (same caches, same starts)."""
    q = ctx.quick
    out = {"policies": POLICIES, "sim": {}, "agents": {}}
    # The simulator: the replay's functions and caches on three workers, a start every
    # second for two simulated hours, and every minute a burst of 20 one-off images.
    sim_args = ["--functions", str(len(functions)), "--zipf", str(REPLAY_ZIPF), "--seed", str(REPLAY_SEED),
                "--workers", "3", "--rate", "1", "--duration", "2h", "--burst-every", "1m", "--burst-images", "20",
                "--nodes", "6", "--node-memory", "1GiB", "--calibration", cal_path]
    out["sim_args"] = sim_args
    for pol in POLICIES:
        tiers = ["--tier", f"memory:{REPLAY_CACHES['memory']}:{pol}", "--tier", f"disk:{REPLAY_CACHES['disk']}:{pol}"]
        out["sim"][pol] = sim_json(ctx, *sim_args, *tiers)
    # Real agents: the replay's starts, and after every 40 a cron tick of 6 one-off
    # images (the base image plus 8-16 MiB of data the start reads whole).
    nstart, every, per_tick = (120, 40, 6) if q else (240, 40, 6)
    layout = os.path.join(ctx.work, "fn-layout")
    one_offs = make_functions(ctx, layout, (nstart // every) * per_tick, random.Random(99), prefix="cron",
                              bases=["base"], data_bits=(23, 24))
    out["agents_setup"] = {"nstart": nstart, "every": every, "per_tick": per_tick, "one_offs": len(one_offs),
                           "caches": REPLAY_CACHES}
    tdir = os.path.join(ctx.work, "evict-traces")
    for pol in POLICIES:
        for fn in functions + one_offs:
            ctx.lode_json("prefetch", "clear", fn["tag"])
        os.makedirs(tdir, exist_ok=True)
        rng = random.Random()
        rng.setstate(rng_state)
        rep = run_starts(ctx, functions, fn_weights, rng, nstart, REPLAY_CACHES, label=f"evict-{pol}",
                         trace_dir=tdir, policy=pol, bursts=(every, one_offs, per_tick))
        zipf = [s for s in rep["starts"] if not s.get("one_off")]
        out["agents"][pol] = {
            "shares": trace_shares(rep["traces"], skip=lambda img: img.startswith("cron")),
            "shares_all": trace_shares(rep["traces"]),
            "start_p50": med([s["secs"] for s in zipf]),
            "starts": len(rep["starts"]),
        }
    return out


def snapshot_bursts(ctx):
    """1, 8, 32 and 64 clones restored at once from one snapshot through one handler,
    cold (the origin) and warm (the local disk): lode-snap's burst bench."""
    env = {"BURSTS": "1,8,32,64", "MODES": "cold,warm", "SNAP_MIB": "32" if ctx.quick else "64",
           "QUERIES": "300" if ctx.quick else "1000"}
    text, took, cmd = cargo_bench(ctx, "lode-snap", "burst", env)
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"bench":"burst"' in line.replace(" ", ""):
            rows.append(json.loads(line))
    if len(rows) != 8:
        raise Fail(f"unexpected lode-snap burst bench output ({len(rows)} rows):\n{text}")
    bad = [r for r in rows if r["distinct_generation_ids"] != r["clones"]]
    if bad:
        raise Fail(f"clones shared a generation id: {bad}")
    # The fleet's burst capacity, predicted from these rows.
    measured = os.path.join(ctx.results, "burst.jsonl")
    with open(measured, "w") as f:
        f.write(text)
    sim_args = ["--workers", "100", "--goal", "p99=300ms", "--sessions", "1000,5000"]
    fleet = json.loads(run([ctx.lode, "-q", "sim-burst", "--json", "--measured", measured, *sim_args], env=ctx.env))
    return {"rows": rows, "command": cmd, "secs": took, "fleet": fleet, "fleet_args": sim_args}


def az_tail(ctx):
    """The AZ client's chunk fetch with one of six nodes slowed to ten times the healthy
    stripe latency (at least 5 ms), asking every node (`all`), the data nodes only
    (`off`) and the data nodes with hedging past the p95 (`p95`): lode-az's measurement."""
    cmd = ["cargo", "test", "-q", "--release", "--locked", "-p", "lode-az", "--test", "hedge", "--",
           "--ignored", "--nocapture", "--exact", "hedging_figures"]
    e = dict(os.environ, CARGO_TARGET_DIR=os.environ.get("CARGO_TARGET_DIR", os.path.join(ctx.repo, "target")))
    t0 = time.perf_counter()
    text = run(cmd, env=e, cwd=ctx.repo)
    rows = []
    for line in text.splitlines():
        m = re.match(r"^(all|off|p95)\s+(healthy|one slow)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)", line)
        if m:
            rows.append({"hedge": m[1], "fleet": m[2], "p50_us": int(m[3]), "p99_us": int(m[4]), "mean_us": int(m[5]),
                         "requests_per_read": float(m[6]), "kib_per_read": float(m[7]), "hedges": int(m[8])})
    head = next((l for l in text.splitlines() if l.startswith("healthy stripe p50")), "")
    if len(rows) != 6:
        raise Fail(f"unexpected lode-az hedging output ({len(rows)} rows):\n{text}")
    return {"rows": rows, "setup": head, "command": " ".join(cmd), "secs": time.perf_counter() - t0}


def mib_arg(b):
    return f"{max(1, -(-int(b) // (1 << 20)))}MiB"


def advise_and_replay(ctx, functions, fn_weights, rng_state, traces, cal_path, goal_ms):
    """`lode advise` over the traced replay at PRICES and a start p99 goal; the replay
    again on real agents with the sizes it advised; and, by simulator sweeps, the local
    disk the paper's local share would need on this workload."""
    prices = ["--memory-price", str(PRICES["memory_gib_hour"]), "--flash-price", str(PRICES["flash_gib_hour"]),
              "--origin-request-price", str(PRICES["origin_per_1000_requests"]),
              "--origin-gib-price", str(PRICES["origin_per_gib"])]
    trace_args = sum((["--trace", t] for t in traces), [])
    args = [*trace_args, "--calibration", cal_path, *prices, "--latency-goal", f"p99={goal_ms:.0f}ms",
            *sim_tiers(REPLAY_CACHES), "--nodes", "6", "--node-memory", "1GiB"]
    adv = json.loads(run([ctx.lode, "-q", "advise", "--json", *args], env=ctx.env))
    sizes = {t["tier"]: t["bytes"] for t in adv["tiers"]}
    caches = {"decrypted": REPLAY_CACHES["decrypted"], "memory": mib_arg(sizes["memory"]),
              "disk": mib_arg(sizes["disk"])}
    node_memory = mib_arg(sizes["az"] / 6 * 1.05)  # the fleet's advice over six nodes, 5% for stripe headers
    rng = random.Random()
    rng.setstate(rng_state)
    for fn in functions:
        ctx.lode_json("prefetch", "clear", fn["tag"])
    tdir = os.path.join(ctx.work, "advised-traces")
    os.makedirs(tdir, exist_ok=True)
    rep = run_starts(ctx, functions, fn_weights, rng, len(functions) * 10 if not ctx.quick else 120, caches,
                     label="advised", trace_dir=tdir, node_memory=node_memory)
    replay = {"caches": caches, "node_memory": node_memory, "shares": trace_shares(rep["traces"]),
              "start_p50": med([x["secs"] for x in rep["starts"]]), "starts": len(rep["starts"])}
    # What the paper's 67% local needs here: the local disk swept in the simulator.
    sweep = []
    for mb in (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024):
        r = sim_json(ctx, *trace_args, "--calibration", cal_path, "--tier", f"memory:{REPLAY_CACHES['memory']}",
                     "--tier", f"disk:{mb}MiB", "--nodes", "6", "--node-memory", "1GiB")
        sweep.append({"disk_mib": mb, "report": r})
    return {"args": ["advise", *args], "advice": adv, "replay": replay, "disk_sweep": sweep, "goal_ms": goal_ms}


def scale_run(ctx, cal_path):
    """10,000 workers at 15,000 starts/s for a simulated hour (quick: five minutes) over
    20,000 functions and 100 AZ nodes of 16 GiB; then ten minutes of it again with each
    AZ placement, for the nodes' load."""
    duration = "5m" if ctx.quick else "1h"
    fleet = ["--workers", "10000", "--rate", "15000", "--functions", "20000", "--nodes", "100",
             "--node-memory", "16GiB"]
    args = [*fleet, "--duration", duration, "--calibration", cal_path]
    r = sim_json(ctx, *args)
    placements = {}
    for kind in ("rendezvous", "bounded"):
        placements[kind] = sim_json(ctx, *fleet, "--duration", "2m" if ctx.quick else "10m", "--az-placement", kind,
                                    "--calibration", cal_path)
    return {"args": args, "report": r, "placements": placements}


# ------------------------------------------------------------------ 10: a microVM start


VM_IMAGE = "python"
VM_COMMAND = ["python3", "-c", "print(1)"]


def timed_first_output(cmd, env):
    """Runs cmd; returns (seconds to its first byte on stdout, seconds to its exit)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = p.stdout.read()
    err = p.stderr.read()
    if p.wait() != 0 or not first:
        raise Fail(f"{' '.join(cmd)} exited {p.returncode} with output {(first + rest)[-500:]!r}: {err[-2000:]!r}")
    return t_first, time.perf_counter() - t0


def section_vm(ctx):
    """10: `lode vm run` of the python image (QEMU, TCG here) beside `lode run` of it."""
    try:
        ctx.lode_json("inspect", VM_IMAGE)
    except Fail:
        ctx.lode_json("flatten", f"oci:{ctx.layout}:{VM_IMAGE}", "--tag", VM_IMAGE, "--work-dir",
                      os.path.join(ctx.work, "tmp"))
    size = ctx.lode_json("inspect", VM_IMAGE)["device_size"]
    runs = 2 if ctx.quick else 3
    ways = {
        "vm_file": ["vm", "run", "-q"],
        "vm_nbd": ["vm", "run", "-q", "--via", "nbd"],
        "run": ["run", "-q"],
    }
    out = {"image": VM_IMAGE, "image_size": size, "command": VM_COMMAND, "runs": runs,
           "accel": "tcg" if "vmx" not in open("/proc/cpuinfo").read() else "auto", "ways": {w: [] for w in ways}}
    try:
        for r in range(runs):
            for way, args in ways.items():
                log(f"vm: {way} run {r + 1}/{runs}")
                a = Agent(ctx, f"vm-{way}").start()
                drop_caches()
                before = a.stats()
                first, total = timed_first_output([ctx.lode, *args, "--control", a.control, VM_IMAGE, "--", *VM_COMMAND],
                                                  ctx.env)
                d = delta(before, a.stats())
                out["ways"][way].append({"first_output_secs": first, "total_secs": total,
                                         "fetched_bytes": d["tiers"]["origin"]["bytes"]})
                a.wipe()
    finally:
        ctx.stop_all()
    ctx.save("vm", out)


# ------------------------------------------------------------------ 9: over a network


class TestNet:
    """scripts/testnet.sh's hosts, with the S3-protocol server on the origin (the store
    every lode command here uses: `publish` from the origin's own loopback, the rest from
    the workers over their links), a registry beside it, and cache nodes on demand."""

    S3_PORT, REGISTRY_PORT, NODE_PORT = 9000, 5000, 11211
    BUCKET = "lode-eval"

    def __init__(self, ctx, prefix="lbench", subnet="198.18.80.0/24", workers=3):
        if not ctx.s3_server:
            raise Fail("section network needs --s3-server (scripts/bench.sh builds lode-s3-server)")
        self.ctx = ctx
        self.base = ["bash", os.path.join(ctx.repo, "scripts/testnet.sh"), "--prefix", prefix, "--subnet", subnet]
        run(self.base + ["down"])  # what an interrupted run left
        run(self.base + ["up", "--workers", str(workers)])
        self.hosts = {}
        for line in run(self.base + ["hosts"]).splitlines():
            name, ns, addr = line.split()
            self.hosts[name] = (ns, addr)
        self.links = run(self.base + ["status"])
        origin = self.addr("origin")
        # lode-s3-server takes lode-testkit's test key.
        keys = {"AWS_ACCESS_KEY_ID": "lode-test-access", "AWS_SECRET_ACCESS_KEY": "lode-test-secret",
                "AWS_REGION": "us-east-1"}
        bucket = os.path.join(ctx.work, "s3", self.BUCKET)
        os.makedirs(bucket, exist_ok=True)
        env = dict(ctx.env, **keys)
        self.wait_ready(ctx.spawn([*self.on("origin"), ctx.s3_server, "--listen", f"0.0.0.0:{self.S3_PORT}",
                                   "--dir", os.path.dirname(bucket)], "s3-server.log", env=env), "s3-server.log")
        store = {"LODE_STORE": f"s3://{self.BUCKET}", **keys}
        # The origin's own view (publishing: a flattener beside the store) and the workers'.
        self.origin_env = dict(ctx.env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.S3_PORT}", **store)
        self.env = dict(ctx.env, AWS_ENDPOINT_URL=f"http://{origin}:{self.S3_PORT}", **store)
        reg = os.path.join(ctx.work, "registry")
        os.makedirs(reg, exist_ok=True)
        conf = os.path.join(ctx.work, "registry.yml")
        with open(conf, "w") as f:
            f.write(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {reg}\n"
                    f"http:\n  addr: 0.0.0.0:{self.REGISTRY_PORT}\n")
        ctx.spawn([*self.on("origin"), "docker-registry", "serve", conf], "registry.log")
        self.fleet_addrs = None

    def on(self, host):
        """Into the host's network namespace only. `ip netns exec` would also give the
        command a mount namespace of its own: an agent's FUSE mount would be out of `lode
        run`'s sight there, and a server started so would hold copies of the agents' FUSE
        mounts, which keeps those agents from ending."""
        return ["nsenter", f"--net=/run/netns/{self.hosts[host][0]}"]

    def addr(self, host):
        return self.hosts[host][1]

    def wait_ready(self, proc, logname, word="listening"):
        path = os.path.join(self.ctx.work, logname)
        deadline = time.time() + 30
        while time.time() < deadline:
            if proc.poll() is not None:
                raise Fail(f"{logname[:-4]} exited {proc.returncode}; see {path}")
            with open(path, errors="replace") as f:
                if word in f.read():
                    return
            time.sleep(0.05)
        raise Fail(f"{logname[:-4]} did not say {word!r} within 30 s; see {path}")

    def wait_port(self, host, port):
        probe = f"import socket,time\nfor _ in range(400):\n  try: socket.create_connection(('{self.addr(host)}', {port}), 1).close(); break\n  except OSError: time.sleep(0.05)\nelse: raise SystemExit(1)"
        run([*self.on("worker1"), "/usr/bin/python3", "-c", probe])

    def publish_json(self, *args):
        return json.loads(run([*self.on("origin"), self.ctx.lode, "--json", "-q", *args], env=self.origin_env))

    def lode(self, host, *args):
        return run([*self.on(host), self.ctx.lode, "-q", *args], env=self.env)

    def fleet(self):
        if self.fleet_addrs is None:
            self.fleet_addrs = []
            for i in range(1, 7):
                host = f"cache{i}"
                self.ctx.spawn([*self.on(host), self.ctx.lode, "-q", "cache-node", "--listen",
                                f"0.0.0.0:{self.NODE_PORT}", "--memory", "1GiB"], f"node-net-{i}.log")
                self.fleet_addrs.append(f"{self.addr(host)}:{self.NODE_PORT}")
            for i in range(1, 7):
                self.wait_port(f"cache{i}", self.NODE_PORT)
        return self.fleet_addrs

    def agent(self, name, host, az=None, caches=None, prefetch=True):
        conf = os.path.join(self.ctx.work, f"agent-{name}.toml")
        with open(conf, "w") as f:
            # Demand only: no working set fetched, no readahead.
            f.write("" if prefetch else "[prefetch]\nworking_set = false\nreadahead_max_chunks = 0\n")
        return Agent(self.ctx, name, az=az, caches=caches, host=self.on(host), env=self.env, config=conf)

    def down(self):
        run(self.base + ["down"])


def pull_over_net(ctx, net, tag, how):
    """A full pull on worker1 over its link, then the command from local disk:
    `export` is `lode export` of the flattened image from the S3 origin, then a loop
    mount; `registry` is `skopeo copy` from the registry on the origin host into a local
    OCI layout, then `umoci raw unpack`. Scratch on tmpfs, as in section 5."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else ctx.work
    root = os.path.join(base, f"lode-eval-net-{tag}")
    img = os.path.join(base, f"lode-eval-net-{tag}.ext4")
    oci = os.path.join(base, f"lode-eval-net-{tag}.oci")
    mounted = []
    try:
        drop_caches()
        t0 = time.perf_counter()
        if how == "export":
            net.lode("worker1", "export", tag, img)
            os.makedirs(root, exist_ok=True)
            run(["mount", "-o", "loop", img, root])
            mounted.append(root)
        else:
            src = f"docker://{net.addr('origin')}:{net.REGISTRY_PORT}/lode/{tag}:latest"
            run([*net.on("worker1"), "skopeo", "copy", "-q", "--src-tls-verify=false", src, f"oci:{oci}:{tag}"])
            run(["umoci", "raw", "unpack", "--image", f"{oci}:{tag}", root])
        pulled = time.perf_counter() - t0
        for fs, where in (("proc", "proc"), ("tmpfs", "tmp")):
            os.makedirs(os.path.join(root, where), exist_ok=True)
            run(["mount", "-t", fs, fs, os.path.join(root, where)])
            mounted.append(os.path.join(root, where))
        run([shutil.which("chroot") or "/usr/sbin/chroot", root, *COMMANDS[tag]],
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root"})
        return {"pull_secs": pulled, "total_secs": time.perf_counter() - t0}
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", m], check=False)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(oci, ignore_errors=True)
        if os.path.exists(img):
            os.unlink(img)


AZ_FETCH_TEST = "measure_az_fetch_against_round_trip_and_plain_memcached_and_origin_fetch"


def az_fetch_on_network(ctx):
    """The AZ tier's chunk fetch against the link's round trip and a plain memcached get
    of the same bytes, on a test network of its own: the measurement in
    crates/lode/tests/network.rs (release build), its printed p50/p99 parsed."""
    e = dict(os.environ, CARGO_TARGET_DIR=os.environ.get("CARGO_TARGET_DIR", os.path.join(ctx.repo, "target")),
             LODE_REQUIRE_TOOLS="1")
    cmd = ["cargo", "test", "-q", "--release", "--locked", "-p", "lode", "--test", "network", AZ_FETCH_TEST, "--",
           "--ignored", "--nocapture", "--exact"]
    log(f"network: {' '.join(cmd)}")
    p = subprocess.run(cmd, env=e, cwd=ctx.repo, text=True, capture_output=True)
    if p.returncode != 0:
        raise Fail(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-2000:]}")
    rows = {}
    for m in re.finditer(r"^\s+(.+?):\s+p50 ([\d.]+) ms, p99 ([\d.]+) ms$", p.stderr, re.M):
        rows[m[1]] = {"p50_ms": float(m[2]), "p99_ms": float(m[3])}
    if len(rows) < 6:
        raise Fail(f"the AZ fetch measurement printed {len(rows)} of 6 rows: {p.stderr[-2000:]}")
    return {"command": " ".join(cmd), "rows": rows}


def section_network(ctx):
    """9: section 2's starts and section 4's replay again, over scripts/testnet.sh."""
    q = ctx.quick
    runs = 2 if q else 3
    net = TestNet(ctx)
    out = {"runs": runs, "commands": COMMANDS, "links": net.links, "images": {}}
    try:
        for t in FAMILY:
            log(f"network: publishing {t} to the origin (S3) and its registry")
            net.publish_json("flatten", f"oci:{ctx.layout}:{t}", "--tag", t, "--work-dir", os.path.join(ctx.work, "tmp"))
            run([*net.on("origin"), "skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{ctx.layout}:{t}",
                 f"docker://127.0.0.1:{net.REGISTRY_PORT}/lode/{t}:latest"])
        nodes = net.fleet()
        for t in FAMILY:
            size = net.publish_json("inspect", t)["device_size"]
            rec = {"image_size": size, "demand": [], "working_set": [], "az": [], "export": [], "registry": []}
            # The recording start: a fresh agent, no record yet, so it records this start.
            net.lode("origin", "prefetch", "clear", t)
            a = net.agent(f"net-record-{t}", "worker1").start()
            secs, d = a.start_fn(t, COMMANDS[t])
            a.wipe()
            rec["recording"] = {"secs": secs, **d}
            rec["inspect"] = net.publish_json("inspect", t).get("working_set")
            # The AZ fleet filled with this image once.
            a = net.agent(f"net-fill-{t}", "worker2", az=nodes).start()
            a.start_fn(t, COMMANDS[t])
            a.wipe()
            for r in range(runs):
                log(f"network: {t} run {r + 1}/{runs}")
                for state, kw in (("demand", {"prefetch": False}), ("working_set", {}),
                                  ("az", {"az": nodes, "prefetch": False})):
                    a = net.agent(f"net-{state}-{t}", "worker1", **kw).start()
                    drop_caches()
                    secs, d = a.start_fn(t, COMMANDS[t])
                    rec[state].append({"secs": secs, **d, "prefetch": a.stats().get("prefetch")})
                    a.wipe()
                rec["export"].append(pull_over_net(ctx, net, t, "export"))
                rec["registry"].append(pull_over_net(ctx, net, t, "registry"))
            out["images"][t] = rec
        ctx.stop_all()
        net.down()
        net = None
        net = TestNet(ctx)  # a fresh fleet (and origin server) for the replay
        out["replay"] = replay(ctx, nfun=16 if q else 24, nstart=120 if q else 240, net=net)
    finally:
        ctx.stop_all()
        if net:
            net.down()
    out["az_fetch"] = az_fetch_on_network(ctx)
    ctx.save("network", out)


# ------------------------------------------------------------------ 5: peers


def cargo_bench(ctx, package, bench, env, extra=()):
    e = dict(os.environ, **env)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ctx.repo, "target"))
    e["CARGO_TARGET_DIR"] = target
    cmd = ["cargo", "bench", "-q", "--locked", "-p", package, "--bench", bench] + (["--", *extra] if extra else [])
    log(f"peers: {' '.join(cmd)} {env}")
    t0 = time.perf_counter()
    out = run(cmd, env=e, cwd=ctx.repo)
    return out, time.perf_counter() - t0, " ".join([f"{k}={v}" for k, v in env.items()] + cmd)


def section_peers(ctx):
    out = {}
    secs = "2" if ctx.quick else "5"
    text, took, cmd = cargo_bench(ctx, "lode-nbd", "read_latency", {"LODE_BENCH_SECS": secs})
    rows = []
    for m in re.finditer(r"^(tcp|unix)\s+(\d+) \|\s*([\d.]+)µs\s+([\d.]+)µs\s+(\d+) \|\s*([\d.]+)µs\s+([\d.]+)µs\s+(\d+) \|",
                         text, re.M | re.I):
        rows.append({"link": m[1], "qd": int(m[2]), "lode_p50": float(m[3]), "lode_p99": float(m[4]),
                     "lode_iops": float(m[5]), "nbdkit_p50": float(m[6]), "nbdkit_p99": float(m[7]),
                     "nbdkit_iops": float(m[8])})
    if not rows:
        raise Fail(f"no result rows in the lode-nbd bench output:\n{text}")
    out["nbd"] = {"rows": rows, "command": cmd, "secs": took, "raw": text}

    env = {"LODE_BENCH_SECS": "1" if ctx.quick else "3", "LODE_BENCH_ROUNDS": "3" if ctx.quick else "5"}
    text, took, cmd = cargo_bench(ctx, "lode-cache-node", "node_vs_memcached", env)
    rows = []
    for m in re.finditer(r"^(SET|GET)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", text, re.M):
        rows.append({"op": m[1], "lode_ops": float(m[2]), "memcached_ops": float(m[3]), "lode_p50": float(m[5]),
                     "memcached_p50": float(m[6]), "lode_p99": float(m[7]), "memcached_p99": float(m[8])})
    if len(rows) != 2:
        raise Fail(f"no median rows in the cache node bench output:\n{text}")
    out["cache_node"] = {"rows": rows, "command": cmd, "secs": took, "raw": text}

    # The agent's whole read path against nbdkit serving the same image file.
    md = os.path.join(ctx.work, "bench-agent.md")
    env = dict(ctx.env, OUT=md, LODE=ctx.lode, LAYOUT=ctx.layout, SECTIONS="warm",
               SECS="2" if ctx.quick else "10", RUNS="3")
    env.pop("LODE_HOME", None)
    log("peers: scripts/bench-agent.sh (warm reads, agent against nbdkit)")
    t0 = time.perf_counter()
    run(["bash", os.path.join(ctx.repo, "scripts/bench-agent.sh")], env=env)
    with open(md) as f:
        text = f.read()
    rows = []
    for m in re.finditer(r"^\| (\d+) \| ([\d,]+) \| ([\d,]+) \| \*\*([\d.]+)\*\* \| ([\d.]+) µs \| ([\d.]+) µs \|", text, re.M):
        rows.append({"qd": int(m[1]), "lode_iops": float(m[2].replace(",", "")),
                     "nbdkit_iops": float(m[3].replace(",", "")), "lode_p50": float(m[5]), "nbdkit_p50": float(m[6])})
    seq = []
    for m in re.finditer(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| \*\*([\d.]+)\*\* \|\s*$", text, re.M):
        seq.append({"qd": int(m[1]), "lode_gbs": float(m[2]), "nbdkit_gbs": float(m[3])})
    if not rows or not seq:
        raise Fail(f"no result rows in bench-agent.sh's report {md}:\n{text}")
    out["agent"] = {"rand4k": rows, "seq1m": seq, "secs": time.perf_counter() - t0,
                    "command": f"SECTIONS=warm SECS={env['SECS']} RUNS={env['RUNS']} scripts/bench-agent.sh"}
    # Sealing a chunk against the `ring` primitives alone (Criterion).
    secs = "2" if ctx.quick else "5"
    text, took, cmd = cargo_bench(ctx, "lode-format", "seal", {}, ["--warm-up-time", "1", "--measurement-time", secs])
    seal = {}
    for m in re.finditer(r"seal_512KiB/(\w+)\s+time:\s+\[[\d.]+ \S+ ([\d.]+) (\S+)", text):
        scale = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3}[m[3]]
        seal[m[1]] = float(m[2]) * scale
    # The evaluation compares the primitives with v2 sealed as is (the same work, cut into
    # segments) and shows what lz4, new images' codec, adds on text.
    if not {"ring_primitives_alone", "v2_none_32KiB_noise", "v2_lz4_16KiB_text"} <= set(seal):
        raise Fail(f"no Criterion estimates in the seal bench output:\n{text}")
    out["seal"] = {"us_per_chunk": seal, "command": cmd, "secs": took}

    # A chunk through the AZ client (k=4 m=2, rebuilt and name-checked) against a plain
    # memcached get of the same 512 KiB.
    text, took, cmd = cargo_bench(ctx, "lode-az", "fetch", {"LODE_BENCH_SECS": secs})
    fetch = {}
    for m in re.finditer(r"^(AZ client k=\d m=\d|plain memcached get|k=4 m=2, one node stopped)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s*$",
                         text, re.M):
        fetch[m[1]] = {"p50": float(m[2]), "p99": float(m[3]), "p999": float(m[4]), "reads_per_s": float(m[5])}
    if "AZ client k=4 m=2" not in fetch or "plain memcached get" not in fetch:
        raise Fail(f"no result rows in the AZ fetch bench output:\n{text}")
    out["az_fetch"] = {"rows": fetch, "command": cmd, "secs": took}

    out["import"] = import_vs_cp(ctx)
    ctx.save("peers", out)


def import_vs_cp(ctx):
    """`lode import` of a raw image whose second half repeats the first, against `cp` of
    the same file into the same filesystem, both timed with the final sync."""
    mib = 1024 if ctx.quick else 2048
    runs = 3
    d = os.path.join(ctx.work, "import")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    img = os.path.join(d, "image.raw")
    half = os.urandom(mib // 2 << 20)
    with open(img, "wb") as f:
        f.write(half)
        f.write(half)
    del half
    lode_s, cp_s, stored = [], [], None
    for r in range(runs):
        log(f"peers: import {mib} MiB against cp, run {r + 1}/{runs}")
        store = os.path.join(d, "store")
        shutil.rmtree(store, ignore_errors=True)
        os.sync()
        t0 = time.perf_counter()
        res = json.loads(run([ctx.lode, "--json", "-q", "--store", store, "--kms", ctx.kms, "import", img, "--tag", "i"],
                             env=ctx.env))
        os.sync()
        lode_s.append(time.perf_counter() - t0)
        stored = res["stats"]["uploaded_bytes"]
        copy = os.path.join(d, "copy.raw")
        os.sync()
        t0 = time.perf_counter()
        run(["cp", img, copy])
        os.sync()
        cp_s.append(time.perf_counter() - t0)
        os.unlink(copy)
    shutil.rmtree(d)
    return {"mib": mib, "runs": runs, "lode_secs": lode_s, "cp_secs": cp_s, "stored": stored}


# ------------------------------------------------------------------ 7: snapshot


def section_snapshot(ctx):
    env = ({"RUNS": "3", "SNAP_MIB": "64", "KEYS": "75000", "QUERIES": "500"} if ctx.quick
           else {"RUNS": "5", "SNAP_MIB": "256", "KEYS": "300000", "QUERIES": "2000"})
    text, took, cmd = cargo_bench(ctx, "lode-snap", "restore", env)
    lat, restore = [], []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        # tier | served by | faults | zero faults | segments fetched | chunks | tier hits | p50 | p99
        if len(cells) == 9 and cells[0] in ("memory", "disk", "az", "origin") and cells[1] not in ("lazy",):
            try:
                lat.append({"tier": cells[0], "faults": int(cells[2]), "segments": int(cells[4]),
                            "p50_us": float(cells[7]), "p99_us": float(cells[8])})
            except ValueError:
                pass
        if len(cells) == 8 and cells[1] in ("lazy", "lazy+prefetch", "eager"):
            num = lambda s: None if s == "-" else float(s)
            restore.append({"tier": cells[0], "mode": cells[1], "faults": num(cells[2]), "demand_segments": num(cells[3]),
                            "prefetched": num(cells[4]), "mib": num(cells[5]), "first_ms": num(cells[6]),
                            "all_ms": num(cells[7])})
    if len(lat) != 4 or len(restore) != 12:
        raise Fail(f"unexpected lode-snap bench output ({len(lat)} latency rows, {len(restore)} restore rows):\n{text}")
    ctx.save("snapshot", {"latency": lat, "restore": restore, "knobs": env, "command": cmd, "secs": took, "raw": text})


# ------------------------------------------------------------------ 8: the fixed cost of a start

def tiny_tree(root):
    """A root of busybox-static and nothing else: a start that reads almost nothing, so
    what remains is lode's fixed cost."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise Fail("startcost needs busybox-static (apt-get install busybox-static)")
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "etc", "proc", "dev", "tmp"):
        os.makedirs(os.path.join(root, d))
    shutil.copy(busybox, os.path.join(root, "bin", "busybox"))
    for applet in ("sh", "true"):
        os.symlink("busybox", os.path.join(root, "bin", applet))
    with open(os.path.join(root, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    with open(os.path.join(root, "etc", "group"), "w") as f:
        f.write("root:x:0:\n")


def section_startcost(ctx):
    """`lode run` of a tiny image whose chunks are all warm in the agent, with the chroot
    and the crun runtime, against a chroot of the same tree unpacked on local disk; the
    three interleaved, so that load from elsewhere falls on all of them alike.
    STARTCOST_BASELINE=PATH adds the lode binary of an earlier commit, with an agent of
    its own on the same store, timed from outside only (it may predate `run --json`);
    STARTCOST_BASELINE_NAME says in the report what it is."""
    rounds = 30 if ctx.quick else 100
    tree = os.path.join(ctx.work, "startcost-tree")
    tiny_tree(tree)
    img = os.path.join(ctx.work, "startcost.ext4")
    run(["mkfs.ext4", "-q", "-F", "-d", tree, img, "8M"])
    ctx.lode_json("import", img, "--tag", "startcost-tiny")
    os.unlink(img)
    cmd = ["/bin/true"]
    agent = Agent(ctx, "startcost").start()
    baseline = os.environ.get("STARTCOST_BASELINE")
    old_agent = None
    if baseline:
        old_agent = Agent(ctx, "startcost-baseline", lode=os.path.realpath(baseline)).start()
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"

    def lode_run(runtime):
        t0 = time.perf_counter()
        out = run([ctx.lode, "--json", "-q", "run", "--control", agent.control, "--runtime", runtime,
                   "startcost-tiny", "--", *cmd], env=ctx.env)
        wall = time.perf_counter() - t0
        rep = json.loads(out)
        if rep["exit_code"] != 0:
            raise Fail(f"startcost: lode run ({runtime}) exited {rep['exit_code']}")
        return {"wall_ms": wall * 1000, **rep["timings"]}

    def plain_chroot():
        t0 = time.perf_counter()
        run([chroot, tree, *cmd])
        return {"wall_ms": (time.perf_counter() - t0) * 1000}

    def lode_version():
        t0 = time.perf_counter()
        run([ctx.lode, "--version"])
        return {"wall_ms": (time.perf_counter() - t0) * 1000}

    def baseline_run(runtime):
        t0 = time.perf_counter()
        run([old_agent.lode, "-q", "run", "--control", old_agent.control, "--runtime", runtime,
             "startcost-tiny", "--", *cmd], env=ctx.env)
        return {"wall_ms": (time.perf_counter() - t0) * 1000}

    sides = {"chroot": plain_chroot, "lode_chroot": lambda: lode_run("chroot"),
             "lode_crun": lambda: lode_run("crun"), "lode_version": lode_version}
    if old_agent:
        sides["baseline_chroot"] = lambda: baseline_run("chroot")
        sides["baseline_crun"] = lambda: baseline_run("crun")
    out = {"rounds": rounds, "run_command": cmd, "image_size": 8 << 20,
           "bench_command": ctx.args.command or " ".join(sys.argv),
           "tree_bytes": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tree) for f in fs
                             if not os.path.islink(os.path.join(d, f))),
           "samples": {k: [] for k in sides}}
    try:
        for f in sides.values():  # warm: chunks in the agent's caches, files in the page cache
            f()
            f()
        for r in range(rounds):
            if r % 10 == 0:
                log(f"startcost: round {r + 1}/{rounds}")
            for name, f in sides.items():
                out["samples"][name].append(f())
    finally:
        agent.wipe()
        if old_agent:
            old_agent.wipe()
    if baseline:
        out["baseline"] = {"binary": os.environ.get("STARTCOST_BASELINE_NAME", baseline),
                           "version": run([baseline, "--version"]).strip()}
    ctx.save("startcost", out)


SECTIONS = {
    "dedup": section_dedup,
    "starts": section_starts,
    "replay": section_replay,
    "peers": section_peers,
    "snapshot": section_snapshot,
    "startcost": section_startcost,
    "network": section_network,
    "vm": section_vm,
    "scale": section_scale,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the quick subset (fewer runs, starts and seconds)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of: " + ", ".join(SECTIONS))
    p.add_argument("--lode", required=True, help="the lode binary")
    p.add_argument("--s3-server", help="lode-testkit's lode-s3-server binary (section network)")
    p.add_argument("--layout", required=True, help="the image family's OCI layout")
    p.add_argument("--work", required=True, help="scratch directory (stores, agent state)")
    p.add_argument("--results", required=True, help="where each section's JSON goes")
    p.add_argument("--command", help="the command line to record as the one that ran (bench.sh passes its own)")
    args = p.parse_args()
    ctx = Ctx(args)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in wanted:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}: choose from {', '.join(SECTIONS)}")
    started = time.perf_counter()
    machine = machine_facts(ctx, args.command or " ".join(sys.argv))
    try:
        for s in wanted:
            t0 = time.perf_counter()
            log(f"== section {s}")
            SECTIONS[s](ctx)
            log(f"== section {s} took {time.perf_counter() - t0:.0f} s")
    except Fail as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        ctx.stop_all()
    invocation = {"command": machine.pop("command"), "date": machine["date"], "sections": wanted,
                  "secs": round(time.perf_counter() - started)}
    try:
        machine["invocations"] = ctx.load("machine").get("invocations", []) + [invocation]
    except (OSError, ValueError):
        machine["invocations"] = [invocation]
    ctx.save("machine", machine)
    return 0


def machine_facts(ctx, command):
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, text=True, capture_output=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    flags = sh("grep -m1 '^flags' /proc/cpuinfo")
    extras = [f for f in ("aes", "sha_ni", "vaes", "avx2") if f" {f}" in flags]
    mem = sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo")
    tools = "; ".join(x for x in (
        sh("nbdkit --version | head -1"), sh("memcached -V"), sh("fio --version"), sh("umoci --version"),
        sh("mke2fs -V 2>&1 | head -1"), sh("crun --version | head -1"), sh("rustc --version"),
    ) if x)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command,
        "commit": sh(f"git -C {ctx.repo} rev-parse --short HEAD") + (" (with local changes)" if sh(f"git -C {ctx.repo} status --porcelain --untracked-files=no") else ""),
        "host": sh("uname -n") + (" (virtualisation: " + sh("systemd-detect-virt") + ")" if sh("systemd-detect-virt") not in ("", "none") else ""),
        "kernel": sh("uname -r"),
        "cpu": f"{cpu} ({', '.join(extras)})",
        "cores": str(os.cpu_count()),
        "memory": mem,
        "disk": sh(f"df -h --output=source,fstype,size {ctx.work} | tail -1"),
        "tools": tools,
        "quick": ctx.quick,
    }


if __name__ == "__main__":
    sys.exit(main())

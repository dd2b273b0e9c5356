#!/usr/bin/python3
"""Garbage collection measured on the image family, in one run (scripts/bench-gc.sh is the
entry point: it installs what is missing, builds lode and finds the family).

  copy     copy-forward throughput against the naive re-encryption (export, then import
           after a rotation), MiB/s of plaintext, median of N runs on fresh stores
  reclaim  bytes reclaimed: dead bytes before, stored bytes before minus after, gc's
           reclaimed bytes; the script fails if they do not add up
  readers  random 4 KiB reads through the agent (NBD, caches off so every read reaches
           the store), idle and while copy-forward runs on the same store: p50/p99

Every part starts from a copy of one store the family was flattened into once: a fresh
store each time, identical to the others.
"""

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

FAMILY = ["base", "python", "pyweb", "node", "gcc"]
MIB = 1 << 20


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Fail(Exception):
    pass


def run(cmd, **kw):
    """Runs cmd, raising Fail with its stderr if it fails; returns stdout."""
    p = subprocess.run([str(c) for c in cmd], text=True, capture_output=True, **kw)
    if p.returncode != 0:
        raise Fail(f"{' '.join(map(str, cmd))} exited {p.returncode}: {p.stderr[-2000:]}")
    return p.stdout


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def percentile(sorted_xs, p):
    if not sorted_xs:
        return None
    i = min(len(sorted_xs) - 1, max(0, round(p / 100 * len(sorted_xs)) - 1))
    return sorted_xs[i]


class Bench:
    def __init__(self, args):
        self.quick = args.quick
        self.lode = os.path.realpath(args.lode)
        self.layout = os.path.realpath(args.layout)
        self.work = os.path.realpath(args.work)
        self.kms = os.path.join(self.work, "keyring.json")
        self.pristine = os.path.join(self.work, "pristine")
        self.reps = 1 if args.quick else 3
        self.window = 10 if args.quick else 20
        self.env = dict(os.environ, LODE_HOME=os.path.join(self.work, "home"))
        for k in ("LODE_STORE", "LODE_KMS", "LODE_KMS_KEY", "LODE_AGENT_CONTROL", "LODE_AGENT_CONFIG",
                  "LODE_GC_GRACE", "LODE_FAILPOINT"):
            self.env.pop(k, None)
        self.tags = []

    def lode_cmd(self, store, *args):
        return [self.lode, "--json", "-q", "--store", store, "--kms", self.kms, *args]

    def lode_json(self, store, *args):
        return json.loads(run(self.lode_cmd(store, *args), env=self.env))

    def stats(self, store):
        return self.lode_json(store, "store", "stats")

    # ---------------------------------------------------------------- the family's store

    def flatten_family(self):
        listed = run(["umoci", "ls", "--layout", self.layout]).split()
        self.tags = [t for t in FAMILY if t in listed] or listed
        if len(self.tags) < 2:
            raise Fail(f"the layout {self.layout} has {self.tags}: the family needs at least two images")
        os.makedirs(self.pristine)
        images, t_all = [], time.perf_counter()
        for tag in self.tags:
            log(f"flattening {tag} into the family's store")
            t0 = time.perf_counter()
            r = self.lode_json(self.pristine, "flatten", f"oci:{self.layout}:{tag}", "--tag", tag,
                               "--work-dir", os.path.join(self.work, "tmp"))
            images.append({"tag": tag, "secs": time.perf_counter() - t0, "image_size": r["image_size"],
                           "chunks": r["stats"]["chunks"], "zero_chunks": r["stats"]["zero_chunks"],
                           "stored_plain_bytes": r["stats"]["stored_plain_bytes"],
                           "uploaded_bytes": r["stats"]["uploaded_bytes"]})
        os.sync()
        st = self.stats(self.pristine)
        return {"images": images, "secs": time.perf_counter() - t_all, "stored_bytes": st["stored_bytes"],
                "logical_bytes": st["logical_bytes"], "device_bytes": st["device_bytes"], "chunks": st["chunks"]}

    def fresh_store(self, name):
        """A copy of the family's store: what flattening the family again would give."""
        dst = os.path.join(self.work, name)
        shutil.rmtree(dst, ignore_errors=True)
        run(["cp", "-a", self.pristine, dst])
        return dst

    # ---------------------------------------------------------------- 1: copy-forward vs naive

    def copy_forward_once(self, store):
        drop_caches()
        t0 = time.perf_counter()
        rot = self.lode_json(store, "root", "rotate")
        r = self.lode_json(store, "root", "copy-forward", str(rot["retired"]))
        os.sync()
        secs = time.perf_counter() - t0
        self.check_all_moved(store, rot["active"], "copy-forward")
        return {"secs": secs, "bytes": r["bytes"], "chunks": r["chunks"], "moved": len(r["moved"]),
                "from": r["from"], "to": r["to"]}

    def naive_once(self, store):
        drop_caches()
        tmp = os.path.join(self.work, "naive-image.raw")
        t0 = time.perf_counter()
        rot = self.lode_json(store, "root", "rotate")
        plain, chunks, uploaded = 0, 0, 0
        for tag in self.tags:
            run(self.lode_cmd(store, "export", tag, tmp), env=self.env)
            imp = self.lode_json(store, "import", tmp, "-t", tag)
            os.unlink(tmp)
            plain += imp["stats"]["stored_plain_bytes"]
            chunks += imp["stats"]["chunks"] - imp["stats"]["zero_chunks"]
            uploaded += imp["stats"]["uploaded_bytes"]
        os.sync()
        secs = time.perf_counter() - t0
        self.check_all_moved(store, rot["active"], "the naive re-encryption")
        return {"secs": secs, "bytes": plain, "chunks": chunks, "uploaded_bytes": uploaded}

    def check_all_moved(self, store, active, what):
        st = self.stats(store)
        root = next((r for r in st["per_root"] if r["root"] == active), None)
        if root is None or root["live_manifests"] != len(self.tags):
            raise Fail(f"after {what} the active root {active} holds {root and root['live_manifests']} live "
                       f"manifests, not {len(self.tags)}: {json.dumps(st['per_root'])}")

    def part_copy(self):
        cf, naive = [], []
        for rep in range(self.reps):
            log(f"copy: run {rep + 1}/{self.reps}: rotate + copy-forward")
            s = self.fresh_store("copy-cf")
            cf.append(self.copy_forward_once(s))
            shutil.rmtree(s)
            log(f"copy: run {rep + 1}/{self.reps}: rotate + export/import of each image")
            s = self.fresh_store("copy-naive")
            naive.append(self.naive_once(s))
            shutil.rmtree(s)
            log(f"copy: copy-forward {cf[-1]['bytes'] / MIB / cf[-1]['secs']:.0f} MiB/s, "
                f"naive {naive[-1]['bytes'] / MIB / naive[-1]['secs']:.0f} MiB/s")
        if {r["bytes"] for r in cf} != {r["bytes"] for r in naive}:
            raise Fail(f"copy-forward re-sealed {[r['bytes'] for r in cf]} plaintext bytes but the naive way "
                       f"{[r['bytes'] for r in naive]}: the two did not move the same images")
        cf_mibs = [r["bytes"] / MIB / r["secs"] for r in cf]
        nv_mibs = [r["bytes"] / MIB / r["secs"] for r in naive]
        return {"copy_forward": {"runs": cf, "mib_s": spread(cf_mibs), "secs": spread([r["secs"] for r in cf])},
                "naive": {"runs": naive, "mib_s": spread(nv_mibs), "secs": spread([r["secs"] for r in naive])},
                "plaintext_bytes": cf[0]["bytes"],
                "ratio_median": statistics.median(cf_mibs) / statistics.median(nv_mibs)}

    # ---------------------------------------------------------------- 2: bytes reclaimed

    def part_reclaim(self):
        s = self.fresh_store("reclaim")
        removed = self.tags[len(self.tags) - len(self.tags) // 2:]
        kept = [t for t in self.tags if t not in removed]
        for tag in removed:
            run(self.lode_cmd(s, "rm", tag), env=self.env)
        before = self.stats(s)
        if before["unreadable_holders"]:
            raise Fail(f"unreadable tags or pins: {before['unreadable_holders']}")
        old = [r for r in before["per_root"]]
        if len(old) != 1:
            raise Fail(f"the fresh store has {len(old)} roots, not one: {json.dumps(old)}")
        old_root = old[0]["root"]
        objects = root_objects(os.path.join(s, "roots", str(old_root)))
        rot = self.lode_json(s, "root", "rotate")
        t0 = time.perf_counter()
        p = subprocess.run(self.lode_cmd(s, "gc", "--grace", "0s"), text=True, capture_output=True, env=self.env)
        gc_secs = time.perf_counter() - t0
        if p.returncode != 0:
            raise Fail(f"lode gc exited {p.returncode}: {p.stderr[-2000:]}\n{p.stdout[-2000:]}")
        gc = json.loads(p.stdout)
        after = self.stats(s)
        for tag in kept:  # what gc kept must still be whole
            run(self.lode_cmd(s, "verify", tag), env=self.env)
        step = next(r for r in gc["roots"] if r["root"] == old_root)
        res = {
            "removed_tags": removed, "kept_tags": kept, "old_root": old_root, "new_root": rot["active"],
            "dead_bytes_per_root": {str(r["root"]): r["dead_bytes"] for r in before["per_root"]},
            "dead_bytes_before": before["dead_bytes"], "live_bytes_before": before["live_bytes"],
            "stored_bytes_before": before["stored_bytes"], "stored_bytes_after": after["stored_bytes"],
            "stored_difference": before["stored_bytes"] - after["stored_bytes"],
            "reclaimed_bytes": gc["reclaimed_bytes"], "deleted_objects": step["deleted_objects"],
            "copied_manifests": step["copied"], "old_root_state_after": step["after"],
            "old_root_objects": objects, "gc_secs": gc_secs, "gc_did": step["did"],
            "per_root_after": after["per_root"],
        }
        # The checks: each figure must be explained by the others, to the byte.
        problems = []
        if step["after"] != "deleted":
            problems.append(f"root {old_root} is {step['after']} after gc, not deleted ({step['waiting']})")
        if res["stored_difference"] != res["dead_bytes_before"]:
            problems.append(f"stored bytes fell by {res['stored_difference']} but {res['dead_bytes_before']} were "
                            f"dead (difference {res['stored_difference'] - res['dead_bytes_before']})")
        deletable = sum(v["bytes"] for k, v in objects.items() if k not in ("record", "forwards"))
        if objects.get("chunks", {}).get("bytes") != old[0]["stored_bytes"]:
            problems.append(f"root {old_root}'s chunk files hold {objects.get('chunks')} bytes but store stats "
                            f"says {old[0]['stored_bytes']}")
        if res["reclaimed_bytes"] != deletable:
            problems.append(f"gc reclaimed {res['reclaimed_bytes']} bytes, but root {old_root} held {deletable} "
                            f"bytes of objects other than its record and forwarding records ({objects})")
        new = next((r for r in after["per_root"] if r["root"] == rot["active"]), None)
        if new is None or new["stored_bytes"] != before["live_bytes"] or new["dead_bytes"] != 0:
            problems.append(f"the new root holds {new}: expected exactly the {before['live_bytes']} live bytes")
        res["checks"] = "ok" if not problems else problems
        shutil.rmtree(s)
        if problems:
            raise Fail("bytes reclaimed do not add up:\n  " + "\n  ".join(problems))
        return res

    # ---------------------------------------------------------------- 3: readers during gc

    def part_readers(self):
        s = self.fresh_store("readers")
        state = os.path.join(self.work, "agent")
        os.makedirs(state)
        control = os.path.join(state, "control.sock")
        agent_log = os.path.join(self.work, "agent.log")
        cache = ["--cache-decrypted", "0", "--cache-memory", "0", "--cache-disk", "0"]
        cmd = [self.lode, "-q", "--store", s, "--kms", self.kms, "agent", "--state-dir", state, "--no-files", *cache]
        with open(agent_log, "ab") as lf:
            agent = subprocess.Popen(cmd, env=self.env, stdout=lf, stderr=lf, start_new_session=True)
        try:
            wait_agent(self, agent, control, agent_log)
            image = "gcc" if "gcc" in self.tags else self.tags[-1]
            view = json.loads(run([self.lode, "--store", s, "--kms", self.kms, "inspect", image], env=self.env))
            run([self.lode, "-q", "attach", image, "--name", "reader", "--control", control], env=self.env)
            rot = self.lode_json(s, "root", "rotate")
            old_root = rot["retired"]
            iolog = os.path.join(self.work, "reads.iolog")
            stored = write_iolog(iolog, view, seed=11, reads=400_000)
            uri = f"nbd+unix:///reader?socket={os.path.join(state, 'nbd.sock')}"
            windows = {}
            for phase in ("idle", "copy_forward"):
                drop_caches()
                st0 = agent_stats(self, control)
                passes, stop = [], threading.Event()
                bg = None
                if phase == "copy_forward":
                    bg = threading.Thread(target=self.copy_forward_loop, args=(s, old_root, passes, stop))
                    bg.start()
                    wait_until(lambda: passes, 30, "copy-forward to start")
                log(f"readers: {self.window} s of random 4 KiB reads of {image}, {phase}")
                lat = run_fio(self, uri, iolog, self.window, os.path.join(self.work, f"fio-{phase}"))
                stop.set()
                if bg:
                    bg.join()
                st1 = agent_stats(self, control)
                windows[phase] = summarise_window(lat, passes, st0, st1, phase)
            if agent.poll() is not None:
                raise Fail(f"the agent exited {agent.returncode} during the reads; see {agent_log}")
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    agent.kill()
        shutil.rmtree(s)
        idle, busy = windows["idle"], windows["copy_forward"]
        return {"image": image, "device_size": view["device_size"], "stored_chunks": stored,
                "chunk_size": view["chunk_size"], "cache": " ".join(cache), "window_secs": self.window,
                "idle": idle, "copy_forward": busy,
                "p50_ratio": busy["p50_us"] / idle["p50_us"], "p99_ratio": busy["p99_us"] / idle["p99_us"]}

    def copy_forward_loop(self, store, first_root, passes, stop):
        """Copy-forward passes back to back until stop: first the retired root the reader
        reads from (every family image), then rotate and copy the root just filled, again."""
        root = first_root
        while not stop.is_set():
            t0 = time.time()
            p = subprocess.Popen(self.lode_cmd(store, "root", "copy-forward", str(root)), env=self.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            while p.poll() is None:
                if stop.wait(0.05):
                    p.terminate()  # safe: copy-forward resumes where it stopped
            out, err = p.communicate()
            t1 = time.time()
            if p.returncode == 0:
                r = json.loads(out)
                passes.append({"root": root, "start": t0, "end": t1, "bytes": r["bytes"], "finished": True})
            elif stop.is_set():
                passes.append({"root": root, "start": t0, "end": t1, "bytes": None, "finished": False})
                return
            else:
                log(f"readers: copy-forward of root {root} failed: {err[-1000:]}")
                passes.append({"root": root, "start": t0, "end": t1, "error": err[-1000:], "finished": False})
                return
            if stop.is_set():
                return
            root = self.lode_json(store, "root", "rotate")["retired"]


def root_objects(root_dir):
    """Files under a local store's root directory, by kind (its first path part): count
    and bytes. Staging files (a '#' in the name) are left out."""
    kinds = {}
    for d, _, files in os.walk(root_dir):
        rel = os.path.relpath(d, root_dir)
        for name in files:
            if "#" in name:
                continue
            first = name if rel == "." else rel.split(os.sep)[0]
            kind = {"ROOT": "record"}.get(first, first)
            k = kinds.setdefault(kind, {"count": 0, "bytes": 0})
            k["count"] += 1
            k["bytes"] += os.path.getsize(os.path.join(d, name))
    return kinds


def wait_until(pred, secs, what):
    deadline = time.time() + secs
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise Fail(f"timed out waiting for {what}")


def wait_agent(b, agent, control, agent_log):
    deadline = time.time() + 30
    while time.time() < deadline:
        if agent.poll() is not None:
            raise Fail(f"the agent exited {agent.returncode}; see {agent_log}")
        if os.path.exists(control):
            try:
                agent_stats(b, control)
                return
            except Fail:
                pass
        time.sleep(0.05)
    raise Fail(f"the agent did not answer on {control} within 30 s; see {agent_log}")


def agent_stats(b, control):
    return json.loads(run([b.lode, "stats", "--json", "--control", control], env=b.env))


def write_iolog(path, view, seed, reads):
    """fio's replay log: `reads` random 4 KiB reads, each inside a random stored (non-zero)
    chunk, so that every read is one the store must serve."""
    cs, size = view["chunk_size"], view["device_size"]
    stored = [i for i, c in enumerate(view["chunks"]) if c is not None]
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write("fio version 2 iolog\nnbd add\nnbd open\n")
        for _ in range(reads):
            i = rng.choice(stored)
            pages = max(1, (min(cs, size - i * cs)) // 4096)
            f.write(f"nbd read {i * cs + rng.randrange(pages) * 4096} 4096\n")
        f.write("nbd close\n")
    return len(stored)


def run_fio(b, uri, iolog, secs, prefix):
    """Replays the reads at queue depth 1 for `secs` seconds; returns (unix time s, µs)
    for each read, from fio's per-read completion-latency log."""
    run(["fio", "--name=reader", "--ioengine=nbd", f"--uri={uri}", f"--read_iolog={iolog}", "--iodepth=1",
         f"--runtime={secs}", "--replay_no_stall=1", f"--write_lat_log={prefix}", "--log_avg_msec=0",
         "--log_unix_epoch=1", "--output-format=json", f"--output={prefix}.json"], env=b.env)
    lat = []
    with open(f"{prefix}_clat.1.log") as f:
        for line in f:
            cells = line.split(",")
            lat.append((int(cells[0]) / 1000, int(cells[1]) / 1000))
    if not lat:
        raise Fail(f"fio logged no reads ({prefix}.json)")
    return lat


def summarise_window(lat, passes, st0, st1, phase):
    if phase == "copy_forward":
        spans = [(p["start"], p["end"]) for p in passes]
        inside = [us for t, us in lat if any(a <= t <= e for a, e in spans)]
        covered = sum(min(e, lat[-1][0]) - max(a, lat[0][0]) for a, e in spans if e > lat[0][0] and a < lat[-1][0])
    else:
        inside, covered = [us for _, us in lat], None
    if not inside:
        raise Fail(f"no read completed {'during copy-forward' if phase != 'idle' else ''}")
    xs = sorted(inside)
    span = lat[-1][0] - lat[0][0]
    t0 = {t["name"]: t for t in st0["tiers"]}
    tiers = {t["name"]: {"hits": t["hits"] - t0.get(t["name"], {}).get("hits", 0),
                         "bytes": t["bytes"] - t0.get(t["name"], {}).get("bytes", 0)} for t in st1["tiers"]}
    out = {"reads": len(xs), "reads_in_window": len(lat), "window_secs": span,
           "iops": len(lat) / span if span > 0 else None,
           "p50_us": percentile(xs, 50), "p90_us": percentile(xs, 90), "p99_us": percentile(xs, 99),
           "p999_us": percentile(xs, 99.9), "max_us": xs[-1], "mean_us": statistics.fmean(xs), "tiers": tiers}
    if phase == "copy_forward":
        out["passes"] = passes
        out["copy_forward_share_of_window"] = covered / span if span > 0 else None
        done = [p for p in passes if p.get("finished")]
        out["finished_passes"] = len(done)
        if done:
            out["pass_mib_s"] = [p["bytes"] / MIB / (p["end"] - p["start"]) for p in done]
    return out


# ---------------------------------------------------------------- the report


def machine_facts(work):
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, text=True, capture_output=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    virt = sh("systemd-detect-virt")
    return {
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip(),
        "cores": os.cpu_count(),
        "memory": sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo"),
        "kernel": sh("uname -r"),
        "virtualisation": virt if virt not in ("", "none") else "none",
        "disk": sh(f"df -h --output=source,fstype,size {work} | tail -1"),
        "fio": sh("fio --version"),
    }


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def mib(n):
    return f"{n / MIB:,.1f} MiB"


def origin(window):
    return window["tiers"].get("origin", {}).get("hits", 0)


def cached(window):
    return sum(t["hits"] for name, t in window["tiers"].items() if name != "origin")


def markdown(res):
    m, q = res["machine"], res["quick"]
    lines = [
        "# Garbage collection: measured",
        "",
        f"Measured {res['date']} on one machine: {m['cores']} cores ({m['cpu']}), {m['memory']}, Linux "
        f"{m['kernel']}" + (f", virtualisation {m['virtualisation']}" if m["virtualisation"] != "none" else "")
        + f". The store is a local directory on the machine's own disk ({m['disk']}); nothing crosses a network, "
        "so these figures are the CPU and local-disk cost of each path, not what S3 would give.",
        "",
        f"Command: `{res['command']}`" + (f" (quick: one run per figure, {res['window_secs']} s read windows)"
                                          if q else "")
        + f", at commit {res['commit']}, {res['secs']:.0f} s in all. Other work shared the machine: load average "
        f"{res['load_before']} at the start, {res['load_after']} at the end (1, 5, 15 minutes).",
        "",
    ]
    fam = res.get("family")
    if fam:
        imgs = ", ".join(f"{i['tag']} {i['image_size'] / MIB:.0f} MiB" for i in fam["images"])
        lines += [
            f"The image family ({imgs}) was flattened once into a local store in {fam['secs']:.1f} s: "
            f"{mib(fam['logical_bytes'])} of non-zero chunk plaintext over all images, {mib(fam['stored_bytes'])} "
            "stored after dedup. Every part below starts from a copy of that store.",
            "",
        ]
    c = res.get("copy")
    if c:
        cf, nv = c["copy_forward"], c["naive"]
        n = len(cf["runs"])
        lines += [
            "## 1. Copy-forward against the naive re-encryption",
            "",
            f"Moving every family image into a new root after `lode root rotate`: {mib(c['plaintext_bytes'])} of "
            "plaintext (the non-zero chunks of every image, shared chunks counted once per image) re-sealed under "
            "the new salt. Copy-forward is `lode root copy-forward`; the naive way is `lode export TAG FILE` "
            "then `lode import FILE -t TAG` for each image. Page cache dropped before each; time includes the "
            f"rotation and a final `sync`; {n} run(s) each, a fresh store every run.",
            "",
            "| path | MiB/s (median) | min … max | seconds (median) |",
            "|---|---|---|---|",
            f"| copy-forward | **{cf['mib_s']['median']:.0f}** | {cf['mib_s']['min']:.0f} … {cf['mib_s']['max']:.0f} "
            f"| {cf['secs']['median']:.2f} |",
            f"| export + import | **{nv['mib_s']['median']:.0f}** | {nv['mib_s']['min']:.0f} … "
            f"{nv['mib_s']['max']:.0f} | {nv['secs']['median']:.2f} |",
            "",
            f"Copy-forward / naive: **{c['ratio_median']:.2f}×** (goal: at least 1).",
            "",
        ]
    r = res.get("reclaim")
    if r:
        per_root = ", ".join(f"root {k}: {v:,}" for k, v in r["dead_bytes_per_root"].items())
        lines += [
            "## 2. Bytes reclaimed",
            "",
            f"Tags removed with `lode rm`: {', '.join(r['removed_tags'])} (kept: {', '.join(r['kept_tags'])}). "
            "Then `lode root rotate` and `lode gc --grace 0s`, which copied the live manifests forward, "
            f"expired root {r['old_root']} and deleted it in {r['gc_secs']:.1f} s.",
            "",
            "| figure | bytes |",
            "|---|---|",
            f"| dead bytes before (`lode store stats`; {per_root}) | {r['dead_bytes_before']:,} |",
            f"| stored bytes before | {r['stored_bytes_before']:,} |",
            f"| stored bytes after | {r['stored_bytes_after']:,} |",
            f"| stored before − after | **{r['stored_difference']:,}** |",
            f"| `reclaimed_bytes` of gc (all of root {r['old_root']}) | **{r['reclaimed_bytes']:,}** |",
            "",
            f"Checked by the script, to the byte: stored before − after equals the dead bytes; the new root "
            f"holds exactly the {r['live_bytes_before']:,} live bytes; gc's reclaimed bytes equal every object "
            f"of root {r['old_root']} but its record and forwarding records "
            f"({r['old_root_objects'].get('chunks', {}).get('bytes', 0):,} bytes of chunks and "
            f"{r['reclaimed_bytes'] - r['old_root_objects'].get('chunks', {}).get('bytes', 0):,} of manifests). "
            "The kept images pass `lode verify` afterwards.",
            "",
        ]
    d = res.get("readers")
    if d:
        i, b = d["idle"], d["copy_forward"]
        share = b.get("copy_forward_share_of_window")
        lines += [
            "## 3. What copy-forward costs a reader",
            "",
            f"`lode agent` with its caches off (`{d['cache']}`, so every read is fetched from the store, "
            f"decrypted and checked) serves `{d['image']}` over NBD; fio replays random 4 KiB reads at queue depth 1 "
            f"within the image's {d['stored_chunks']} stored chunks (never a zero chunk), {d['window_secs']} s idle, "
            f"then {d['window_secs']} s while copy-forward runs on the same store: first the retired root the reader "
            "reads from (every family image), then, if it finishes early, a rotation and a copy-forward of the root "
            f"just filled, back to back ({len(b['passes'])} pass(es), covering "
            f"{(share or 0) * 100:.0f}% of the window). The page cache was dropped before each window. "
            "The busy figures count only reads that completed while a copy-forward ran.",
            "",
            "| reads | count | p50 µs | p99 µs | p99.9 µs | reads/s |",
            "|---|---|---|---|---|---|",
            f"| idle | {i['reads']:,} | {i['p50_us']:.0f} | {i['p99_us']:.0f} | {i['p999_us']:.0f} | {i['iops']:.0f} |",
            f"| during copy-forward | {b['reads']:,} | {b['p50_us']:.0f} | {b['p99_us']:.0f} | {b['p999_us']:.0f} "
            f"| {b['iops']:.0f} |",
            "",
            f"During / idle: p50 **{d['p50_ratio']:.2f}×**, p99 **{d['p99_ratio']:.2f}×**. Chunks the agent fetched "
            f"from the store: {origin(i):,} for {i['reads_in_window']:,} reads idle, {origin(b):,} for "
            f"{b['reads_in_window']:,} reads busy; cache hits: {cached(i) + cached(b):,}."
            + (f" Copy-forward ran at {statistics.median(b['pass_mib_s']):.0f} MiB/s while the reader read."
               if b.get("pass_mib_s") else ""),
            "",
        ]
    lines += [f"Raw results: `{res['json_name']}` beside this file (each run, each pass, the agent's tier "
              "counters, the per-image flatten times).", ""]
    return "\n".join(lines)


PARTS = ("copy", "reclaim", "readers")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one run per figure, 10 s read windows")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    p.add_argument("--lode", required=True)
    p.add_argument("--layout", required=True)
    p.add_argument("--work", required=True, help="scratch directory (must not exist or be empty)")
    p.add_argument("--json-out", required=True)
    p.add_argument("--md-out", required=True)
    p.add_argument("--command", default=" ".join(sys.argv))
    args = p.parse_args()
    parts = [x for x in args.parts.split(",") if x]
    for x in parts:
        if x not in PARTS:
            p.error(f"unknown part {x!r}")
    b = Bench(args)
    started = time.perf_counter()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": args.command,
           "quick": args.quick, "reps": b.reps, "window_secs": b.window, "machine": machine_facts(b.work),
           "commit": subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short",
                                     "HEAD"], text=True, capture_output=True).stdout.strip(),
           "load_before": load_average(), "store": "local directory on the machine's disk", "json_name": os.path.basename(args.json_out)}
    try:
        res["family"] = b.flatten_family()
        res["tags"] = b.tags
        for part in parts:
            t0 = time.perf_counter()
            log(f"== {part}")
            res[part] = getattr(b, f"part_{part}")()
            log(f"== {part} took {time.perf_counter() - t0:.0f} s")
    except Fail as e:
        print(f"bench-gc: {e}", file=sys.stderr)
        return 1
    res["secs"] = time.perf_counter() - started
    res["load_after"] = load_average()
    md = markdown(res)
    for path, text in ((args.json_out, json.dumps(res, indent=1) + "\n"), (args.md_out, md)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

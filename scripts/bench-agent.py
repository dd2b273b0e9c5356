#!/usr/bin/env python3
"""Helper for scripts/bench-agent.sh: reads what the shell script collected and prints
the results as markdown.

  bench-agent.py iolog IMAGE CHUNK OUT    fio iolog (v2): one 4 KiB read at the start of
                                          every non-zero chunk of IMAGE; prints the count
  bench-agent.py ref OUT                  reference costs of one 512 KiB chunk (JSON)
  bench-agent.py report RESDIR            the results tables (markdown, on stdout)
"""

import json
import os
import statistics
import subprocess
import sys
import time

ZERO = bytes(1 << 20)


def iolog(image, chunk, out):
    """Offsets of the non-zero chunks (those lode stores and so must fetch)."""
    chunk = int(chunk)
    n = 0
    with open(image, "rb") as f, open(out, "w") as log:
        log.write("fio version 2 iolog\nnbd add\nnbd open\n")
        i = 0
        while True:
            b = f.read(chunk)
            if not b:
                break
            if b != ZERO[: len(b)]:
                log.write(f"nbd read {i * chunk} 4096\n")
                n += 1
            i += 1
        log.write("nbd close\n")
    print(n)


def openssl_speed(alg, nbytes):
    """µs per buffer of `nbytes` from `openssl speed -evp` (one core)."""
    out = subprocess.run(
        ["openssl", "speed", "-evp", alg, "-bytes", str(nbytes), "-seconds", "1"],
        capture_output=True, text=True, check=True,
    ).stderr
    # "Doing AES-256-GCM for 1s on 524288 size blocks: 4526 AES-256-GCM's in 1.00s"
    for line in out.splitlines():
        if line.startswith("Doing") and "'s in" in line:
            count = int(line.split(":")[1].split()[0])
            secs = float(line.rsplit(" in ", 1)[1].rstrip("s"))
            return secs / count * 1e6
    raise SystemExit(f"could not parse openssl speed output for {alg}")


def ref(out):
    """What one disk-cache hit costs in its parts: read 512 KiB, SHA-256 it (only bytes
    from other machines are hashed now), AES-GCM it."""
    n = 512 << 10
    path = out + ".chunk"
    with open(path, "wb") as f:
        f.write(os.urandom(n))
    for _ in range(20):  # into the page cache
        open(path, "rb").read()
    reps = 500
    t = time.perf_counter()
    for _ in range(reps):
        with open(path, "rb") as f:
            f.read()
    read_us = (time.perf_counter() - t) / reps * 1e6
    os.unlink(path)
    r = {
        "read_512k_page_cache_us": read_us,
        "sha256_512k_us": openssl_speed("sha256", n),
        "aes256gcm_512k_us": openssl_speed("aes-256-gcm", n),
    }
    json.dump(r, open(out, "w"))


# ---------------------------------------------------------------------------- report

def load(p):
    with open(p) as f:
        return json.load(f)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fio_read(p):
    r = load(p)["jobs"][0]["read"]
    pct = r["clat_ns"].get("percentile", {})
    return {
        "iops": r["iops"],
        "bw": r["bw_bytes"],
        "ios": r["total_ios"],
        "p50": pct.get("50.000000", 0) / 1e3,
        "p99": pct.get("99.000000", 0) / 1e3,
        "mean": r["clat_ns"]["mean"] / 1e3,
        "lat_mean": r["lat_ns"]["mean"] / 1e3,  # submission + completion
    }


def tier(snap, name):
    for t in snap["tiers"]:
        if t["name"] == name:
            return t
    raise SystemExit(f"no tier {name!r} in stats (tiers: {[t['name'] for t in snap['tiers']]})")


def tier_delta(a, b, name):
    """Counters of tier `name` between snapshots a and b."""
    ta, tb = tier(a, name), tier(b, name)
    d = {k: tb[k] - ta[k] for k in ("hits", "misses", "bytes", "latency_sum_us")}
    d["buckets"] = tb["latency_buckets_us"]
    d["counts"] = [y - x for x, y in zip(ta["latency_counts"], tb["latency_counts"])]
    return d


def read_delta(a, b):
    d = {k: b[k] - a[k] for k in ("reads", "read_bytes", "read_latency_sum_us", "zero_chunk_reads")}
    d["buckets"] = b["read_latency_buckets_us"]
    d["counts"] = [y - x for x, y in zip(a["read_latency_counts"], b["read_latency_counts"])]
    return d


def hist_pct(bounds, counts, pct):
    """(low, high, interpolated) µs of the bucket holding the pct-th percentile."""
    total = sum(counts)
    if not total:
        return None
    want = total * pct / 100
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= want:
            lo = bounds[i - 1] if i > 0 else 0
            hi = bounds[i] if i < len(bounds) else None
            if hi is None:
                return (lo, None, None)
            return (lo, hi, lo + (hi - lo) * (want - seen) / c)
        seen += c
    return None


def fmt_hist(h):
    if h is None:
        return "–"
    lo, hi, est = h
    if hi is None:
        return f">{lo} µs"
    return f"{lo}–{hi} µs (~{est:.0f})"


def us(x):
    return "–" if x is None else (f"{x:.1f} µs" if x < 100 else f"{x:.0f} µs")


def secs(x):
    return "–" if x is None else f"{x:.3f} s"


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}%"


def mib(x):
    return f"{x / 2**20:.1f} MiB"


def report(res):
    meta = load(f"{res}/meta.json")
    size = meta["image_size"]
    out = []
    p = out.append
    p(f"# lode agent benchmark ({meta['date']})")
    p("")
    p(f"{meta['host']}. Image `{meta['image']}`: {mib(size)} ext4, {meta['chunks']} chunks of "
      f"512 KiB, {meta['stored_chunks']} stored (non-zero). lode {meta['lode']}; agent flags: "
      f"`{meta['agent_flags'] or '(defaults)'}`.")
    p("")

    # 1 + 2: warm, lode against nbdkit file
    if os.path.isdir(f"{res}/warm"):
        runs = meta["runs"]
        p(f"## 1. Warm 4 KiB random reads (fio nbd engine, Unix socket, {meta['secs']} s time-based, "
          f"median of {runs})")
        p("")
        p("| QD | lode IOPS | nbdkit file IOPS | lode/nbdkit | lode p50 | nbdkit p50 | lode p99 | nbdkit p99 |")
        p("|---|---|---|---|---|---|---|---|")
        for qd in meta["rand_qds"]:
            r = {s: [fio_read(f"{res}/warm/rand-qd{qd}-{s}-{i}.json") for i in range(1, runs + 1)]
                 for s in ("lode", "nbdkit")}
            m = {s: {k: med([x[k] for x in r[s]]) for k in ("iops", "p50", "p99")} for s in r}
            p(f"| {qd} | {m['lode']['iops']:,.0f} | {m['nbdkit']['iops']:,.0f} | "
              f"**{m['lode']['iops'] / m['nbdkit']['iops']:.2f}** | {us(m['lode']['p50'])} | "
              f"{us(m['nbdkit']['p50'])} | {us(m['lode']['p99'])} | {us(m['nbdkit']['p99'])} |")
        p("")
        p(f"## 2. Warm sequential 1 MiB reads (median of {runs})")
        p("")
        p("| QD | lode GB/s | nbdkit file GB/s | lode/nbdkit |")
        p("|---|---|---|---|")
        for qd in meta["seq_qds"]:
            m = {s: med([fio_read(f"{res}/warm/seq-qd{qd}-{s}-{i}.json")["bw"] for i in range(1, runs + 1)])
                 for s in ("lode", "nbdkit")}
            p(f"| {qd} | {m['lode'] / 1e9:.2f} | {m['nbdkit'] / 1e9:.2f} | **{m['lode'] / m['nbdkit']:.2f}** |")
        p("")
        a, b = load(f"{res}/warm/stats-before.json"), load(f"{res}/warm/stats-after.json")
        d = tier_delta(a, b, "decrypted")
        rd = read_delta(a, b)
        p(f"During sections 1–2 the agent served {rd['reads']:,} reads; the decrypted tier had "
          f"{d['hits']:,} hits and {d['misses']:,} misses (everything warm: misses should be 0).")
        p("")

    # 3: disk tier, memory cold
    if os.path.isdir(f"{res}/disk"):
        p("## 3. 4 KiB reads served by the disk tier, memory cold (agent restarted, QD1)")
        p("")
        p(f"One 4 KiB read at the start of each stored chunk ({meta['stored_chunks']} reads, fio "
          "iolog replay; zero chunks are skipped because they are never fetched). fio clat is "
          "what the NBD client sees; `disk` is the tier's own histogram (file read + AES-GCM "
          "open of the 512 KiB chunk, which authenticates it; the agent's buckets, six a decade, shown as the "
          "bucket and a linear estimate inside it); `device` is the agent's whole read "
          "(all tiers, the decrypted-cache insert and the copy out).")
        p("")
        cf = f"{res}/disk/pc-warm/cache_files"
        if os.path.exists(cf):
            used = tier(load(f"{res}/disk/pc-warm/stats0.json"), "disk").get("used_bytes") or 0
            p(f"After the restart the disk tier held {int(open(cf).read())} chunk files "
              f"({mib(used)}) of the {meta['stored_chunks']} stored chunks.")
            p("")
        p("| OS page cache of the cache files | fio p50 | fio p99 | fio mean | disk tier hits | disk p50 | disk p99 | disk mean | device p50 | device mean | origin fetches |")
        p("|---|---|---|---|---|---|---|---|---|---|---|")
        for case, label in (("pc-warm", "warm (files in page cache)"), ("pc-cold", "dropped (drop_caches)")):
            if not os.path.isdir(f"{res}/disk/{case}"):
                continue
            f = fio_read(f"{res}/disk/{case}/fio.json")
            a, b = load(f"{res}/disk/{case}/stats0.json"), load(f"{res}/disk/{case}/stats1.json")
            d = tier_delta(a, b, "disk")
            o = tier_delta(a, b, "origin")
            rd = read_delta(a, b)
            p(f"| {label} | {us(f['p50'])} | {us(f['p99'])} | {us(f['mean'])} | {d['hits']} | "
              f"{fmt_hist(hist_pct(d['buckets'], d['counts'], 50))} | "
              f"{fmt_hist(hist_pct(d['buckets'], d['counts'], 99))} | "
              f"{us(d['latency_sum_us'] / d['hits'] if d['hits'] else None)} | "
              f"{fmt_hist(hist_pct(rd['buckets'], rd['counts'], 50))} | "
              f"{us(rd['read_latency_sum_us'] / rd['reads'] if rd['reads'] else None)} | {o['hits']} |")
        p("")
        if os.path.exists(f"{res}/ref.json"):
            r = load(f"{res}/ref.json")
            p("Parts of a disk-cache hit on this machine, one core, per 512 KiB chunk: read "
              f"from the page cache {us(r['read_512k_page_cache_us'])}, AES-256-GCM "
              f"{us(r['aes256gcm_512k_us'])} (openssl); together "
              f"{us(r['read_512k_page_cache_us'] + r['aes256gcm_512k_us'])} (a name check, "
              f"SHA-256, would add {us(r['sha256_512k_us'])}; the disk tier is not hashed). "
              "Goal: fio p50 under 100 µs.")
            p("")
        if os.path.isdir(f"{res}/disk/pc-warm"):
            f = fio_read(f"{res}/disk/pc-warm/fio.json")
            a, b = load(f"{res}/disk/pc-warm/stats0.json"), load(f"{res}/disk/pc-warm/stats1.json")
            d = tier_delta(a, b, "disk")
            rd = read_delta(a, b)
            if d["hits"] and rd["reads"]:
                dm = d["latency_sum_us"] / d["hits"]
                am = rd["read_latency_sum_us"] / rd["reads"]
                p(f"Where a disk hit's time goes (means, cache files in the page cache): fio sees "
                  f"{us(f['lat_mean'])} (submission + completion); the disk tier (file read + AES-GCM open) "
                  f"{us(dm)}; the rest of the agent's read (memory tier fill, decrypted-cache "
                  f"insert, the copy out) {us(am - dm)}; NBD and fio "
                  f"{us(f['lat_mean'] - am)}.")
                p("")

    # 4: cold start
    if os.path.isdir(f"{res}/cold"):
        n = meta["cold_runs"]
        p(f"## 4. Cold start: `chroot MNT python3 -c 'import json, sqlite3, email'` (median of {n})")
        p("")
        p("lode: fresh agent state per run (all caches empty) → nbdfuse file → loop device "
          "(read-only) → `mount -o ro`. local: the `lode export`ed image file on local disk → "
          "loop → `mount -o ro`. `sync; echo 3 > /proc/sys/vm/drop_caches` before each run. "
          "Fetched = the origin tier's bytes (ciphertext) over the image size "
          f"({mib(size)}); goal ≤ 10%, Slacker 6.4%.")
        p("")
        p("| side | loop read_ahead_kb | mount | mount+run | read from the loop device | read from the agent | fetched at mount | fetched mount+run | chunks fetched | share at mount | **share mount+run** |")
        p("|---|---|---|---|---|---|---|---|---|---|---|")
        variants = meta["cold_variants"]
        for v in ["local"] + variants:
            rows = []
            for i in range(1, n + 1):
                d = f"{res}/cold/{v}-{i}"
                if not os.path.isdir(d):
                    continue
                t = open(f"{d}/times").read().split()
                mount_s, run_s = float(t[1]) - float(t[0]), float(t[2]) - float(t[0])
                ra = open(f"{d}/ra").read().strip()
                lr = int(open(f"{d}/loop_read_bytes").read())
                if v == "local":
                    rows.append((mount_s, run_s, None, None, None, ra, None, lr))
                    continue
                s0, s1, s2 = (load(f"{d}/stats{k}.json") for k in range(3))
                m = tier_delta(s0, s1, "origin")["bytes"]
                r = tier_delta(s0, s2, "origin")
                rd = read_delta(s0, s2)["read_bytes"]
                rows.append((mount_s, run_s, m, r["bytes"], r["hits"], ra, rd, lr))
            if not rows:
                continue
            col = lambda k: med([r[k] for r in rows])  # noqa: E731
            ra = ",".join(sorted({r[5] for r in rows}))
            if v == "local":
                p(f"| local disk | {ra} | {secs(col(0))} | {secs(col(1))} | {mib(col(7))} | – | – | – | – | – | – |")
            else:
                p(f"| lode ({v}) | {ra} | {secs(col(0))} | {secs(col(1))} | {mib(col(7))} | {mib(col(6))} | {mib(col(2))} | "
                  f"{mib(col(3))} | {col(4):.0f} of {meta['stored_chunks']} | {pct(col(2) / size)} | "
                  f"**{pct(col(3) / size)}** |")
        p("")
        p("Read from the loop device: what ext4 asked for, its readahead included (from "
          "/sys/block/loopN/stat). Read from the agent: what reached the NBD export, after the "
          "nbdfuse file's page cache and readahead. Fetched: whole 512 KiB chunks (+16 B tag).")
        p("")
        traces = [(k, f"{res}/cold/trace-{k}") for k in ("default", "ra0-fuse0")]
        traces = [(k, d) for k, d in traces if os.path.isdir(d)]
        if traces:
            sizes = [4 << 10, 16 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20]
            p("What the start reads, by fetch granularity: the same mount+run once through "
              "`nbdkit --filter=log file` (the image file) instead of the agent, the offsets "
              "read logged, and the share of the image that fetching whole chunks of each size "
              "would cost:")
            p("")
            p("| readahead (loop / nbdfuse file) | bytes read | " + " | ".join(
                f"{c >> 10} KiB" for c in sizes) + " |")
            p("|---|---|" + "---|" * len(sizes))
            for k, d in traces:
                start = int(open(f"{d}/log_start").read())
                ext = []
                with open(f"{d}/nbd.log") as f:
                    for i, line in enumerate(f):
                        if i < start or " Read " not in line or "offset=" not in line:
                            continue
                        kv = dict(w.split("=", 1) for w in line.split() if "=" in w)
                        ext.append((int(kv["offset"], 16), int(kv["count"], 16)))
                shares = []
                for c in sizes:
                    seen = set()
                    for off, n in ext:
                        seen.update(range(off // c, (off + n - 1) // c + 1))
                    shares.append(len(seen) * c / size)
                ra = open(f"{d}/ra").read().strip()
                fra = open(f"{d}/fuse_ra").read().strip()
                p(f"| {ra} / {fra} KiB | {mib(sum(n for _, n in ext))} | "
                  + " | ".join(pct(x) for x in shares) + " |")
            p("")
        if os.path.exists(f"{res}/cold/fuse_ra"):
            p(f"The nbdfuse file's own bdi readahead (under the loop device, which reads its "
              f"backing file through the page cache) was {open(f'{res}/cold/fuse_ra').read().strip()} KiB.")
            p("")
    if os.path.exists(f"{res}/runtime"):
        p(f"Total runtime: {float(open(f'{res}/runtime').read()):.0f} s.")
    print("\n".join(out))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"iolog": iolog, "ref": ref, "report": report}[cmd](*args)


if __name__ == "__main__":
    main()

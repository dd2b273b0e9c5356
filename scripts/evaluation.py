#!/usr/bin/python3
"""Renders docs/EVALUATION.md and its plots from the JSON that scripts/bench.py wrote.

    scripts/evaluation.py RESULTS_DIR [OUT_MD]      (OUT_MD defaults to docs/EVALUATION.md;
                                                     plots go to evaluation/ beside it)

Every number in the report is computed here from the measured records; nothing is typed
in by hand except the papers' figures, which are labelled as such.
"""

import json
import os
import shlex
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "lode", "font.size": 9, "figure.dpi": 100})

MIB = 1 << 20
TIERS = ["decrypted", "memory", "disk", "az", "origin"]
TIER_LABEL = {
    "decrypted": "local memory (decrypted)",
    "memory": "local memory (ciphertext)",
    "disk": "local disk",
    "az": "AZ cache (k=4 m=2)",
    "origin": "origin (local directory store)",
}
TIER_COLOR = {"decrypted": "#1b9e77", "memory": "#66c2a5", "disk": "#7570b3", "az": "#d95f02", "origin": "#e7298a"}
STATE_LABEL = {"origin": "all caches empty", "az": "AZ cache warm", "disk": "local disk warm", "memory": "local memory warm"}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(x):
    return f"{100 * x:.1f}%"


def mib(b):
    return f"{b / MIB:.1f} MiB"


def shell_words(args):
    """A command line for reading: each argument quoted the way a person would."""
    def q(a):
        if a and not any(c in a for c in " \t\n'\"$`\\;&|<>()*?!{}[]#~"):
            return a
        if "'" not in a:
            return f"'{a}'"
        if not any(c in a for c in '"$`\\'):
            return f'"{a}"'
        return shlex.quote(a)
    return " ".join(q(a) for a in args)


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


class Report:
    def __init__(self, results, out_md):
        self.results, self.out_md = results, out_md
        self.plot_dir = os.path.join(os.path.dirname(os.path.abspath(out_md)), "evaluation")
        os.makedirs(self.plot_dir, exist_ok=True)
        self.parts = []

    def load(self, name):
        path = os.path.join(self.results, f"{name}.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def save(self, fig, name):
        path = os.path.join(self.plot_dir, f"{name}.svg")
        fig.tight_layout()
        fig.savefig(path, metadata={"Date": None})
        if os.environ.get("LODE_EVAL_PNG"):  # a raster copy, to look at while editing
            fig.savefig(path[:-4] + ".png", dpi=80)
        plt.close(fig)
        rel = os.path.relpath(path, os.path.dirname(os.path.abspath(self.out_md)))
        return f"![{name}]({rel})\n"

    def add(self, text):
        self.parts.append(text)


# ------------------------------------------------------------------ 1. dedup


def scratch_note(d):
    if d.get("scratch") == "/dev/shm":
        return ("Both sides' scratch files (extracted trees, the naive image, lode's work "
                "directory) were on tmpfs; the stores on the root disk.")
    return "Scratch files and stores were on the root disk."


def fig_dedup(r, d, replay):
    imgs = d["images"]
    tags = [i["tag"] for i in imgs]
    cum = lambda key: [sum(i[key] for i in imgs[: n + 1]) for n in range(len(imgs))]
    series = [
        ("logical (sum of lode's image sizes)", cum("image_size"), "#999999", "--"),
        ("naive: mkfs.ext4 -d, then 512 KiB chunk dedup", cum("naive_uploaded"), "#e7298a", "-"),
        ("registry: distinct layers, uncompressed tar", cum("registry_new_tar"), "#7570b3", "-"),
        ("registry: distinct layers, gzip (as stored)", cum("registry_new_gz"), "#7570b3", ":"),
        ("lode: stored chunks", cum("lode_uploaded"), "#1b9e77", "-"),
    ]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, ys, color, style in series:
        a.plot(range(len(tags)), [y / MIB for y in ys], style, color=color, marker="o", label=label)
    a.set_xticks(range(len(tags)), [f"+{t}" for t in tags])
    a.set_ylabel("MiB stored (cumulative)")
    a.set_title("Stored bytes as the family is added, in order")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    x = range(len(tags))
    b.bar([i - 0.2 for i in x], [100 * i["lode_dedup_share"] for i in imgs], 0.4, color="#1b9e77", label="lode")
    b.bar([i + 0.2 for i in x], [100 * i["naive_dedup_share"] for i in imgs], 0.4, color="#e7298a", label="naive mkfs.ext4 -d")
    b.set_xticks(list(x), tags)
    b.set_ylabel("% of the image's chunks already stored")
    b.set_title("Chunks already present when each image is flattened")
    b.legend(fontsize=7)
    b.grid(alpha=0.3, axis="y")
    plot = r.save(fig, "fig1-dedup")
    rows = []
    for i in imgs:
        rows.append([i["tag"], i["layers"], mib(i["image_size"]), f"{med(i['lode_secs']):.2f} s", f"{med(i['naive_secs']):.2f} s",
                     mib(i["lode_uploaded"]), pct(i["lode_dedup_share"]),
                     mib(i["naive_size"]), mib(i["naive_uploaded"]), pct(i["naive_dedup_share"]),
                     mib(i["registry_new_tar"]), mib(i["registry_new_gz"])])
    tot = lambda k: sum(i[k] for i in imgs)
    rows.append(["**all**", "", mib(tot("image_size")), f"{sum(med(i['lode_secs']) for i in imgs):.2f} s",
                 f"{sum(med(i['naive_secs']) for i in imgs):.2f} s", f"**{mib(tot('lode_uploaded'))}**", "",
                 mib(tot("naive_size")), f"**{mib(tot('naive_uploaded'))}**", "",
                 f"**{mib(tot('registry_new_tar'))}**", f"**{mib(tot('registry_new_gz'))}**"])
    text = f"""## 1. Dedup over the image family

What: each image of the family (Debian bookworm minbase, then python, python+flask, node and
gcc on that same base layer) flattened in order into one store, three ways: lode's
flattener; the naive pipeline (`umoci raw unpack`, `mkfs.ext4 -d` with a fixed UUID, hash
seed and clock, its best case, then the same 512 KiB chunking and dedup); and layer-level
dedup, what an OCI registry stores (each distinct layer blob once). {d['runs']} passes, each
into empty stores; the byte counts were identical in every pass (the script stops if
not), times are medians. {scratch_note(d)}

{plot}
{table(["image", "layers", "lode image", "lode flatten + publish", "naive unpack + mkfs + import", "lode new bytes", "lode: chunks already stored", "naive image", "naive new bytes", "naive: already stored", "new layers (tar)", "new layers (gzip)"], rows)}
- lode stores **{mib(tot('lode_uploaded'))}** for {mib(tot('image_size'))} of images
  ({pct(1 - tot('lode_uploaded') / tot('image_size'))} saved), the naive flattening
  {mib(tot('naive_uploaded'))} ({tot('naive_uploaded') / tot('lode_uploaded'):.2f}x lode's).
- Layer-level dedup stores {mib(tot('registry_new_tar'))} uncompressed
  ({tot('registry_new_tar') / tot('lode_uploaded'):.2f}x lode's) and {mib(tot('registry_new_gz'))} as gzip.
  lode does not compress chunks (the paper: compression adds latency, hurts random access
  and leaks sizes under encryption), so against gzip layers it stores
  {tot('lode_uploaded') / tot('registry_new_gz'):.1f}x more; what it buys is block-level
  random access and sharing below the layer (the same file in two different layers).
- Paper (Brooker et al.): about 80% of new uploads add no new chunk at all; of the rest
  the median is 2.5% unique bytes. Here every application image added new packages, so
  none is a re-upload.
"""
    if all("base_region_chunks" in i for i in imgs):
        text += "- The base layer's region in each application image: " + ", ".join(
            f"{i['tag']} {i['base_region_stored']} of {i['base_region_chunks']} chunks already stored"
            for i in imgs[1:]) + " (the flattener puts each layer in its own chunk-aligned region).\n"
    if replay:
        fns = replay["functions"]
        shares = sorted(f["dedup_share"] for f in fns)
        text += f"""- The {len(fns)} function images of section 4 (a family image plus one layer of the
  function's own code and 128 KiB to 8 MiB of random data) found a median
  **{pct(med(shares))}** of their chunks already stored (min {pct(shares[0])}, max
  {pct(shares[-1])}): only the function's own layer and the filesystem metadata around it are new.
"""
    return text


# ------------------------------------------------------------------ 2 and 6: starts


def fig_starts(r, s):
    imgs = s["images"]
    tags = list(imgs)
    frac, kernel = [], []
    rows = []
    for t in tags:
        im = imgs[t]
        size = im["image_size"]
        o = im["origin"]
        fetched = med([x["tiers"]["origin"]["bytes"] for x in o])
        chunks = med([x["tiers"]["origin"]["hits"] for x in o])
        read = med([x["read_bytes"] for x in o])
        frac.append(fetched / size)
        kernel.append(read / size)
        rows.append([t, "`" + shell_words(s["commands"][t]).replace("|", "\\|") + "`", mib(size), mib(read), pct(read / size),
                     f"{chunks:.0f}", mib(fetched), f"**{pct(fetched / size)}**", f"{med([x['secs'] for x in o]):.2f} s"])
    fig, a = plt.subplots(figsize=(7, 3.4))
    x = range(len(tags))
    a.bar([i - 0.2 for i in x], [100 * f for f in frac], 0.4, color="#e7298a", label="fetched by lode (whole 512 KiB chunks)")
    a.bar([i + 0.2 for i in x], [100 * k for k in kernel], 0.4, color="#7570b3", label="read from the device (ext4 and its readahead)")
    a.axhline(6.4, color="black", ls="--", lw=1, label="Slacker: 6.4% of pulled data read at start")
    a.set_xticks(list(x), tags)
    a.set_ylabel("% of the image")
    a.set_title(f"Start-up fraction: bytes needed to run each image's command (median of {s['runs']})")
    a.legend(fontsize=7)
    a.grid(alpha=0.3, axis="y")
    plot = r.save(fig, "fig2-startup-fraction")
    text2 = f"""## 2. Start-up fraction

What: a cold start of each image through `lode run` (attach to a fresh agent with every
cache empty, loop device over the agent's FUSE file, ext4 mount, the command in a crun
container, clean up), page cache dropped before each; {s['runs']} runs per image, medians.
Fetched = the origin tier's bytes (ciphertext, whole chunks) over the image size.

{plot}
{table(["image", "command", "image", "device reads", "device read share", "chunks fetched", "fetched", "**fetched share**", "start (lode run)"], rows)}
- Median over the family: lode fetched **{pct(med(frac))}** of an image to start it
  (Slacker: 6.4% of the pulled data is read at start). The reads that reached the
  device (ext4's, readahead included) came to {pct(med(kernel))}; the rest is the 512 KiB fetch unit: a 4 KiB read costs its whole
  chunk. docs/benchmarks.md ("Cold start") measures the share at smaller chunk sizes
  (64 KiB: 8.5-11.3% for python).
"""
    # 6: cost of a start per tier state.
    states = ["origin", "az", "disk", "memory"]
    rows6 = []
    fig, axes = plt.subplots(1, len(tags), figsize=(2.2 * len(tags), 3.4))
    for ax, t in zip(axes, tags):
        im = imgs[t]
        bottoms = [0.0] * len(states)
        for tier in TIERS[1:]:
            ys = [med([x["tiers"].get(tier, {}).get("bytes", 0) for x in im[st]]) / MIB for st in states]
            ax.bar(range(len(states)), ys, bottom=bottoms, color=TIER_COLOR[tier], label=TIER_LABEL[tier])
            bottoms = [b + y for b, y in zip(bottoms, ys)]
        ax.set_xticks(range(len(states)), ["cold", "AZ", "disk", "mem"])
        ax.set_title(t)
        ax.grid(alpha=0.3, axis="y")
        for st in states:
            recs = im[st]
            req = {tier: med([x["tiers"].get(tier, {}).get("hits", 0) for x in recs]) for tier in TIERS}
            byt = {tier: med([x["tiers"].get(tier, {}).get("bytes", 0) for x in recs]) for tier in TIERS}
            rows6.append([t, STATE_LABEL[st], f"{med([x['secs'] for x in recs]):.3f} s",
                          f"{req['decrypted']:.0f}",
                          *[f"{req[tier]:.0f} / {byt[tier] / MIB:.1f}" for tier in TIERS[1:]]])
    axes[0].set_ylabel("MiB of ciphertext per tier (median)")
    axes[-1].legend(fontsize=6, loc="upper right")
    fig.suptitle("Cost of one start: chunks fetched below the decrypted cache, by the tier that served them")
    plot6 = r.save(fig, "fig6-start-cost")
    text6 = f"""## 6. Cost of a start

What: the same starts as section 2, with the tier counters of the agent (`lode stats
--json`) read before and after each: chunk requests each tier answered and the bytes it
served (plaintext for the decrypted tier, ciphertext below it). Four states per image,
{s['runs']} runs each, medians: all caches empty (a fresh agent, no fleet: every chunk from the
origin); AZ cache warm (a fresh agent on a fleet of six lode cache nodes, k=4 m=2, that an
earlier agent filled with this image's start); local disk warm (that agent restarted:
memory empty, disk full); local memory warm (the same agent again). The decrypted tier
counts one request per chunk a device read touches, so its count is a count of lookups,
not of fetches.

{plot6}
Cells: requests / MiB (ciphertext). The plot leaves out the decrypted tier, whose hits are
lookups of chunks already fetched, not fetches.

{table(["image", "state", "start", "decrypted-cache hits", *[TIER_LABEL[t] for t in TIERS[1:]]], rows6)}
"""
    return text2, text6


# ------------------------------------------------------------------ 3 and 4: replay


def cdf_points(bounds, counts):
    total = sum(counts)
    xs, ys, acc = [], [], 0
    for i, c in enumerate(counts[: len(bounds)]):
        acc += c
        xs.append(bounds[i])
        ys.append(acc / total)
    return xs, ys, total


def quantile(bounds, counts, q):
    total = sum(counts)
    want, acc = q * total, 0
    for i, c in enumerate(counts):
        acc += c
        if acc >= want and c:
            lo = bounds[i - 1] if i else 0
            return f"{lo}-{bounds[i]} µs" if i < len(bounds) else f">{bounds[-1]} µs"
    return "-"


def fig_latency(r, rep):
    plot, rows = latency_cdf(r, rep, "fig3-latency-cdf", "Read latency per tier over the replayed workload (section 4)")
    return f"""## 3. Read-latency CDF per tier

What: the agents' own histograms (`lode stats --json`: `hit_latency_counts` per tier, 32
buckets from 1 µs to 1 s, six per decade; `read_latency_counts` for whole device reads),
summed over the three agents at the end of the replay of section 4. A tier's latency is
the time of a lookup it answered: for the decrypted tier a hash-map hit, for memory and
disk the read of the segment a read needs plus its AES-256-GCM open, for the AZ tier k=4
stripe gets over loopback plus the rebuild and the name check, for the origin a read of
the chunk file from the local directory store, its checks and decryption. There is no
network here: the origin is a local directory and the cache nodes share the two cores
with everything else, so the AZ and origin curves are lode's own cost, not a network's
(section 9 has them over a network).

{plot}
{table(["tier", "hits", "p50 (bucket)", "p90", "p99", "mean"], rows)}
Paper: the agent's read-latency CDF has a mode under 100 µs (local hits) and one near
2.75 ms (AZ hits, including decryption); worker-observed AZ GETs 550 µs median.
"""


def latency_cdf(r, rep, name, title, labels=None):
    """The per-tier hit-latency CDF of a replay's agents: the plot and its table rows
    (`labels` overrides some tiers' names)."""
    labels = dict(TIER_LABEL, **(labels or {}))
    stats = rep["agent_stats"]
    bounds = stats[0]["tiers"][0]["latency_buckets_us"]
    fig, a = plt.subplots(figsize=(7, 3.8))
    rows = []
    for tier in TIERS:
        counts = tier_counts(rep, tier)
        if not counts or sum(counts) == 0:
            continue
        xs, ys, total = cdf_points(bounds, counts)
        a.step(xs, ys, where="post", color=TIER_COLOR[tier], label=f"{labels[tier]} ({total} hits)")
        mean = sum(t["hit_latency_sum_us"] for s in stats for t in s["tiers"] if t["name"] == tier) / total
        rows.append([labels[tier], total, quantile(bounds, counts, 0.5), quantile(bounds, counts, 0.9),
                     quantile(bounds, counts, 0.99), f"{mean:.0f} µs"])
    dev = [0] * len(stats[0]["read_latency_counts"])
    for s in stats:
        dev = [x + y for x, y in zip(dev, s["read_latency_counts"])]
    xs, ys, total = cdf_points(bounds, dev)
    a.step(xs, ys, where="post", color="black", lw=1.5, label=f"device reads, all tiers ({total})")
    rows.append(["**device reads (what the client sees)**", total, quantile(bounds, dev, 0.5), quantile(bounds, dev, 0.9),
                 quantile(bounds, dev, 0.99), f"{sum(s['read_latency_sum_us'] for s in stats) / total:.0f} µs"])
    a.axvline(100, color="gray", ls="--", lw=1)
    a.axvline(2750, color="gray", ls=":", lw=1)
    a.text(100, 0.45, " paper: local\n mode <100 µs", fontsize=7)
    a.text(2750, 0.6, " paper: AZ\n mode ≈2.75 ms", fontsize=7)
    a.set_xscale("log")
    a.set_xlabel("latency, µs (upper bound of the agent's histogram bucket)")
    a.set_ylabel("share of hits ≤ x")
    a.set_title(title)
    a.legend(fontsize=7, loc="lower right")
    a.grid(alpha=0.3)
    return r.save(fig, name), rows


def never(counts):
    k = sum(1 for c in counts if c == 0)
    return "every function started at least once" if k == 0 else f"{k} function{'s were' if k > 1 else ' was'} never started"


def fig_replay(r, rep):
    starts = rep["starts"]
    n = len(starts)
    windows = 10 if n >= 50 else max(1, n // 5)
    size = n / windows
    shares_all, shares_fetch, labels = [], [], []
    for w in range(windows):
        part = starts[int(w * size): int((w + 1) * size)]
        hits = {t: sum(s["tiers"].get(t, 0) for s in part) for t in TIERS}
        tot = sum(hits.values()) or 1
        shares_all.append({t: hits[t] / tot for t in TIERS})
        below = sum(hits[t] for t in TIERS[1:]) or 1
        shares_fetch.append({t: hits[t] / below for t in TIERS[1:]})
        labels.append(int((w + 1) * size))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, shares, tiers, title in (
        (a, shares_all, TIERS, "every chunk lookup"),
        (b, shares_fetch, TIERS[1:], "lookups the decrypted cache missed"),
    ):
        ax.stackplot(labels, *[[100 * s[t] for s in shares] for t in tiers], colors=[TIER_COLOR[t] for t in tiers],
                     labels=[TIER_LABEL[t] for t in tiers], alpha=0.9)
        ax.set_title(f"Where chunks came from: {title}")
        ax.set_xlabel(f"starts (windows of {size:.0f})")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    a.set_ylabel("% of chunk requests")
    b.axhline(67, color="black", ls="--", lw=1)
    b.text(labels[0], 68, "paper: 67% local / 32% AZ / 0.06% S3", fontsize=7)
    b.legend(fontsize=7, loc="lower right")
    plot = r.save(fig, "fig4-hit-rates")

    def totals(part):
        hits = {t: sum(s["tiers"].get(t, 0) for s in part) for t in TIERS}
        tot = sum(hits.values()) or 1
        below = sum(hits[t] for t in TIERS[1:]) or 1
        local = hits["decrypted"] + hits["memory"] + hits["disk"]
        return [pct(local / tot), pct(hits["az"] / tot), pct(hits["origin"] / tot),
                pct((hits["memory"] + hits["disk"]) / below), pct(hits["az"] / below), f"{100 * hits['origin'] / below:.2f}%"]

    half = starts[n // 2:]
    rows = [["all starts", n, *totals(starts)], ["second half", len(half), *totals(half)],
            ["last tenth", len(starts[-n // 10:]), *totals(starts[-n // 10:])],
            ["paper (Lambda, a week)", "", "", "", "", "67%", "32%", "0.06%"]]
    fns = rep["functions"]
    counts = [0] * len(fns)
    for s in starts:
        counts[s["fn"]] += 1
    secs_first = [s["secs"] for i, s in enumerate(starts) if all(p["fn"] != s["fn"] for p in starts[:i])]
    caches = rep["caches"]
    return f"""## 4. Tier hit rates over a replayed workload

What: {len(fns)} functions, each a family image (chosen at random) plus a layer of its own
code and data, with Zipf popularity (s = {rep['zipf_s']}, ranks shuffled; the most popular
function got {max(counts)} of the {n} starts; {never(counts)}), started one after
another on {rep['agents']} agents chosen at random, each with small local caches (decrypted
{caches['decrypted']}, ciphertext memory {caches['memory']}, disk {caches['disk']}), all sharing one fleet of
six lode cache nodes (k=4 m=2, {rep['fleet']['memory_per_node']} of memory each), every cache empty at the start,
seed {rep['seed']}. Each start is a real `lode run` of the function's command (its runtime
starting and reading its code and data). Counted per start from the agent's tier
counters: the chunk requests each tier answered. The left panel counts every lookup (a
4 KiB read of a chunk already decrypted in memory is a lookup the decrypted tier
answers); the right one counts only the requests that reached the ciphertext tiers
(memory, disk, AZ, origin), which is closer to the paper's "chunks served".

{plot}
{table(["starts", "n", "local, all lookups", "AZ, all", "origin, all", "local ciphertext tiers", "AZ", "origin"], rows)}
- First start of each function: median {statistics.median(secs_first):.2f} s; all starts:
  median {statistics.median(s['secs'] for s in starts):.2f} s.
- The replay is a sequence, not a week: caches start empty and the run is short, so each
  chunk's first fetch from the origin weighs far more than in the paper's week, whose
  0.06% comes from a fleet that is always warm.
"""


# ------------------------------------------------------------------ 5: peers


def pull_note(starts):
    if starts and starts.get("pull_scratch") == "/dev/shm":
        return "; the pulled image or tree is written to tmpfs, the peers' best case"
    return ""


def fig_peers(r, peers, dedup, starts):
    bars, rows = [], []

    def add(name, ratio, detail, paper=""):
        bars.append((name, ratio))
        rows.append([name, f"**{ratio:.2f}x**", detail, paper])

    if peers:
        for x in peers["nbd"]["rows"]:
            add(f"NBD server, {x['link']} QD{x['qd']}: p50 nbdkit/lode",
                x["nbdkit_p50"] / x["lode_p50"],
                f"lode {x['lode_p50']:.1f} µs, nbdkit memory {x['nbdkit_p50']:.1f} µs; IOPS {x['lode_iops']:.0f} vs {x['nbdkit_iops']:.0f}",
                "Nydus: NBD 24.0 µs cold 4 KiB" if x["qd"] == 1 else "")
        for x in peers["agent"]["rand4k"]:
            add(f"agent warm 4 KiB QD{x['qd']}: IOPS lode/nbdkit file", x["lode_iops"] / x["nbdkit_iops"],
                f"{x['lode_iops']:.0f} vs {x['nbdkit_iops']:.0f} IOPS; p50 {x['lode_p50']} vs {x['nbdkit_p50']} µs")
        for x in peers["agent"]["seq1m"]:
            add(f"agent warm 1 MiB seq QD{x['qd']}: GB/s lode/nbdkit file", x["lode_gbs"] / x["nbdkit_gbs"],
                f"{x['lode_gbs']} vs {x['nbdkit_gbs']} GB/s")
        for x in peers["cache_node"]["rows"]:
            add(f"cache node {x['op']}: ops/s lode/memcached", x["lode_ops"] / x["memcached_ops"],
                f"{x['lode_ops']:.0f} vs {x['memcached_ops']:.0f} ops/s; p50 {x['lode_p50']:.0f} vs {x['memcached_p50']:.0f} µs; "
                f"p99 {x['lode_p99']:.0f} vs {x['memcached_p99']:.0f} µs",
                "paper: cache server GET < 50 µs median server-side" if x["op"] == "GET" else "")
    if peers:
        seal = peers["seal"]["us_per_chunk"]
        if "lode_seal_chunk_in_place" in seal:
            # Results from before chunk format v2: v1 against the primitives.
            add("seal a 512 KiB chunk: time ring primitives alone / lode", seal["ring_primitives_alone"] / seal["lode_seal_chunk_in_place"],
                f"{seal['lode_seal_chunk_in_place']:.0f} µs vs {seal['ring_primitives_alone']:.0f} µs per chunk "
                f"({(1 << 19) / seal['lode_seal_chunk_in_place'] / 1.048576:.0f} MiB/s)")
        else:
            raw, lz4 = seal["v2_none_32KiB_noise"], seal["v2_lz4_16KiB_text"]
            add("seal a 512 KiB chunk (v2, as is): time ring primitives alone / lode", seal["ring_primitives_alone"] / raw,
                f"{raw:.0f} µs vs {seal['ring_primitives_alone']:.0f} µs per chunk "
                f"({(1 << 19) / raw / 1.048576:.0f} MiB/s); with lz4 (new images' codec) on text "
                f"{lz4:.0f} µs ({(1 << 19) / lz4 / 1.048576:.0f} MiB/s): compression is the writer's added cost")
        f = peers["az_fetch"]["rows"]
        az, plain = f["AZ client k=4 m=2"], f["plain memcached get"]
        add("a chunk from the AZ fleet: p50 plain memcached get / lode k=4 m=2", plain["p50"] / az["p50"],
            f"lode {az['p50']:.0f} µs (p99 {az['p99']:.0f}, rebuilt and name-checked) vs one plain 512 KiB get "
            f"{plain['p50']:.0f} µs (p99 {plain['p99']:.0f})",
            "paper: AZ GET 550 µs median, 3.7 ms p99.9 (worker-observed, real network)")
        imp = peers["import"]
        li, ci = med(imp["lode_secs"]), med(imp["cp_secs"])
        add(f"import a {imp['mib']} MiB raw image (half repeated): time cp / lode", ci / li,
            f"{imp['mib'] * 1.048576 / li:.0f} vs {imp['mib'] * 1.048576 / ci:.0f} MB/s, medians of {imp['runs']}; "
            f"{mib(imp['stored'])} stored")
    if dedup:
        im = dedup["images"]
        lt, nt = sum(med(i["lode_secs"]) for i in im), sum(med(i["naive_secs"]) for i in im)
        add("flatten + publish the family: time naive/lode", nt / lt,
            f"{lt:.1f} s vs {nt:.1f} s (sum of per-image medians of {dedup['runs']} passes)")
        lu, nu = sum(i["lode_uploaded"] for i in im), sum(i["naive_uploaded"] for i in im)
        add("stored bytes for the family: naive/lode", nu / lu, f"{mib(lu)} vs {mib(nu)}")
    if starts:
        for t, im in starts["images"].items():
            lazy = med([x["secs"] for x in im["origin"]])
            exp = med([x["total_secs"] for x in im["export"]])
            unp = med([x["total_secs"] for x in im["unpack"]])
            add(f"start {t}: full pull (lode export) / lazy", exp / lazy,
                f"lazy {lazy:.2f} s; export {med([x['pull_secs'] for x in im['export']]):.2f} s + run = {exp:.2f} s")
            add(f"start {t}: unpack layers / lazy", unp / lazy,
                f"umoci raw unpack {med([x['pull_secs'] for x in im['unpack']]):.2f} s + run = {unp:.2f} s",
                "Slacker: pulling is 76% of start time" if t == "python" else "")
    if not bars:
        return ""
    fig, a = plt.subplots(figsize=(8, 0.28 * len(bars) + 1.2))
    names = [b[0] for b in bars][::-1]
    vals = [b[1] for b in bars][::-1]
    a.barh(names, vals, color=["#1b9e77" if v >= 1 else "#e7298a" for v in vals])
    a.axvline(1, color="black", lw=1)
    a.set_xscale("log")
    a.set_xlabel("ratio, > 1: lode ahead of its peer")
    a.set_title("lode against its peers, same run (> 1: lode ahead)")
    ticks = [t for t in (0.25, 0.5, 1, 2, 5, 10, 20, 50) if min(vals) / 1.5 <= t <= max(vals) * 1.5]
    a.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    a.minorticks_off()
    a.tick_params(axis="y", labelsize=7)
    a.grid(alpha=0.3, axis="x")
    plot = r.save(fig, "fig5-peers")
    cmds = []
    if peers:
        cmds = [f"`{peers[k]['command']}`" for k in ("nbd", "agent", "cache_node", "seal", "az_fetch")]
    return f"""## 5. Peers

What: each peer measured in the same run as lode, on the same data: lode's NBD server over
memory against `nbdkit memory` (fio's nbd engine, 4 KiB random reads, the better of two
runs each); the agent's whole read path (decrypted cache) against `nbdkit file` serving the
same image from the page cache; the lode cache node against memcached (128 KiB values, 16
connections, medians of rounds); sealing a chunk against the `ring` primitives it is made
of (Criterion); a chunk through the AZ client against one plain memcached get of the same
512 KiB; `lode import` against `cp` of the same file (both timed with the final `sync`);
the flattener against the naive pipeline (section 1); a
lazy start against fetching the whole image first, by `lode export` of the flattened image
from the same store or by unpacking its layers (what a registry pull does once the bytes
are local), then running the same command from local disk (section 2's starts, medians;
page cache dropped before each; lode's side includes its attach, FUSE and crun set-up{pull_note(starts)}).
Ratios are oriented so that above 1 means lode is ahead. Commands: {", ".join(cmds) or "-"}.

{plot}
{table(["comparison", "ratio", "figures", "paper / peer's own figure"], rows)}
"""


# ------------------------------------------------------------------ 7: snapshot


def fig_snapshot(r, snap):
    rows = snap["restore"]
    tiers = ["memory", "disk", "az", "origin"]
    modes = ["lazy", "lazy+prefetch", "eager"]
    colors = {"lazy": "#d95f02", "lazy+prefetch": "#1b9e77", "eager": "#7570b3"}
    get = lambda t, m: next(x for x in rows if x["tier"] == t and x["mode"] == m)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((a, "first_ms", "time to first answer"), (b, "all_ms", "time to the last answer")):
        for j, m in enumerate(modes):
            ax.bar([i + (j - 1) * 0.27 for i in range(len(tiers))], [get(t, m)[key] for t in tiers], 0.27,
                   color=colors[m], label=m)
        ax.set_xticks(range(len(tiers)), tiers)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"Snapshot restore: {title}")
        ax.grid(alpha=0.3, axis="y")
    a.legend(fontsize=7)
    plot = r.save(fig, "fig7-snapshot")
    table_rows, ratio_rows = [], []
    for t in tiers:
        for m in modes:
            x = get(t, m)
            f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
            table_rows.append([t, m, f(x["faults"], 0), f(x["prefetched"], 0), f(x["mib"]), f(x["first_ms"]), f(x["all_ms"])])
        lazy, pre, eager = get(t, "lazy"), get(t, "lazy+prefetch"), get(t, "eager")
        ratio_rows.append([t, f"{eager['first_ms'] / lazy['first_ms']:.0f}x", f"{lazy['all_ms'] / pre['all_ms']:.2f}x",
                           pct(1 - pre["faults"] / lazy["faults"]), f"{eager['all_ms'] / lazy['all_ms']:.2f}",
                           f"{eager['all_ms'] / pre['all_ms']:.2f}"])
    ratio_rows.append(["REAP (ASPLOS '21)", "", "3.7x", "97%", "", ""])
    k = snap["knobs"]
    lat = "; ".join(f"{x['tier']} p50 {x['p50_us']:.0f} µs, p99 {x['p99_us']:.0f} µs" for x in snap["latency"])
    return f"""## 7. Snapshot restore

What: `{snap['command']}`: a {k['SNAP_MIB']} MiB memory image holding an index of {k['KEYS']} keys,
published in 64 KiB chunks, restored through lode's userfaultfd handler into a client that
plays Firecracker's part, then {k['QUERIES']} lookups checked byte for byte. Lazy: pages fault
in on demand; lazy+prefetch: the working set recorded by an earlier restore is installed
in bulk first (REAP); eager: every non-zero chunk fetched before the first lookup (16 at a
time, CRIU-style). Four tier states, medians of {k['RUNS']} runs, tier states interleaved.
Fault service, lazy: {lat}.

{plot}
{table(["tier", "mode", "faults", "prefetched " + ("segments" if "demand_segments" in rows[0] else "chunks"), "MiB from the tier", "first answer ms", "all answered ms"], table_rows)}
{table(["tier", "first answer: eager/lazy", "all answered: lazy/prefetch", "faults saved by prefetch", "all answered: eager/lazy", "eager/prefetch"], ratio_rows)}
Firecracker's own target for a restore is under 8 ms (p90 5 ms) for a 2 vCPU / 512 MB
microVM; the lazy first answer above is that figure's counterpart here.
"""


# ------------------------------------------------------------------ 8. the fixed cost of a start

STARTCOST_STEPS = [("attach", "attach (control request)"), ("fuse_file", "open the FUSE file"),
                   ("loop_setup", "loop device"), ("mount", "mount ext4"), ("user_lookup", "user lookup"),
                   ("runtime", "runtime: set-up, command, teardown"), ("unmount", "unmount"),
                   ("loop_release", "loop release"), ("detach", "detach (control request)"),
                   ("other", "other, inside lode run"), ("process", "process: exec, exit, outside the steps")]
STARTCOST_GOAL_MS = 50


def startcost_figures(sc):
    """Medians per side: wall time, and per step for lode's two runtimes (`process` is the
    wall time outside lode run's own total: exec, dynamic linking, runtime start, exit)."""
    out = {}
    for side, xs in sc["samples"].items():
        m = {"wall_ms": med([x["wall_ms"] for x in xs])}
        if xs and "total_ms" in xs[0]:
            for k, _ in STARTCOST_STEPS:
                if k == "process":
                    m[k] = med([x["wall_ms"] - x["total_ms"] for x in xs])
                else:
                    m[k] = med([x.get(k + "_ms") for x in xs])
            m["total_ms"] = med([x["total_ms"] for x in xs])
        out[side] = m
    return out


def baseline_note(sc, f):
    """The earlier binary's figures, when the run had one (STARTCOST_BASELINE)."""
    if "baseline_chroot" not in f:
        return ""
    return (f"\n- The same rounds with {sc['baseline']['binary']} ({sc['baseline']['version']}) and an agent of "
            f"its own: {f['baseline_chroot']['wall_ms']:.2f} ms with the chroot runtime, "
            f"{f['baseline_crun']['wall_ms']:.2f} ms with crun.")


def fig_startcost(r, sc):
    f = startcost_figures(sc)
    base = f["chroot"]["wall_ms"]
    sides = [("lode_chroot", "lode run, chroot runtime"), ("lode_crun", "lode run, crun runtime")]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    colors = plt.get_cmap("tab20").colors
    for i, (side, label) in enumerate(sides):
        left = 0.0
        for j, (k, name) in enumerate(STARTCOST_STEPS):
            v = f[side].get(k) or 0.0
            ax.barh(i, v, left=left, color=colors[j % len(colors)], label=name if i == 0 else None)
            left += v
    ax.barh(len(sides), base, color="#444444", label="chroot of the unpacked tree")
    ax.set_yticks(range(len(sides) + 1), [s[1] for s in sides] + ["chroot"])
    ax.set_xlabel("ms (medians of each step)")
    ax.set_title("The fixed cost of a start, step by step")
    ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.45, -0.25))
    ax.grid(alpha=0.3, axis="x")
    plot = r.save(fig, "fig8-start-cost")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    rows = [[name, fmt(f["lode_chroot"].get(k)), fmt(f["lode_crun"].get(k))] for k, name in STARTCOST_STEPS]
    rows.append(["**wall time (median)**", f"**{fmt(f['lode_chroot']['wall_ms'])}**", f"**{fmt(f['lode_crun']['wall_ms'])}**"])
    over = {side: f[side]["wall_ms"] - base for side, _ in sides}
    met = lambda d: "met" if d <= STARTCOST_GOAL_MS else "not met"
    cmd = shell_words(sc["run_command"])
    return f"""## 8. The fixed cost of a start

What: `lode run` of a tiny image (busybox-static, {sc['tree_bytes'] / MIB:.1f} MiB of files in an
{sc['image_size'] >> 20} MiB ext4) whose chunks are all in the agent's memory, running `{cmd}`, with
the chroot runtime and with crun, against `chroot TREE {cmd}` of the same tree unpacked on
local disk; {sc['rounds']} rounds, the three (and `lode --version`, a process start of the same
binary) interleaved in each, medians. Each `lode run` reports its own steps
(`lode run --json`); "process" is the wall time outside them (exec, the binary's start
and exit). Measured by `{sc['bench_command']}` at {sc['recorded_at']}.

{plot}
{table(["step (ms, median)", "lode run --runtime chroot", "lode run --runtime crun"], rows)}
- chroot of the unpacked tree: {base:.2f} ms; `lode --version`: {f['lode_version']['wall_ms']:.2f} ms.{baseline_note(sc, f)}
- lode run over the chroot: **{over['lode_chroot']:.1f} ms** with the chroot runtime
  ({met(over['lode_chroot'])}), **{over['lode_crun']:.1f} ms** with crun ({met(over['lode_crun'])});
  goal: at most {STARTCOST_GOAL_MS} ms over the chroot (the paper starts functions in as little as 50 ms).
"""


# ------------------------------------------------------------------ headline


def fig_network(r, net):
    """9: starts and the replay on scripts/testnet.sh's hosts."""
    imgs = net["images"]
    tags = list(imgs)
    ways = [("registry", "registry pull + unpack", "#999999"), ("export", "`lode export` + loop mount", "#666666"),
            ("demand", "lazy, on demand", "#e7298a"), ("working_set", "lazy + working set", "#1b9e77"),
            ("az", "lazy, AZ cache warm", "#d95f02")]

    def secs(im, way):
        return med([x["total_secs"] if "total_secs" in x else x["secs"] for x in im[way]])

    fig, a = plt.subplots(figsize=(8, 3.6))
    w = 0.8 / len(ways)
    for k, (way, label, color) in enumerate(ways):
        a.bar([i - 0.4 + w * (k + 0.5) for i in range(len(tags))], [secs(imgs[t], way) for t in tags], w,
              color=color, label=label)
    a.set_xticks(range(len(tags)), tags)
    a.set_ylabel("seconds to the command's exit (median)")
    a.set_yscale("log")
    a.set_title(f"Cold starts over the test network (median of {net['runs']})")
    a.legend(fontsize=7)
    a.grid(alpha=0.3, axis="y")
    plot = r.save(fig, "fig9-network-starts")
    rows, vs_pull, vs_demand = [], [], []
    for t in tags:
        im = imgs[t]
        size = im["image_size"]
        pull = min(secs(im, "export"), secs(im, "registry"))
        ws, dem = secs(im, "working_set"), secs(im, "demand")
        vs_pull.append(pull / ws)
        vs_demand.append(dem / ws)

        def fetched(way):
            return med([x["tiers"]["origin"]["bytes"] for x in im[way]]) / size

        # The agent's per-image figures (`lode stats --json`: prefetch, by manifest).
        pre = [(x.get("prefetch") or {}).values() for x in im["working_set"]]
        used = med([sum(m["working_set"]["used_bytes"] for m in p) for p in pre])
        wasted = med([sum(m["working_set"]["wasted_bytes"] for m in p) for p in pre])
        rows.append([t, mib(size), *[f"{secs(im, way):.2f} s" for way, _, _ in ways],
                     f"**{pull / ws:.1f}x**", f"**{dem / ws:.1f}x**", pct(fetched("demand")), pct(fetched("working_set")),
                     f"{mib(used)} / {mib(wasted)}"])
    rep = net.get("replay")
    text_replay = ""
    if rep:
        lplot, lrows = latency_cdf(r, rep, "fig9-network-latency-cdf", "Read latency per tier, replay over the test network",
                                   {"origin": "origin (S3 on the origin host)"})
        st = rep["starts"]
        half = st[len(st) // 2:]
        hits = {t: sum(x["tiers"].get(t, 0) for x in half) for t in TIERS}
        remote = (hits["az"] + hits["origin"]) or 1
        text_replay = f"""### The replay over the network

Section 4's replay ({len(rep['functions'])} functions, {len(st)} starts, the same seed and
cache sizes) with the three agents on worker hosts, the six cache nodes on cache hosts
and the store on the origin host. Second half of the starts, requests each tier
answered: ciphertext memory {hits['memory']} and disk {hits['disk']} (lookups of one
16 KiB segment each), AZ {hits['az']} and origin {hits['origin']} (fetches of a whole
chunk object). The units differ, so the local share is not comparable with the paper's
67%; of the chunk fetches that left the worker, **{pct(hits['az'] / remote)} came from
the AZ fleet and {100 * hits['origin'] / remote:.2f}% from the origin** (paper: 32% and
0.06% of all chunks, i.e. 99.8% and 0.19% of those that left the worker). Start median
{med([x['secs'] for x in st]):.2f} s (first start of each function
{med([x['secs'] for i, x in enumerate(st) if all(p['fn'] != x['fn'] for p in st[:i])]):.2f} s).

{lplot}
{table(["tier", "hits", "p50 (bucket)", "p90", "p99", "mean"], lrows)}
A tier's latency here is that of the agent's lookups while starts run: many fetches at
once (a start's demand reads, its working set and readahead, up to 16 ahead) on the two
cores every host shares. One read at a time is measured below. Paper: AZ mode near
2.75 ms (with decryption), worker-observed AZ GETs 550 µs median; S3 fetch 36 ms median,
175 ms p99.9.
"""
    text_az = ""
    az = net.get("az_fetch")
    if az:
        rows_az = [[k, f"{v['p50_ms']:.3f} ms", f"{v['p99_ms']:.3f} ms"] for k, v in az["rows"].items()]
        rt = az["rows"]["round trip (memcached version)"]["p50_ms"]
        plain = az["rows"]["plain get of 512 KiB"]["p50_ms"]
        lode_az = az["rows"]["AzClient::get of a chunk (k=4, m=2)"]["p50_ms"]
        text_az = f"""### The AZ tier's fetch over the network

What: from a worker host to six `lode cache-node`s on cache hosts, on a test network of
its own: the link's round trip (a memcached `version`), a plain memcached `get` of one
stripe and of an item of a whole chunk's 512 KiB on one node, lode's AZ client fetching
a chunk (k=4 of six stripes, rebuilt and its header checked), and an agent's read of a
chunk from the AZ tier and from the origin (`{az['command']}`).

{table(["what", "p50", "p99"], rows_az)}
- lode's AZ fetch p50 is **{lode_az / plain:.2f}x** one plain get of the same 512 KiB
  over the same link, and **{lode_az / (rt + plain):.2f}x** the round trip plus that get
  (target: within 1.5x).
"""
    links = "\n".join("    " + line for line in net["links"].strip().splitlines())
    return f"""## 9. Over a network

What: section 2's cold starts and section 4's replay again, on the test network of
[network.md](network.md) (`scripts/testnet.sh`): every host a network namespace behind a
router namespace, the origin an S3-protocol server (the one the test suite uses) on its
own host with a registry (Debian's `docker-registry`) beside it, six `lode cache-node`s
on hosts of their own, the agents on worker hosts. Links as `scripts/testnet.sh status`
printed them:

{links}

Per image, {net['runs']} runs each, medians, page cache dropped before each, a fresh agent
with every local cache empty for each lazy start (`lode run`, as in section 2):
- registry pull + unpack: `skopeo copy` from the origin's registry into a local OCI
  layout on the worker, `umoci raw unpack`, the command in a chroot;
- `lode export` + loop mount: the whole flattened image from the S3 origin, then the
  command from it;
- lazy, on demand: the agent fetches what is read, nothing else (no working set, no
  readahead);
- lazy + working set: the agent's defaults: the working set an earlier start recorded
  (`lode inspect` shows it; docs/agent.md) fetched ahead of demand, and readahead;
- lazy, AZ cache warm: on demand, with the fleet filled by an earlier start.

{plot}
{table(["image", "size", *[label for _, label, _ in ways], "working set vs the faster pull", "working set vs on demand",
        "fetched, on demand", "fetched, working set", "prefetched used / wasted"], rows)}
- Lazy with the working set against the faster full pull: {min(vs_pull):.1f}-{max(vs_pull):.1f}x
  (target ≥ 5x); against lazy on demand only: {min(vs_demand):.1f}-{max(vs_demand):.1f}x (target ≥ 2x).

{text_replay}
{text_az}"""


def fig_vm(r, vm):
    """10: a microVM start beside a container start of the same image."""
    label = {"vm_file": "`lode vm run` (the agent's FUSE file)", "vm_nbd": "`lode vm run --via nbd`",
             "run": "`lode run` (crun container)"}
    rows = []
    for way, recs in vm["ways"].items():
        rows.append([label[way], f"{med([x['first_output_secs'] for x in recs]):.2f} s",
                     f"{med([x['total_secs'] for x in recs]):.2f} s", mib(med([x['fetched_bytes'] for x in recs])),
                     pct(med([x['fetched_bytes'] for x in recs]) / vm["image_size"])])
    cmd = shell_words([vm["image"], "--", *vm["command"]])
    return f"""## 10. A microVM start

What: `lode vm run {cmd}`: QEMU (`-M pc`, virtio-blk, accelerator {vm['accel']}) boots
Debian's cloud kernel with lode's initramfs, which mounts the image's ext4 from the disk
the agent serves and runs the command ([vm.md](vm.md)), beside `lode run` of the same
image and command. Each run with a fresh agent (every cache empty, the store on local
disk) and the page cache dropped; {vm['runs']} runs each, medians. Time to first output is
to the first byte the command printed on lode's stdout. Fetched: the ciphertext the
agent's origin tier served, over the image's {mib(vm['image_size'])} of ext4.

{table(["how", "first output", "exit", "fetched", "share of the image"], rows)}
Under TCG every guest instruction is emulated: the difference is the kernel's boot and
python's own start inside the guest, not what lode fetches (the guest reads what the
container reads). KVM cannot run guests on this machine, so a boot with hardware
virtualisation was not measured.
"""


def sim_shares(report):
    """A `lode sim` report's shares as local / az / origin."""
    sh = {"local": 0.0, "az": 0.0, "origin": 0.0}
    for t in report["tiers"]:
        sh[t["name"] if t["name"] in ("az", "origin") else "local"] += t["share"]
    return sh


def fig_scale(r, sc):
    """11: the fleet simulator, cache sizing, eviction, the AZ fleet at scale, bursts."""
    parts = []
    v = sc["validation"]
    m, p = v["measured"], v["predicted"]
    ps = sim_shares(p)
    rows = [[k, pct(m["shares"][k]), pct(ps[k]), f"{(ps[k] - m['shares'][k]) * 100:+.1f} pp"]
            for k in ("local", "az", "origin")]
    mp50, pp50 = m["start_p50"] * 1000, p["start_latency"]["p50_ms"]
    rows.append(["start p50", f"{mp50:.0f} ms", f"{pp50:.0f} ms", f"{(pp50 / mp50 - 1) * 100:+.0f}%"])
    cal = sc["calibration"]
    bw = cal["bandwidth_bytes_per_s"]
    parts.append(f"""## 11. Fleet scale

What: `lode sim` ([scale.md](scale.md)), a discrete-event model of a fleet (workers with
their local tiers, the AZ fleet with k+m erasure coding and its placement, the origin),
calibrated by this run and checked against a real replay before it is trusted at scale.

### Calibration

Measured apart from the replay it predicts: each of the {len(cal['warm_start_ms']['images'])} function images
started cold on one agent (from the origin, filling an AZ fleet of its own), then on a
fresh agent (from that fleet) and again (warm, every chunk local). From those agents:
the per-tier hit latency histograms, each image's warm start time (median
{cal['warm_start_ms']['default']:.0f} ms), and per-worker read bandwidth, a whole image file read through a
fresh agent: {bw['az'] / 1e6:.0f} MB/s from the AZ tier, {bw['origin'] / 1e6:.0f} MB/s from the origin. The file is
[evaluation/calibration.json](evaluation/calibration.json) (`lode sim --calibration`).

### Predicted beside measured

The replay of section 4 again (the same seed, {v['nstart']} starts of the same functions on three
agents, six cache nodes of 1 GiB, caches {', '.join(f'{k} {x}' for k, x in v['caches'].items())}), each agent
recording a read trace (`lode agent --trace`). Measured: each chunk's first read by each
start, by the tier that served it (decrypted, memory and disk are local), and the
median of the starts' wall time. Predicted: `lode sim --trace` over those traces (the
same starts on the same workers; the recorded tiers are not used), with the calibration
above, memory {v['caches']['memory']} and disk {v['caches']['disk']} per worker.

{table(["", "measured", "predicted", "difference"], rows)}""")
    adv = sc.get("advise")
    if adv:
        rows = []
        for t in adv["advice"]["tiers"]:
            rows.append([f"{t['tier']} ({t['scope']})", mib(t["rule_bytes"]), f"{t['break_even_s'] / 3600:.1f} h",
                         "unreachable" if t["goal_unreachable"] else mib(t["goal_bytes"]), mib(t["bytes"]),
                         f"{t['latency_ms'][2]:.0f} ms", f"${t['cost_per_hour']:.4f}"])
        rp = adv["replay"]
        paper = sc["paper_shares"]
        rows2 = [["paper (Lambda)", pct(paper["local"]), pct(paper["az"]), f"{paper['origin'] * 100:.2f}%", "", ""],
                 [f"replay, caches by hand (memory {v['caches']['memory']}, disk {v['caches']['disk']}, nodes 1 GiB)",
                  pct(m["shares"]["local"]), pct(m["shares"]["az"]), f"{m['shares']['origin'] * 100:.2f}%",
                  f"{m['start_p50'] * 1000:.0f} ms", str(v["nstart"])],
                 [f"replay, caches by `lode advise` (memory {rp['caches']['memory']}, disk {rp['caches']['disk']}, nodes {rp['node_memory']})",
                  pct(rp["shares"]["local"]), pct(rp["shares"]["az"]), f"{rp['shares']['origin'] * 100:.2f}%",
                  f"{rp['start_p50'] * 1000:.0f} ms", str(rp["starts"])]]
        sweep = [[f"{x['disk_mib']} MiB", pct(sim_shares(x["report"])["local"]), pct(sim_shares(x["report"])["az"]),
                  f"{sim_shares(x['report'])['origin'] * 100:.2f}%"] for x in adv["disk_sweep"]]
        need = next((x["disk_mib"] for x in adv["disk_sweep"] if sim_shares(x["report"])["local"] >= paper["local"]), None)
        pr = sc["prices"]
        parts.append(f"""### Sizing the caches: `lode advise`

`lode advise` over the traced replay's traces with the calibration above, at example
prices (memory ${pr['memory_gib_hour']} and flash ${pr['flash_gib_hour']} per GiB-hour, the origin ${pr['origin_per_1000_requests']} per
1000 requests and ${pr['origin_per_gib']} per GiB) and a goal of start p99 ≤ {adv['goal_ms']:.0f} ms (5% under what the
simulator predicts at the hand-sized caches; the p50 is the warm start's, which no cache
size moves). Per tier: the five-minute rule's size (the working set over the break-even
interval), the size the goal needs (that tier grown alone), the larger (advised), and
the start p99 and cost per hour the simulator predicts there.

{table(["tier", "five-minute rule", "break-even", "latency goal", "advised", "p99", "cost"], rows)}
The same replay (same seed, same starts) on real agents with the advised sizes, beside
the hand-sized one and the paper's shares of chunks served:

{table(["", "local", "AZ", "origin", "start p50", "starts"], rows2)}
What the paper's {pct(paper['local'])} local needs on this workload: the simulator over the same traces with
the local disk swept (memory {v['caches']['memory']}, six 1 GiB nodes).
{"The smallest disk that reaches it: " + str(need) + " MiB per worker." if need else "No disk size up to 1 GiB reaches it on this workload: its compulsory misses (each function's first start on each of three random workers) cap the local share."}

{table(["disk per worker", "local", "AZ", "origin"], sweep)}""")
    s = (sc.get("scale") or {}).get("report")
    if s:
        parts.append(f"""### A fleet

`lode sim {' '.join(sc['scale']['args'][:-2])} --calibration calibration.json` (the synthetic Zipf
workload: Zipf 1.1, seed 7, the default local tiers): {s['starts']:,} starts, {s['reads']:,} chunk reads over {s['simulated_s'] / 3600:.2f} simulated
hours took {s.get('wall_s', s.get('bench_wall_secs', 0)):.0f} s of wall time and peaked at {mib(s.get('peak_rss_bytes', 0))} resident.
Predicted: local {pct(sim_shares(s)['local'])}, AZ {pct(sim_shares(s)['az'])}, origin {pct(sim_shares(s)['origin'], )};
origin {s['origin']['requests_per_s_mean']:.0f} requests/s (peak second {s['origin']['requests_per_s_peak']}), {s['origin']['bytes_per_s_mean'] / 1e6:.0f} MB/s;
AZ nodes {s['az']['nodes']}, busiest over mean {s['az']['imbalance']:.2f}; start p50 {s['start_latency']['p50_ms']:.0f} ms, p99
{s['start_latency']['p99_ms']:.0f} ms.
""")
        pl = sc["scale"].get("placements", {})
        if pl:
            rows = [[k, f"{x['simulated_s'] / 60:.0f} min", f"{x['az']['requests_mean']:,.0f}", f"{x['az']['requests_max']:,}",
                     f"{x['az']['imbalance']:.3f}", mib(x["az"]["bytes_held_max"]), mib(x["az"]["bytes_held"] / x["az"]["nodes"])]
                    for k, x in pl.items()]
            parts.append(f"""The same fleet with each AZ placement (`--az-placement`): stripe requests per node
and bytes held. Bounded placement caps each node's share of stripe *slots* at (1+ε) of
the mean (ε = 0.25; lode-az's tests hold it); the requests follow the workload's hot
chunks, whose stripes sit on six nodes whichever placement chose them.

{table(["placement", "simulated", "requests per node, mean", "busiest node", "busiest / mean", "fullest node holds", "mean node holds"], rows)}""")
    ev = sc.get("eviction")
    if ev:
        rows = []
        for pol in ev["policies"]:
            sm, ag = ev["sim"][pol], ev["agents"][pol]
            rows.append([pol, pct(sim_shares(sm)["local"]), pct(ag["shares"]["local"]), pct(ag["shares_all"]["local"]),
                         pct(ag["shares"]["origin"]), f"{ag['start_p50'] * 1000:.0f} ms"])
        st = ev["agents_setup"]
        parts.append(f"""### Eviction in the worker's local tiers under cron bursts

The same caches on every row; only the local tiers' eviction policy changes
(`--cache-policy`). Simulator: `lode sim {' '.join(ev['sim_args'][:-2])}` with each policy
on both local tiers (every minute, 20 one-off images started once each). Real agents:
the replay's starts ({st['nstart']}, the same seed) on three agents with after every
{st['every']} starts a cron tick of {st['per_tick']} one-off images ({st['one_offs']} in all: the base image plus 8-16
MiB of data each start reads whole), read traces recorded; local share of the Zipf
starts' chunk reads, and of all reads.

{table(["policy", "simulated local", "agents: local (Zipf starts)", "agents: local (all)", "agents: origin (Zipf)", "agents: start p50"], rows)}""")
    az = sc.get("az_tail")
    if az:
        rows = [[r["hedge"], r["fleet"], f"{r['p50_us'] / 1000:.2f} ms", f"{r['p99_us'] / 1000:.2f} ms",
                 f"{r['requests_per_read']:.2f}", f"{r['kib_per_read']:.0f} KiB"] for r in az["rows"]]
        parts.append(f"""### The AZ tail with one slow node

`{az['command']}`: 512 KiB chunks, k=4 m=2, {az['setup'].replace('; slow node', '; the slow node')}. The three modes read in turn, read by read. `all` asks
all six nodes and takes the first four stripes (the client before hedging); `off` asks
the four data nodes and more only on a failure; `p95` asks the data nodes and hedges a
stripe request slower than the p95 to a parity node (the default).

{table(["hedge", "fleet", "p50", "p99", "requests per read", "read per chunk"], rows)}""")
    b = sc.get("bursts")
    if b:
        rows = [[r["mode"], r["clones"], f"{r['first_answer_ms_p50']:.1f} / {r['first_answer_ms_p99']:.1f} ms",
                 f"{r['all_answers_ms_p50']:.0f} / {r['all_answers_ms_p99']:.0f} ms",
                 f"{r['origin_fetches']} of {r['nonzero_chunks']}", r["segments_decrypted"],
                 f"{r['handler_rss_peak_mib'] - r['handler_rss_before_mib']:.1f} MiB", r["distinct_generation_ids"]]
                for r in b["rows"]]
        r0 = b["rows"][0]
        parts.append(f"""### Bursts of sessions from one snapshot

`{b['command']}`: N clones of one {mib(r0['snapshot_bytes'])} memory snapshot ({r0['nonzero_chunks']} stored chunks of
{r0['chunk_bytes'] >> 10} KiB) restored at once through one `lode snapshot serve` handler, each clone its
own process running {r0['queries']} index queries; cold (the origin, a local directory) and warm (the
local disk). Per clone: time to the first and to the last answer (p50 / p99 over the
clones). Per burst: chunks fetched from the origin beside the snapshot's stored chunks,
segments decrypted, the handler's memory growth, and distinct generation ids.

{table(["mode", "clones", "first answer p50 / p99", "all answers p50 / p99", "origin fetches", "segments decrypted", "handler memory growth", "generation ids"], rows)}""")
        fl = b.get("fleet")
        if fl:
            rows = []
            for md in fl["modes"]:
                cap = md["capacity"]
                for bu in md["bursts"]:
                    rows.append([md["mode"], f"{cap['clones_per_worker']}" + (" (extrapolated)" if cap["extrapolated"] else ""),
                                 f"{md['fleet_capacity']:,}", f"{bu['sessions']:,}",
                                 bu["workers"], f"{bu['at']['first_answer_ms_p50']:.0f} / {bu['at']['first_answer_ms_p99']:.0f} ms",
                                 "yes" if bu["fits"] else "no", f"{bu['origin_requests']:,.0f}", mib(bu["origin_bytes"])])
            parts.append(f"""Fed to `lode sim-burst {' '.join(b['fleet_args'])}` ([scale.md](scale.md),
"Snapshot bursts"): per worker the most clones whose first-answer p99 stays within
300 ms (extrapolated: past the largest burst measured, along the last measured slope),
the fleet's capacity, and a burst of N sessions spread over the fleet.

{table(["mode", "clones per worker", "fleet capacity", "burst", "workers", "first answer p50 / p99", "within goal", "origin requests", "origin bytes"], rows)}""")
    return "\n".join(parts)


def tier_counts(rep, tier, key="hit_latency_counts"):
    counts = None
    for st in rep["agent_stats"]:
        for t in st["tiers"]:
            if t["name"] == tier:
                counts = list(t[key]) if counts is None else [x + y for x, y in zip(counts, t[key])]
    return counts


def headline(dedup, starts, replay, peers, snap, startcost=None, net=None):
    rows = []
    if dedup:
        im = dedup["images"]
        lu, nu, tu = (sum(i[k] for i in im) for k in ("lode_uploaded", "naive_uploaded", "registry_new_tar"))
        rows.append(["1", "stored bytes, image family", f"lode {mib(lu)}; naive mkfs {mib(nu)} ({nu / lu:.2f}x); "
                     f"distinct layers {mib(tu)} uncompressed ({tu / lu:.2f}x)", "~80% of uploads add no new chunk"])
    if starts:
        fr = [med([x["tiers"]["origin"]["bytes"] for x in im["origin"]]) / im["image_size"] for im in starts["images"].values()]
        rows.append(["2", "share of an image fetched to start it", f"median {pct(med(fr))} (range {pct(min(fr))}-{pct(max(fr))})",
                     "Slacker: 6.4%"])
    if replay:
        bounds = replay["agent_stats"][0]["tiers"][0]["latency_buckets_us"]
        parts = []
        for tier in ("disk", "az"):
            c = tier_counts(replay, tier)
            if c and sum(c):
                parts.append(f"{tier} p50 {quantile(bounds, c, 0.5)}")
        rows.append(["3", "chunk latency by tier (agent histograms)", "; ".join(parts),
                     "local mode <100 µs, AZ mode ≈2.75 ms"])
        half = replay["starts"][len(replay["starts"]) // 2:]
        hits = {t: sum(x["tiers"].get(t, 0) for x in half) for t in TIERS}
        below = sum(hits[t] for t in TIERS[1:]) or 1
        rows.append(["4", "where fetched chunks came from (second half of the replay)",
                     f"local {pct((hits['memory'] + hits['disk']) / below)}, AZ {pct(hits['az'] / below)}, "
                     f"origin {100 * hits['origin'] / below:.2f}%", "67% / 32% / 0.06%"])
    if starts:
        r = [med([x["total_secs"] for x in im["unpack"]]) / med([x["secs"] for x in im["origin"]]) for im in starts["images"].values()]
        e = [med([x["total_secs"] for x in im["export"]]) / med([x["secs"] for x in im["origin"]]) for im in starts["images"].values()]
        rows.append(["5", "lazy start against pulling first (unpack layers / lode export)",
                     f"{med(r):.1f}x / {med(e):.1f}x faster (medians over the family)", "Slacker: pull is 76% of start time"])
    if peers:
        n = {(x["link"], x["qd"]): x for x in peers["nbd"]["rows"]}
        x = n.get(("unix", 1))
        c = {x["op"]: x for x in peers["cache_node"]["rows"]}
        rows.append(["5", "NBD QD1 p50 vs nbdkit; cache node GET vs memcached",
                     (f"{x['lode_p50']:.0f} vs {x['nbdkit_p50']:.0f} µs; " if x else "")
                     + f"{c['GET']['lode_ops'] / c['GET']['memcached_ops']:.2f}x ops/s", ""])
    if starts:
        im = starts["images"]
        rows.append(["6", "a cold start's origin requests (512 KiB GETs)",
                     ", ".join(f"{t} {med([x['tiers']['origin']['hits'] for x in v['origin']]):.0f}" for t, v in im.items()), ""])
    if snap:
        rs = snap["restore"]
        g = lambda t, m, k: next(x[k] for x in rs if x["tier"] == t and x["mode"] == m)
        sp = [g(t, "lazy", "all_ms") / g(t, "lazy+prefetch", "all_ms") for t in ("memory", "disk", "az", "origin")]
        fa = [g(t, "lazy", "first_ms") for t in ("memory", "disk", "az", "origin")]
        rows.append(["7", "snapshot: working-set prefetch speed-up; lazy first answer",
                     f"{min(sp):.2f}-{max(sp):.2f}x; {min(fa):.1f}-{max(fa):.1f} ms (eager: "
                     f"{min(g(t, 'eager', 'first_ms') for t in ('memory', 'disk', 'az', 'origin')):.0f}-"
                     f"{max(g(t, 'eager', 'first_ms') for t in ('memory', 'disk', 'az', 'origin')):.0f} ms)",
                     "REAP 3.7x; Firecracker restore <8 ms"])
    if startcost:
        f = startcost_figures(startcost)
        base = f["chroot"]["wall_ms"]
        rows.append(["8", "lode run of a tiny warm image over a chroot of its tree (chroot / crun runtime)",
                     f"+{f['lode_chroot']['wall_ms'] - base:.1f} / +{f['lode_crun']['wall_ms'] - base:.1f} ms "
                     f"(chroot {base:.1f} ms)", f"goal ≤ {STARTCOST_GOAL_MS} ms over; paper: starts in as little as 50 ms"])
    if net:
        vp, vd = [], []
        for im in net["images"].values():
            sec = {w: med([x["total_secs"] if "total_secs" in x else x["secs"] for x in im[w]])
                   for w in ("export", "registry", "demand", "working_set")}
            vp.append(min(sec["export"], sec["registry"]) / sec["working_set"])
            vd.append(sec["demand"] / sec["working_set"])
        rows.append(["9", "cold start over a network: lazy + working set against a full pull / lazy on demand",
                     f"{min(vp):.1f}-{max(vp):.1f}x / {min(vd):.1f}-{max(vd):.1f}x faster", "targets ≥ 5x / ≥ 2x"])
    return "## Headline figures\n\n" + table(["fig.", "what", "measured here", "paper / reference"], rows)


# ------------------------------------------------------------------ the report


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    results = sys.argv[1]
    out_md = sys.argv[2] if len(sys.argv) == 3 else os.path.join(os.path.dirname(__file__), "..", "docs", "EVALUATION.md")
    r = Report(results, out_md)
    machine = r.load("machine") or {}
    dedup, starts, replay, peers, snap, startcost, net, vm, scale = (
        r.load(n) for n in ("dedup", "starts", "replay", "peers", "snapshot", "startcost", "network", "vm", "scale"))
    if not any((dedup, starts, replay, peers, snap, startcost, net, vm, scale)):
        sys.exit(f"evaluation: no section results in {results}")
    runs = machine.get("invocations", [])
    ran = "; ".join(f"`{i['command'].strip()}` on {i['date']} ({', '.join(i['sections'])}: {i['secs']} s"
                    + (f"; {i['note']}" if i.get("note") else "") + ")" for i in runs)
    head = f"""# lode evaluation

Generated from the measurements of {ran or 'scripts/bench.sh'}. Every number below is
computed by `scripts/evaluation.py` from what was recorded (`evaluation/*.json`; the
papers' figures are labelled as such). Re-run it on your own machine to get your own
figures (`scripts/bench.sh --quick` for the quick subset; see the README's "Evaluation").

| machine | |
|---|---|
"""
    for k in ("commit", "host", "kernel", "cpu", "cores", "memory", "disk", "tools"):
        if k in machine:
            head += f"| {k} | {machine[k]} |\n"
    head += """
This is a 2-core VM with no network: in sections 1-7 the origin store is a local
directory and the AZ fleet is six lode cache nodes on loopback sharing the same two
cores, so latencies are lode's own costs, not a network's, and ratios measured in the
same run mean more than any absolute figure. Section 8 puts a network back: hosts in
network namespaces on this machine, with S3-like and AZ-like link delays
([network.md](network.md)); the hosts still share the two cores.

Studies measured on their own, outside `scripts/bench.sh`: garbage collection
([evaluation/gc.md](evaluation/gc.md)), the control plane's start latency and throughput
([evaluation/control.md](evaluation/control.md)) and warm placement against random
([evaluation/placement.md](evaluation/placement.md)).

"""
    r.add(head)
    r.add(headline(dedup, starts, replay, peers, snap, startcost, net))
    if dedup:
        r.add(fig_dedup(r, dedup, replay))
    if starts:
        t2, t6 = fig_starts(r, starts)
        r.add(t2)
    if replay:
        r.add(fig_latency(r, replay))
        r.add(fig_replay(r, replay))
    r.add(fig_peers(r, peers, dedup, starts))
    if starts:
        r.add(t6)
    if snap:
        r.add(fig_snapshot(r, snap))
    if startcost:
        r.add(fig_startcost(r, startcost))
    if net:
        r.add(fig_network(r, net))
    if vm:
        r.add(fig_vm(r, vm))
    if scale:
        r.add(fig_scale(r, scale))
    missing = [n for n, v in (("1 dedup", dedup), ("2/6 starts", starts), ("3/4 replay", replay), ("5 peers", peers),
                              ("7 snapshot", snap), ("8 startcost", startcost), ("9 network", net),
                              ("10 vm", vm), ("11 scale", scale)) if v is None]
    if missing:
        r.add("Sections not run this time: " + ", ".join(missing) + ".\n")
    with open(out_md + ".tmp", "w") as f:
        f.write("\n".join(r.parts))
    os.replace(out_md + ".tmp", out_md)
    print(f"wrote {out_md} and {r.plot_dir}/", file=sys.stderr)


if __name__ == "__main__":
    main()

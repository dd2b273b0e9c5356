#!/usr/bin/python3
"""Tests of the evaluation scripts (scripts/test.sh runs them after the cargo tests).

- docs/EVALUATION.md must be exactly what scripts/evaluation.py renders from the results
  committed beside it (docs/evaluation/*.json): the report is generated, never edited.
- The function images bench.py adds to an OCI layout must be valid (their diff ids match
  their layers) and flatten with lode (LODE: the binary; default target/debug/lode).
- The helpers the figures rest on: counter deltas, histogram quantiles and CDFs.
"""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench  # noqa: E402
import evaluation  # noqa: E402


def tiny_layout(path):
    """An OCI layout with one image, `base`, of one layer holding /bin/hello."""
    os.makedirs(os.path.join(path, "blobs", "sha256"))
    with open(os.path.join(path, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        d = tarfile.TarInfo("bin")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(d)
        body = b"#!/bin/sh\necho hello\n"
        f = tarfile.TarInfo("bin/hello")
        f.size, f.mode = len(body), 0o755
        tar.addfile(f, io.BytesIO(body))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/hello"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()]},
        "history": [{"created_by": "test"}],
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": bench.write_blob(path, config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": bench.write_blob(path, layer), "size": len(layer)}],
    }).encode()
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": bench.write_blob(path, manifest),
            "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "base"}}]}, f)


class FunctionImages(unittest.TestCase):
    def test_added_image_is_valid_and_flattens(self):
        with tempfile.TemporaryDirectory() as tmp:
            layout = os.path.join(tmp, "layout")
            tiny_layout(layout)
            before = os.stat(os.path.join(layout, "index.json")).st_ino
            bench.add_function_image(layout, "base", "fn00-base", [("main.sh", b"echo fn\n"), ("data.bin", b"x" * 70000)])
            self.assertNotEqual(os.stat(os.path.join(layout, "index.json")).st_ino, before,
                                "index.json must be replaced, not rewritten (hard-linked layouts)")
            m = bench.tag_manifest(layout, "fn00-base")
            self.assertEqual(len(m["layers"]), 2)
            base = bench.tag_manifest(layout, "base")
            self.assertEqual(m["layers"][0], base["layers"][0])
            config = json.loads(bench.read_blob(layout, m["config"]["digest"]))
            for layer, diff_id in zip(m["layers"], config["rootfs"]["diff_ids"]):
                blob = bench.read_blob(layout, layer["digest"])
                self.assertEqual(len(blob), layer["size"])
                self.assertEqual("sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest(), diff_id)
            self.assertEqual(len(config["history"]), 2)
            with tarfile.open(fileobj=io.BytesIO(gzip.decompress(bench.read_blob(layout, m["layers"][1]["digest"])))) as t:
                self.assertEqual(t.getnames(), ["srv", "srv/fn", "srv/fn/main.sh", "srv/fn/data.bin"])
                self.assertEqual(t.extractfile("srv/fn/data.bin").read(), b"x" * 70000)

            lode = os.environ.get("LODE", os.path.join(REPO, "target", "debug", "lode"))
            if not os.path.exists(lode):
                self.skipTest(f"no lode binary at {lode} (cargo build first)")
            env = dict(os.environ, LODE_HOME=os.path.join(tmp, "home"))
            out = subprocess.run([lode, "--json", "-q", "flatten", f"oci:{layout}:fn00-base", "--tag", "fn"],
                                 env=env, capture_output=True, text=True)
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(len(json.loads(out.stdout)["layers"]), 2)
            exported = os.path.join(tmp, "fn.ext4")
            subprocess.run([lode, "-q", "export", "fn", exported], env=env, check=True, capture_output=True)
            got = subprocess.run(["debugfs", "-R", "cat /srv/fn/main.sh", exported], capture_output=True)
            self.assertEqual(got.stdout, b"echo fn\n")


class Helpers(unittest.TestCase):
    def test_delta_subtracts_every_tier(self):
        def snap(hits, reads):
            return {"tiers": [{"name": "origin", "hits": hits, "misses": 1, "bytes": hits * 10}],
                    "reads": reads, "read_bytes": reads * 4096, "zero_chunk_reads": 0, "joined_fetches": 2}
        d = bench.delta(snap(3, 10), snap(8, 15))
        self.assertEqual(d["tiers"]["origin"], {"hits": 5, "misses": 0, "bytes": 50})
        self.assertEqual((d["reads"], d["read_bytes"], d["joined_fetches"]), (5, 5 * 4096, 0))

    def test_zipf_weights_fall_as_rank_rises(self):
        w = bench.zipf_weights(4, 1.0)
        self.assertEqual(w, [1.0, 0.5, 1 / 3, 0.25])

    def test_shown_commands_split_back_to_what_ran(self):
        import shlex
        for args in [*bench.COMMANDS.values(), *bench.FUNCTION_COMMANDS.values(), ["a b", "it's", 'say "hi" $x', "", "\\"]]:
            self.assertEqual(shlex.split(evaluation.shell_words(args)), args)

    def test_quantile_and_cdf_from_buckets(self):
        bounds = [10, 100, 1000]
        counts = [5, 0, 4, 1]  # the last bucket is "slower than 1000"
        self.assertEqual(evaluation.quantile(bounds, counts, 0.5), "0-10 µs")
        self.assertEqual(evaluation.quantile(bounds, counts, 0.9), "100-1000 µs")
        self.assertEqual(evaluation.quantile(bounds, counts, 0.99), ">1000 µs")
        xs, ys, total = evaluation.cdf_points(bounds, counts)
        self.assertEqual((xs, ys, total), ([10, 100, 1000], [0.5, 0.5, 0.9], 10))


class Report(unittest.TestCase):
    def test_committed_report_is_rendered_from_committed_results(self):
        results = os.path.join(REPO, "docs", "evaluation")
        committed = os.path.join(REPO, "docs", "EVALUATION.md")
        if not os.path.exists(committed):
            self.skipTest("no docs/EVALUATION.md yet")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "EVALUATION.md")
            subprocess.run([sys.executable, os.path.join(HERE, "evaluation.py"), results, out], check=True,
                           capture_output=True)
            with open(out) as a, open(committed) as b:
                self.assertEqual(a.read(), b.read(), "docs/EVALUATION.md differs from what its results render to: "
                                 "re-run scripts/bench.sh, or scripts/evaluation.py docs/evaluation docs/EVALUATION.md")
            for name in sorted(os.listdir(os.path.join(tmp, "evaluation"))):
                self.assertTrue(os.path.exists(os.path.join(results, name)), f"plot {name} is not committed")


if __name__ == "__main__":
    unittest.main(verbosity=2)

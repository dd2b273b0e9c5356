#!/usr/bin/env python3
"""Generates tests/vectors.json: test vectors for lode's chunk sealing and manifest layout.

Written from docs/format.md and the layout drawn in src/manifest.rs, independently
of the Rust code, so that `tests/vectors.rs` checks the Rust against a second reading of
the format rather than against itself. Needs python3 with the `cryptography` and `lz4`
packages (Debian: python3-cryptography, python3-lz4).

    python3 crates/lode-format/tests/gen_vectors.py          # rewrite vectors.json
    python3 crates/lode-format/tests/gen_vectors.py --dump   # also print the worked
                                                             # example used in docs/format.md
    python3 crates/lode-format/tests/gen_vectors.py --check  # write nothing: check that
                                                             # vectors.json is what this
                                                             # makes, and vectors_lz4.json

Codec 1 (lz4) runs the other way. A codec-1 chunk holds what lz4_flex compresses each
segment to, and Python's lz4 (the C library) compresses differently, so this script
cannot make those chunks. The Rust makes them (vectors_lz4.json) and this script checks
them instead: it rebuilds each plaintext, derives the key, checks the header and the
name, then decrypts every segment, decodes its length and padding and decompresses it
with lz4.block.decompress into exactly the segment's length, and compares. Every run
checks them (cargo test runs `--check`); the version 2 lz4 manifest in vectors.json is
built here from their names and keys.

Chunk sealing, v1 (docs/format.md):
    digest     = SHA-256(plaintext)
    key        = HMAC-SHA256(root_salt, digest)
    ciphertext = AES-256-GCM(key, nonce = 12 zero bytes, no AAD, plaintext) || tag
    name       = SHA-256(ciphertext)

Chunk sealing, v2 (docs/format.md, "Chunk v2"), segment size S, codec c:
    key        = HMAC-SHA256(root_salt, "lode chunk v2" || u8 c || u32 S || digest)
    encoded_j  = segment j (codec 0, or codec 1 raw)
               | u32 m || lz4 block of m bytes || zeros to a multiple of 1024
                 (codec 1 compressed: only when that is at most L - L // 8, L = len segment j)
    sealed_j   = AES-256-GCM(key, nonce = u64 j || 4 zero bytes, no AAD, encoded_j) || tag
    header     = "LDC2" || u8 2 || u8 c || u16 0 || u32 S || u32 len || u32 n
                 || for each j: u32 len(sealed_j) || SHA-256(sealed_j)
    object     = header || sealed_0 || ... ;  name = SHA-256(header)
"""

import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path


def u16(v):
    return struct.pack("<H", v)


def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


import lz4.block
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ZERO_NONCE = bytes(12)
TAG_LEN = 16
# Ciphertexts up to this length are stored inline as hex; longer ones by their SHA-256
# (which is the chunk name), their first 32 bytes and their tag.
INLINE_MAX = 4096 + TAG_LEN


def sha256(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def seal(salt: bytes, plaintext: bytes):
    digest = sha256(plaintext)
    key = hmac.new(salt, digest, hashlib.sha256).digest()
    ciphertext = AESGCM(key).encrypt(ZERO_NONCE, plaintext, None)
    assert len(ciphertext) == len(plaintext) + TAG_LEN
    assert AESGCM(key).decrypt(ZERO_NONCE, ciphertext, None) == plaintext
    return digest, key, ciphertext, sha256(ciphertext)


V2_LABEL = b"lode chunk v2"
# v2 objects up to this length are stored inline as hex; longer ones by their header
# (which lists every segment's SHA-256) and the SHA-256 of the whole object.
INLINE_V2_MAX = 8192


def seal_v2(salt: bytes, plaintext: bytes, seg: int):
    assert 1 <= len(plaintext) <= 64 << 20
    assert seg & (seg - 1) == 0 and 4096 <= seg <= 64 << 20
    codec = 0
    digest = sha256(plaintext)
    key = hmac.new(salt, V2_LABEL + bytes([codec]) + u32(seg) + digest,
                   hashlib.sha256).digest()
    n = -(-len(plaintext) // seg)
    sealed = []
    for j in range(n):
        nonce = u64(j) + bytes(4)
        part = plaintext[j * seg:(j + 1) * seg]
        s = AESGCM(key).encrypt(nonce, part, None)
        assert len(s) == len(part) + TAG_LEN
        assert AESGCM(key).decrypt(nonce, s, None) == part
        sealed.append(s)
    header = (b"LDC2" + bytes([2, codec]) + u16(0) + u32(seg) + u32(len(plaintext)) + u32(n)
              + b"".join(u32(len(s)) + sha256(s) for s in sealed))
    assert len(header) == 20 + 36 * n
    return digest, key, header, header + b"".join(sealed), sha256(header)


def mul32(rule) -> bytes:
    """byte[i] = (((i * mul + add) mod 2^32) >> shift) & 0xff, for i in 0..len."""
    n, mul, add, shift = rule["len"], rule["mul"], rule["add"], rule["shift"]
    return bytes(((((i * mul + add) & 0xFFFFFFFF) >> shift) & 0xFF) for i in range(n))


SALTS = {
    # 0x00, 0x01, ..., 0x1f
    "counting": bytes(range(32)),
    # SHA-256 of an ASCII string, so the salt looks like a real random one.
    "hashed": sha256(b"lode test vector salt"),
}

# A 4 KiB chunk: text repeated, so it is recognisably not random.
FOUR_K = (b"lode chunk vector, 4 KiB of text. " * 121)[:4096]
assert len(FOUR_K) == 4096

PLAINTEXTS = [
    {"label": "one_byte", "hex": "01"},
    {"label": "short", "hex": b"hello, lode\n".hex()},
    {"label": "four_kib", "hex": FOUR_K.hex()},
    {
        # A full default-size (512 KiB) chunk.
        "label": "full_512k",
        "generator": {"kind": "mul32", "len": 512 * 1024, "mul": 2654435761, "add": 12345,
                      "shift": 24},
    },
    {
        # The short last chunk of a 700001-byte device cut into 512 KiB chunks:
        # 700001 - 524288 = 175713 bytes.
        "label": "short_last",
        "generator": {"kind": "mul32", "len": 700001 - 512 * 1024, "mul": 40503,
                      "add": 7, "shift": 8},
    },
]


def plaintext_of(p) -> bytes:
    if "hex" in p:
        return bytes.fromhex(p["hex"])
    assert p["generator"]["kind"] == "mul32"
    return mul32(p["generator"])


def chunk_vectors():
    out = []
    for p in PLAINTEXTS:
        plain = plaintext_of(p)
        for salt_label, salt in SALTS.items():
            digest, key, ct, name = seal(salt, plain)
            v = {"plaintext": p["label"], "salt": salt_label, "plaintext_len": len(plain),
                 "digest": digest.hex(), "key": key.hex(), "ciphertext_len": len(ct)}
            if len(ct) <= INLINE_MAX:
                v["ciphertext"] = ct.hex()
            else:
                v["ciphertext_head"] = ct[:32].hex()
                v["tag"] = ct[-TAG_LEN:].hex()
            v["ciphertext_sha256"] = sha256(ct).hex()
            v["name"] = name.hex()
            out.append(v)
    return out


# v2 chunks: (plaintext, salt, segment size). One segment exactly, a chunk smaller than
# its segment size, the default 512 KiB chunk in 32 KiB segments and in 4 KiB ones, and a
# short last chunk whose last segment is short.
V2_CASES = [
    ("one_byte", "counting", 4096),
    ("short", "counting", 4096),
    ("short", "hashed", 4096),
    ("four_kib", "counting", 4096),
    ("four_kib", "counting", 32768),
    ("full_512k", "counting", 32768),
    ("full_512k", "hashed", 4096),
    ("short_last", "counting", 32768),
    ("short_last", "counting", 65536),
]


def chunk_v2_vectors():
    plains = {p["label"]: plaintext_of(p) for p in PLAINTEXTS}
    out = []
    for label, salt_label, seg in V2_CASES:
        plain = plains[label]
        digest, key, header, obj, name = seal_v2(SALTS[salt_label], plain, seg)
        v = {"plaintext": label, "salt": salt_label, "segment_size": seg,
             "plaintext_len": len(plain), "digest": digest.hex(), "key": key.hex(),
             "segment_count": -(-len(plain) // seg), "header": header.hex(),
             "object_len": len(obj)}
        if len(obj) <= INLINE_V2_MAX:
            v["object"] = obj.hex()
        v["object_sha256"] = sha256(obj).hex()
        v["name"] = name.hex()
        out.append(v)
    return out


# ---- manifest, following the table in src/manifest.rs ------------------------------


def enc_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return u32(len(b)) + b


def enc_list(items) -> bytes:
    return u32(len(items)) + b"".join(enc_str(s) for s in items)


def build_manifest(m):
    """Returns (bytes, fields) where fields lists (offset, length, description) in order."""
    fields = []
    out = bytearray()

    def put(b, what):
        fields.append((len(out), len(b), what))
        out.extend(b)

    cs, dev = m["chunk_size"], m["device_size"]
    n = -(-dev // cs)  # ceil
    assert n == len(m["chunks"])
    seg = m.get("segment_size")
    codec = m.get("codec", 0)
    assert seg is not None or codec == 0
    put(b"LODEMNFT", "magic")
    put(u16(1 if seg is None else 2), "format version")
    # Version 2: the chunks' codec in the low byte, flags (none yet) in the high one.
    put(u16(codec), "flags" if codec == 0 else f"codec {codec}, flags 0")
    put(u32(m["root"]), "root id")
    put(u32(cs), "chunk size")
    if seg is None:
        put(u32(0), "reserved")
    else:
        assert seg & (seg - 1) == 0 and 4096 <= seg <= cs
        put(u32(seg), "segment size")
    put(u64(dev), "device size")
    put(bytes.fromhex(m["image_digest"]), "image digest")
    put(u64(n), "chunk count N")
    c = m["config"]
    config = (enc_list(c["entrypoint"]) + enc_list(c["cmd"]) + enc_list(c["env"])
              + enc_str(c["working_dir"]) + enc_str(c["user"]))
    put(u32(len(config)), "config length C")
    put(enc_list(c["entrypoint"]), "config: entrypoint")
    put(enc_list(c["cmd"]), "config: cmd")
    put(enc_list(c["env"]), "config: env")
    put(enc_str(c["working_dir"]), "config: working dir")
    put(enc_str(c["user"]), "config: user")
    for i, name in enumerate(m["chunks"]):
        put(bytes(32) if name is None else bytes.fromhex(name),
            f"chunk table [{i}]" + (" zero" if name is None else ""))
    key_id = m["key_id"].encode("utf-8")
    put(u16(len(key_id)), "KMS key id length K")
    put(key_id, "KMS key id")
    blob = bytes.fromhex(m["wrapped_key"])
    put(u32(len(blob)), "wrapped key length W")
    put(blob, "wrapped data key")
    key_table_at = len(out)
    table = b"".join(bytes.fromhex(k) for k in m["keys"])
    sealed = AESGCM(bytes.fromhex(m["data_key"])).encrypt(ZERO_NONCE, table, bytes(out))
    fields.append((len(out), len(sealed) - TAG_LEN, f"key table ({len(m['keys'])} keys)"))
    fields.append((len(out) + len(sealed) - TAG_LEN, TAG_LEN, "key table GCM tag"))
    out.extend(sealed)
    return bytes(out), key_table_at, fields


def manifest_vector(chunks_by_label, segment_size=None, codec=0):
    """A 4 KiB-chunk image of four chunks: the 4 KiB text, a zero chunk, the 4 KiB text
    again (deduplicated: same name, same key), and a 12-byte short last chunk. With a
    segment size, the same image as a version 2 manifest of v2 chunks (of `codec`)."""
    a = chunks_by_label[("four_kib", "counting")]
    b = chunks_by_label[("short", "counting")]
    m = {} if segment_size is None else {"segment_size": segment_size}
    if codec != 0:
        m["codec"] = codec
    m |= {
        "root": 7,
        "chunk_size": 4096,
        "device_size": 3 * 4096 + 12,
        "image_digest": sha256(b"lode worked example source").hex(),
        "config": {
            "entrypoint": ["/bin/sh", "-c"],
            "cmd": ["echo héllo"],
            "env": ["PATH=/usr/bin"],
            "working_dir": "/srv",
            "user": "1000:1000",
        },
        "chunks": [a["name"], None, a["name"], b["name"]],
        "keys": [a["key"], a["key"], b["key"]],
        "data_key": bytes(range(0x40, 0x60)).hex(),
        "key_id": "default",
        "wrapped_key": b"not-a-real-kms-blob".hex(),
    }
    raw, key_table_at, fields = build_manifest(m)
    m["key_table_offset"] = key_table_at
    m["bytes"] = raw.hex()
    m["id"] = sha256(raw).hex()
    return m, raw, fields


def dump(chunks, chunks_v2, manifest, raw, fields, manifest_v2, raw_v2, fields_v2):
    v = next(c for c in chunks if c["plaintext"] == "short" and c["salt"] == "counting")
    print("== chunk: 'hello, lode\\n' under salt 00 01 .. 1f ==")
    for k in ("plaintext_len", "digest", "key", "ciphertext", "name"):
        print(f"{k:14} {v[k]}")
    print()
    v = next(c for c in chunks_v2 if c["plaintext"] == "short" and c["salt"] == "counting"
             and c["segment_size"] == 4096)
    print("== v2 chunk: 'hello, lode\\n' under salt 00 01 .. 1f, S = 4096 ==")
    for k in ("plaintext_len", "digest", "key", "object_len", "name"):
        print(f"{k:14} {v[k]}")
    header = bytes.fromhex(v["header"])
    for off, ln in ((0, 4), (4, 1), (5, 1), (6, 2), (8, 4), (12, 4), (16, 4), (20, 4),
                    (24, 32)):
        print(f"header {off:3} {ln:3}  {header[off:off + ln].hex(' ')}")
    print(f"{'sealed_0':14} {bytes.fromhex(v['object'])[len(header):].hex()}")
    print()
    print(f"== manifest ({len(raw)} bytes), id {manifest['id']} ==")
    for off, ln, what in fields:
        b = raw[off:off + ln]
        h = b.hex(" ")
        print(f"{off:5}  {ln:4}  {what:24} {h}")
    print()
    print(f"== manifest v2 ({len(raw_v2)} bytes), id {manifest_v2['id']} ==")
    for off, ln, what in fields_v2:
        print(f"{off:5}  {ln:4}  {what:24} {raw_v2[off:off + ln].hex(' ')}")


# ---- codec 1: checking the vectors the Rust made -----------------------------------


def lz4_part(part) -> bytes:
    kind = part["kind"]
    if kind == "hex":
        return bytes.fromhex(part["hex"])
    if kind == "text":
        text = part["text"].encode("utf-8")
        return (text * (part["len"] // len(text) + 1))[:part["len"]]
    if kind == "noise":
        seed = part["seed"].encode("utf-8")
        out = b"".join(sha256(seed + u32(i)) for i in range(part["len"] // 32 + 1))
        return out[:part["len"]]
    if kind == "zero":
        return bytes(part["len"])
    raise ValueError(f"unknown plaintext part {kind}")


def check_lz4_vector(v, salts):
    """Checks one codec-1 vector from the format alone; raises AssertionError naming the
    field at fault."""
    what = f"lz4 vector {v['label']}"
    plain = b"".join(lz4_part(p) for p in v["plaintext"])
    seg, codec = v["segment_size"], v["codec"]
    assert codec == 1, what
    assert len(plain) == v["plaintext_len"], f"{what}: plaintext length"
    digest = sha256(plain)
    assert digest.hex() == v["digest"], f"{what}: digest"
    key = hmac.new(bytes.fromhex(salts[v["salt"]]),
                   V2_LABEL + bytes([codec]) + u32(seg) + digest, hashlib.sha256).digest()
    assert key.hex() == v["key"], f"{what}: key"
    obj = bytes.fromhex(v["object"])
    assert len(obj) == v["object_len"], f"{what}: object length"
    n = -(-len(plain) // seg)
    assert n == v["segment_count"], f"{what}: segment count"
    header = obj[:20 + 36 * n]
    assert header.hex() == v["header"], f"{what}: header"
    assert sha256(header).hex() == v["name"], f"{what}: name"
    magic, version, hcodec, reserved, hseg, hlen, hn = struct.unpack("<4sBBHIII", header[:20])
    assert (magic, version, hcodec, reserved) == (b"LDC2", 2, 1, 0), f"{what}: fixed part"
    assert (hseg, hlen, hn) == (seg, len(plain), n), f"{what}: sizes"
    at = len(header)
    for j in range(n):
        sealed_len, digest_j = struct.unpack("<I32s", header[20 + 36 * j:56 + 36 * j])
        part = plain[j * seg:(j + 1) * seg]
        L = len(part)
        sealed = obj[at:at + sealed_len]
        at += sealed_len
        assert len(sealed) == sealed_len and sha256(sealed) == digest_j, f"{what}: row {j}"
        enc = AESGCM(key).decrypt(u64(j) + bytes(4), sealed, None)
        row = v["segments"][j]
        assert (row["plain_len"], row["sealed_len"]) == (L, sealed_len), f"{what}: {j}"
        if len(enc) == L:
            assert not row["compressed"], f"{what}: segment {j} is raw"
            assert enc == part, f"{what}: segment {j} raw bytes"
            continue
        assert row["compressed"], f"{what}: segment {j} is compressed"
        # The header's rule for a compressed segment, then its encoding.
        assert len(enc) % 1024 == 0 and 0 < len(enc) <= L - L // 8, f"{what}: {j} size"
        (m,) = struct.unpack("<I", enc[:4])
        assert 4 + m <= len(enc), f"{what}: segment {j} length field"
        assert -(-(4 + m) // 1024) * 1024 == len(enc), f"{what}: segment {j} padded"
        assert enc[4 + m:] == bytes(len(enc) - 4 - m), f"{what}: segment {j} padding"
        got = lz4.block.decompress(enc[4:4 + m], uncompressed_size=L)
        assert got == part, f"{what}: segment {j} decompresses to other bytes"
    assert at == len(obj), f"{what}: object length"


def lz4_vectors():
    """Reads vectors_lz4.json (made by the Rust) and checks every vector in it."""
    doc = json.loads(Path(__file__).with_name("vectors_lz4.json").read_text(encoding="utf-8"))
    assert doc["salts"] == {k: v.hex() for k, v in SALTS.items()}, "lz4 vectors: salts"
    for v in doc["chunks"]:
        check_lz4_vector(v, doc["salts"])
    return doc["chunks"]


def main():
    check = "--check" in sys.argv[1:]
    chunks = chunk_vectors()
    by_label = {(c["plaintext"], c["salt"]): c for c in chunks}
    manifest, raw, fields = manifest_vector(by_label)
    chunks_v2 = chunk_v2_vectors()
    by_label_v2 = {(c["plaintext"], c["salt"]): c for c in chunks_v2
                   if c["segment_size"] == 4096}
    manifest_v2, raw_v2, fields_v2 = manifest_vector(by_label_v2, segment_size=4096)
    chunks_lz4 = lz4_vectors()
    by_label_lz4 = {(c["label"], c["salt"]): c for c in chunks_lz4 if c["segment_size"] == 4096}
    manifest_v2_lz4, _, _ = manifest_vector(by_label_lz4, segment_size=4096, codec=1)
    doc = {
        "comment": "Generated by gen_vectors.py from docs/format.md and the layout in "
                   "src/manifest.rs; do not edit by hand.",
        "salts": {k: v.hex() for k, v in SALTS.items()},
        "plaintexts": PLAINTEXTS,
        "chunks": chunks,
        "manifest": manifest,
        "chunks_v2": chunks_v2,
        "manifest_v2": manifest_v2,
        "manifest_v2_lz4": manifest_v2_lz4,
    }
    path = Path(__file__).with_name("vectors.json")
    text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    if check:
        if path.read_text(encoding="utf-8") != text:
            sys.exit(f"{path} is not what gen_vectors.py makes: regenerate it and find out "
                     "which side changed")
        print(f"gen_vectors.py: vectors.json and {len(chunks_lz4)} lz4 vectors check")
        return
    path.write_text(text, encoding="utf-8")
    if "--dump" in sys.argv[1:]:
        dump(chunks, chunks_v2, manifest, raw, fields, manifest_v2, raw_v2, fields_v2)


if __name__ == "__main__":
    main()

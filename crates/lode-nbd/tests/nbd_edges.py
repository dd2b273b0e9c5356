# Protocol edges through libnbd, run by tests/clients.rs with
#   nbdsh -n -c 'exec(open("tests/nbd_edges.py").read())'
# Environment: LODE_RW, LODE_RO, LODE_SLOW, LODE_UNIX (URIs), LODE_RW_SIZE, LODE_MAX_BLOCK
# (the server's max_buffered_bytes, which it advertises as the maximum block size).
import errno
import os

import nbd

RW = os.environ["LODE_RW"]
RO = os.environ["LODE_RO"]
SLOW = os.environ["LODE_SLOW"]
UNIX = os.environ["LODE_UNIX"]
SIZE = int(os.environ["LODE_RW_SIZE"])
MAX = int(os.environ["LODE_MAX_BLOCK"])


def connect(uri, structured=True, strict=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if not strict:
        # Send what libnbd would refuse client-side, so the server must answer.
        h.set_strict_mode(0)
    h.connect_uri(uri)
    assert h.get_structured_replies_negotiated() == structured
    return h


def expect_errno(what, fn, code):
    try:
        fn()
    except nbd.Error as e:
        # e.errno is the symbolic name, e.errnum the number.
        assert e.errnum == code, "%s: expected %s, got %s (%s)" % (
            what, errno.errorcode[code], e.errno, e)
        return
    raise AssertionError("%s: expected %s, got success" % (what, errno.errorcode[code]))


for structured in (True, False):
    mode = "structured" if structured else "simple"
    h = connect(RW, structured, strict=False)
    assert h.get_size() == SIZE
    assert not h.is_read_only()
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
    assert h.can_multi_conn() and h.can_cache()
    assert h.can_df() == structured
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == MAX

    # Errors the server must answer, each followed by a request that still works.
    expect_errno(mode + " pread past end", lambda: h.pread(4096, SIZE - 100), errno.EINVAL)
    expect_errno(mode + " pread at end", lambda: h.pread(1, SIZE), errno.EINVAL)
    expect_errno(mode + " pwrite past end", lambda: h.pwrite(b"x" * 4096, SIZE - 100), errno.ENOSPC)
    expect_errno(mode + " zero past end", lambda: h.zero(8192, SIZE - 4096), errno.ENOSPC)
    expect_errno(mode + " trim past end", lambda: h.trim(8192, SIZE - 4096), errno.EINVAL)
    expect_errno(mode + " pread of zero bytes", lambda: h.pread(0, 0), errno.EINVAL)
    expect_errno(mode + " pread over max block", lambda: h.pread(MAX + 4096, 0), errno.EINVAL)

    data = os.urandom(65536)
    h.pwrite(data, 8192, nbd.CMD_FLAG_FUA)
    assert h.pread(65536, 8192) == data, mode + " read after FUA write"
    h.pwrite(b"abc", SIZE - 3)
    assert h.pread(3, SIZE - 3) == b"abc", mode + " write at the very end"

    h.zero(4096, 12288)
    got = h.pread(65536, 8192)
    assert got == data[:4096] + b"\0" * 4096 + data[8192:], mode + " zero"
    h.zero(4096, 20480, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    h.trim(4096, 32768, nbd.CMD_FLAG_FUA)
    h.flush()
    h.cache(65536, 0)
    assert h.pread(4096, 20480) == b"\0" * 4096, mode + " zero with NO_HOLE"
    if structured:
        # DF is accepted: a read is never fragmented.
        assert h.pread(4096, 8192, nbd.CMD_FLAG_DF) == data[:4096]
    h.shutdown()

    ro = connect(RO, structured, strict=False)
    assert ro.is_read_only() and not ro.can_fua() and not ro.can_trim() and not ro.can_zero()
    expect_errno(mode + " pwrite read-only", lambda: ro.pwrite(b"y" * 512, 0), errno.EPERM)
    expect_errno(mode + " zero read-only", lambda: ro.zero(512, 0), errno.EPERM)
    expect_errno(mode + " trim read-only", lambda: ro.trim(512, 0), errno.EPERM)
    ro.flush()
    assert len(ro.pread(4096, 0)) == 4096
    ro.shutdown()

    # Pipelined reads answered out of order: block 0 is slow, so the reads sent after
    # it complete first.
    s = connect(SLOW, structured)
    order = []
    bufs = []
    for i in range(8):
        buf = nbd.Buffer(4096)
        bufs.append(buf)

        def done(err, i=i):
            order.append(i)
            return 1

        s.aio_pread(buf, i * 4096, completion=done)
    while s.aio_in_flight() > 0:
        s.poll(-1)
    assert sorted(order) == list(range(8)), order
    assert order[-1] == 0, mode + " replies were not out of order: %r" % order
    s.shutdown()

# Several connections to one export: a write and flush on one is seen by the others.
hs = [connect(RW) for _ in range(4)]
payload = os.urandom(4096 * 4)
hs[0].pwrite(payload, 1 << 20)
hs[0].flush()
for i, other in enumerate(hs):
    assert other.pread(len(payload), 1 << 20) == payload, "connection %d" % i
# Interleaved aio across connections.
bufs = [nbd.Buffer(4096) for _ in hs]
for i, (other, buf) in enumerate(zip(hs, bufs)):
    other.aio_pread(buf, (1 << 20) + i * 4096)
for other in hs:
    while other.aio_in_flight() > 0:
        other.poll(-1)
for i, buf in enumerate(bufs):
    assert buf.to_bytearray() == payload[i * 4096:(i + 1) * 4096]
for other in hs:
    other.shutdown()

# Option haggling over the Unix socket: LIST, INFO, GO for an unknown name, ABORT.
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(UNIX)
listed = []
h.opt_list(lambda name, desc: listed.append((name, desc)) or 0)
assert ("ro", "read-only pattern") in listed, listed
assert any(name == "rw" for name, _ in listed), listed
h.set_export_name("ro")
h.opt_info()
assert h.is_read_only()
assert h.get_canonical_export_name() == "ro"
assert h.get_export_description() == "read-only pattern"
h.set_export_name("no-such-export")
try:
    h.opt_go()
    raise AssertionError("GO for an unknown export succeeded")
except nbd.Error:
    pass
h.opt_abort()

# The empty name reaches the default export.
h = nbd.NBD()
h.set_full_info(True)
h.connect_uri(UNIX.replace("/ro?", "/?"))
assert h.get_canonical_export_name() == "ro", h.get_canonical_export_name()
h.shutdown()
print("nbd_edges: all checks passed")

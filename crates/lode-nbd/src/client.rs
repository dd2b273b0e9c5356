//! A small blocking NBD client: fixed newstyle handshake with `NBD_OPT_GO`, then simple
//! (unstructured) reads. It is what `lode demo` reads an attached image with where it
//! cannot mount one; the proofs of the server use clients no one here wrote (nbdcopy,
//! nbdinfo, qemu-img, fio, nbdsh).
//!
//! Server bytes are untrusted: every length is checked before it sizes a buffer, and a
//! reply that does not answer the request sent is an error.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::proto::{
    CMD_DISC, CMD_READ, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, IHAVEOPT,
    INFO_BLOCK_SIZE, INFO_EXPORT, MAX_OPTION_DATA, MAX_PAYLOAD, NBDMAGIC, OPT_GO,
    OPTION_REPLY_MAGIC, REP_ACK, REP_INFO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

/// A connection to one export.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    size: u64,
    /// The largest read the server takes (its advertised maximum block size).
    max_read: u32,
    next_handle: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl Client {
    /// Connects to the Unix socket `path` and opens `export`.
    pub fn connect_unix(path: &Path, export: &str) -> io::Result<Client> {
        let stream = UnixStream::connect(path).map_err(|e| {
            io::Error::new(e.kind(), format!("connecting to {}: {e}", path.display()))
        })?;
        Client::handshake(stream, export)
    }

    fn handshake(mut s: UnixStream, export: &str) -> io::Result<Client> {
        if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
            return Err(bad("not an NBD server (bad greeting magic)"));
        }
        let flags = read_u16(&mut s)?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("the server does not speak fixed newstyle"));
        }
        let name = export.as_bytes();
        let name_len = u32::try_from(name.len()).map_err(|_| bad("export name too long"))?;
        let mut msg = Vec::with_capacity(30 + name.len());
        msg.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(name_len + 8).to_be_bytes());
        msg.extend_from_slice(&name_len.to_be_bytes());
        msg.extend_from_slice(name);
        // Asking for the block sizes promises the server to keep to them.
        msg.extend_from_slice(&1u16.to_be_bytes());
        msg.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        s.write_all(&msg)?;
        let mut size = None;
        // What the protocol lets a client assume when the server says nothing.
        let mut max_read = MAX_PAYLOAD;
        loop {
            if read_u64(&mut s)? != OPTION_REPLY_MAGIC {
                return Err(bad("bad option reply magic"));
            }
            if read_u32(&mut s)? != OPT_GO {
                return Err(bad("option reply for another option"));
            }
            let kind = read_u32(&mut s)?;
            let len = read_u32(&mut s)?;
            if len > MAX_OPTION_DATA {
                return Err(bad(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            match kind {
                REP_ACK => break,
                REP_INFO
                    if data.len() >= 12
                        && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
                {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[2..10]);
                    size = Some(u64::from_be_bytes(b));
                }
                REP_INFO
                    if data.len() >= 14
                        && u16::from_be_bytes([data[0], data[1]]) == INFO_BLOCK_SIZE =>
                {
                    let max = u32::from_be_bytes([data[10], data[11], data[12], data[13]]);
                    if max == 0 {
                        return Err(bad("the server advertised a maximum block size of 0"));
                    }
                    max_read = max.min(MAX_PAYLOAD);
                }
                k if k & (1 << 31) != 0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "export {export:?}: server refused ({})",
                            String::from_utf8_lossy(&data)
                        ),
                    ));
                }
                _ => {}
            }
        }
        let size = size.ok_or_else(|| bad("the server sent no export size"))?;
        Ok(Client {
            stream: s,
            size,
            max_read,
            next_handle: 1,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fills `buf` from `offset`, in requests of at most the server's maximum block
    /// size.
    pub fn read_at(&mut self, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("read past the export's end ({} bytes)", self.size),
                )
            })?;
        debug_assert!(end >= offset);
        while !buf.is_empty() {
            let n = buf.len().min(self.max_read as usize);
            let (now, rest) = buf.split_at_mut(n);
            self.read_one(offset, now)?;
            offset += n as u64;
            buf = rest;
        }
        Ok(())
    }

    fn read_one(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let len = u32::try_from(buf.len()).map_err(|_| bad("read too large"))?;
        let mut req = Vec::with_capacity(28);
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&CMD_READ.to_be_bytes());
        req.extend_from_slice(&handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        self.stream.write_all(&req)?;
        if read_u32(&mut self.stream)? != SIMPLE_REPLY_MAGIC {
            return Err(bad(
                "bad reply magic (structured replies were not asked for)",
            ));
        }
        let error = read_u32(&mut self.stream)?;
        if read_u64(&mut self.stream)? != handle {
            return Err(bad("reply to a request not sent"));
        }
        if error != 0 {
            return Err(io::Error::other(format!(
                "server error {error} reading {len} bytes at {offset}"
            )));
        }
        self.stream.read_exact(buf)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let mut req = Vec::with_capacity(28);
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&CMD_DISC.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&0u32.to_be_bytes());
        let _ = self.stream.write_all(&req);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{Export, Exports, MemDevice, Server};
    use lode_blockdev::BlockDevice;

    #[test]
    fn reads_what_the_server_serves_and_names_failures() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let dev = Arc::new(MemDevice::new(40 << 20));
        let pattern: Vec<u8> = (0..(40u32 << 20)).map(|i| (i % 251) as u8).collect();
        rt.block_on(dev.write_at(0, &pattern)).unwrap();
        let exports = Exports::new();
        exports.add("disk", Export::new(dev)).unwrap();
        let server = Server::builder(exports).build().unwrap();
        rt.block_on(async { server.listen_unix(&sock) }).unwrap();

        let mut c = Client::connect_unix(&sock, "disk").unwrap();
        assert_eq!(c.size(), 40 << 20);
        let mut buf = vec![0u8; 34 << 20];
        c.read_at(3 << 20, &mut buf).unwrap();
        assert!(buf == pattern[3 << 20..37 << 20]);
        let mut small = [0u8; 10];
        c.read_at((40 << 20) - 10, &mut small).unwrap();
        assert_eq!(small, pattern[(40 << 20) - 10..]);
        let e = c.read_at((40 << 20) - 5, &mut small).unwrap_err();
        assert!(e.to_string().contains("past the export's end"), "{e}");

        let e = Client::connect_unix(&sock, "nope").unwrap_err();
        assert!(e.to_string().contains("\"nope\""), "{e}");
        let e = Client::connect_unix(&dir.path().join("absent"), "disk").unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
        rt.block_on(server.shutdown());
    }
}

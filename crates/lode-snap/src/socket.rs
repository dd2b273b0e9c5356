//! The handshake's transport: one `sendmsg` carrying the mappings JSON with the
//! userfaultfd attached as `SCM_RIGHTS`, as Firecracker sends it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::mapping::MAX_MESSAGE_BYTES;

/// The most descriptors lode will take out of one message (it needs one; extras are
/// closed and the handshake refused).
const MAX_FDS: u32 = 4;
/// The size of one descriptor in control data.
const FD_BYTES: u32 = 4;
const _: () = assert!(std::mem::size_of::<RawFd>() == FD_BYTES as usize);

/// What one handshake message held.
#[derive(Debug)]
pub struct Handshake {
    /// The message bytes (the mappings JSON).
    pub body: Vec<u8>,
    /// The descriptors passed with it, in order.
    pub fds: Vec<OwnedFd>,
    /// Whether the kernel dropped control data that did not fit.
    pub truncated: bool,
}

/// Receives one handshake message from `stream`: up to [`MAX_MESSAGE_BYTES`] of body and
/// the descriptors sent with it. An empty body means the peer closed.
pub fn recv_handshake(stream: &UnixStream) -> io::Result<Handshake> {
    let mut body = vec![0u8; MAX_MESSAGE_BYTES + 1];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(FD_BYTES * MAX_FDS) };
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: body.as_mut_ptr().cast(),
        iov_len: body.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    // SAFETY: `msg` points at `iov` (into `body`) and `control`, both alive and sized as
    // declared; MSG_CMSG_CLOEXEC keeps received descriptors out of child processes.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; the CMSG_* walk stays inside `control`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a header inside `control` returned by CMSG_FIRSTHDR/NXTHDR.
        let (level, kind, len) =
            unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) only computes a size.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(header) / std::mem::size_of::<RawFd>();
            // SAFETY: the data of an SCM_RIGHTS header holds `count` descriptors.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count`, inside the header's data; read unaligned as the
                // control buffer makes no promise for the data's alignment.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel installed `fd` in this process for us; we own it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as above; returns null after the last header.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    body.truncate(n.unsigned_abs());
    Ok(Handshake {
        body,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Sends `body` with `fd` attached, as one message.
pub fn send_handshake(stream: &UnixStream, body: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(FD_BYTES) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: body.as_ptr().cast_mut().cast(),
        iov_len: body.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `control` has room for one header with one descriptor (CMSG_SPACE).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(FD_BYTES) as usize;
            libc::CMSG_DATA(c).cast::<RawFd>().write_unaligned(fd);
        }
    }
    // SAFETY: `msg` points at `iov` (the borrowed body) and `control`, alive for the call;
    // the kernel only reads them.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n.unsigned_abs() != body.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {n} of {} handshake bytes", body.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_travels_with_the_body() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        send_handshake(&a, b"[1,2]", Some(f.as_raw_fd())).unwrap();
        let h = recv_handshake(&b).unwrap();
        assert_eq!(h.body, b"[1,2]");
        assert_eq!(h.fds.len(), 1);
        assert!(!h.truncated);
        assert_ne!(h.fds[0].as_raw_fd(), f.as_raw_fd());
    }

    #[test]
    fn a_message_without_a_descriptor_has_none() {
        let (a, b) = UnixStream::pair().unwrap();
        send_handshake(&a, b"[]", None).unwrap();
        let h = recv_handshake(&b).unwrap();
        assert_eq!(h.body, b"[]");
        assert!(h.fds.is_empty());
        drop(a);
        assert!(recv_handshake(&b).unwrap().body.is_empty());
    }
}

//! A TCP proxy that delays what a client sends: a slow server for tests of hedged
//! requests, with no server-side change.
//!
//! Each connection gets its own upstream connection. Every read from the client (for a
//! request-reply protocol such as memcached's, one request) waits the current delay
//! before it is forwarded; replies flow back untouched. The delay can change while the
//! proxy runs (`set_delay`), so a test can fill a fleet at full speed and then slow one
//! node. Dropping the proxy stops it and closes its connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A delaying proxy in front of `upstream`, on 127.0.0.1.
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    delay_us: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    /// Starts a proxy to `upstream` that delays each client read by `delay`.
    pub async fn start(upstream: SocketAddr, delay: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let delay_us = Arc::new(AtomicU64::new(micros(delay)));
        let d = Arc::clone(&delay_us);
        let task = tokio::spawn(async move {
            // Owned here, so aborting this task drops (aborts) every connection.
            let mut conns = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let d = Arc::clone(&d);
                conns.spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, d).await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            addr,
            delay_us,
            task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the delay for every read from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us.store(micros(delay), Ordering::Relaxed);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn relay(client: TcpStream, server: TcpStream, delay_us: Arc<AtomicU64>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let d = delay_us.load(Ordering::Relaxed);
            if d > 0 {
                tokio::time::sleep(Duration::from_micros(d)).await;
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn forwards_both_ways_and_delays_requests() {
        // An echo server upstream.
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = DelayProxy::start(upstream, Duration::ZERO).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut got = [0u8; 5];
        let t = Instant::now();
        c.write_all(b"hello").await.unwrap();
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        let fast = t.elapsed();
        proxy.set_delay(Duration::from_millis(50));
        let t = Instant::now();
        c.write_all(b"again").await.unwrap();
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"again");
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "{:?}",
            t.elapsed()
        );
        assert!(fast < Duration::from_millis(50), "{fast:?}");
        drop(proxy);
    }
}

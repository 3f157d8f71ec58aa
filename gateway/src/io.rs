//! A TCP stream with its own fixed-size read buffer, for monoio's owned-buffer
//! (rent) I/O. The buffer never grows past its capacity: that is what bounds
//! the memory of a streamed body.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use monoio::buf::{IoBuf, IoBufMut, SliceMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    cap: usize,
}

/// Why a read did not produce bytes.
#[derive(Debug)]
pub enum ReadError {
    Timeout,
    Io(io::Error),
    /// The watched peer (the client, while we wait on its backend) hung up.
    WatchedClosed,
}

/// Why a write did not complete.
#[derive(Debug)]
pub enum WriteError {
    /// No progress within the send timeout: the peer stopped reading.
    Timeout,
    Io(io::Error),
}

/// How often a long upstream wait checks whether its client is still there.
const WATCH_EVERY: Duration = Duration::from_secs(1);

impl Conn {
    pub fn new(stream: TcpStream, cap: usize) -> Conn {
        Conn {
            stream,
            buf: Vec::with_capacity(cap),
            pos: 0,
            cap,
        }
    }

    /// Bytes read but not consumed yet.
    #[inline]
    pub fn pending(&self) -> &[u8] {
        // After a cancelled read (a timeout) the buffer went with the read:
        // nothing is pending, and the connection is about to close.
        self.buf.get(self.pos..).unwrap_or(&[])
    }

    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    pub fn is_full(&self) -> bool {
        self.buf.len() - self.pos >= self.cap
    }

    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Read more bytes after the pending ones. `Ok(0)` is end of stream.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.buf.capacity() == 0 {
            // A read was cancelled (timeout) and took the buffer with it.
            self.buf = Vec::with_capacity(self.cap);
            self.pos = 0;
        }
        if self.pos > 0 && self.buf.len() == self.buf.capacity() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let len = self.buf.len();
        if len == self.buf.capacity() {
            return Err(io::Error::other("read buffer full"));
        }
        let buf = std::mem::take(&mut self.buf);
        let cap = buf.capacity();
        // SAFETY-free: SliceMut writes after `len` and sets the length on completion.
        let slice: SliceMut<Vec<u8>> = buf.slice_mut(len..cap);
        let (res, slice) = self.stream.read(slice).await;
        self.buf = slice.into_inner();
        res
    }

    /// `fill` with a deadline.
    pub async fn fill_timeout(&mut self, d: Duration) -> Result<usize, ReadError> {
        match monoio::time::timeout(d, self.fill()).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(ReadError::Io(e)),
            Err(_) => Err(ReadError::Timeout),
        }
    }

    /// `fill` with a deadline that also gives up when the peer on `watch`
    /// closes: a client that hangs up mid-generation must not keep a GPU busy.
    /// The check is a non-blocking peek once per second of waiting, so a
    /// quick response costs nothing extra.
    pub async fn fill_watching(&mut self, d: Duration, watch: RawFd) -> Result<usize, ReadError> {
        let deadline = std::time::Instant::now() + d;
        let fut = self.fill();
        let mut fut = std::pin::pin!(fut);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(ReadError::Timeout);
            }
            match monoio::time::timeout(left.min(WATCH_EVERY), fut.as_mut()).await {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) => return Err(ReadError::Io(e)),
                Err(_) if peer_closed(watch) => return Err(ReadError::WatchedClosed),
                Err(_) => {}
            }
        }
    }

    /// Write the first `n` pending bytes to `dst` and consume them, giving up
    /// after `d` without progress (a peer that stopped reading). After a
    /// timeout the read buffer is gone: close the connection.
    pub async fn forward(
        &mut self,
        n: usize,
        dst: &mut TcpStream,
        d: Duration,
    ) -> Result<(), WriteError> {
        let buf = std::mem::take(&mut self.buf);
        let (res, slice) = match monoio::time::timeout(
            d,
            dst.write_all(buf.slice(self.pos..self.pos + n)),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => return Err(WriteError::Timeout),
        };
        self.buf = slice.into_inner();
        res.map_err(WriteError::Io)?;
        self.consume(n);
        Ok(())
    }

    /// Write an owned buffer to this stream within `d`; the buffer comes back
    /// cleared (or empty after a timeout).
    pub async fn write_all(
        &mut self,
        out: Vec<u8>,
        d: Duration,
    ) -> (Result<(), WriteError>, Vec<u8>) {
        match monoio::time::timeout(d, write_vec(&mut self.stream, out)).await {
            Ok((r, out)) => (r.map_err(WriteError::Io), out),
            Err(_) => (Err(WriteError::Timeout), Vec::new()),
        }
    }

    /// Whether the peer has closed or sent unexpected bytes while idle
    /// (checked before reusing a pooled connection; never blocks).
    pub fn is_stale(&self) -> bool {
        // EOF, or bytes nobody asked for: either way unusable.
        !matches!(peek(self.stream.as_raw_fd()), Peek::Nothing)
    }
}

enum Peek {
    Nothing,
    Data,
    Closed,
}

fn peek(fd: RawFd) -> Peek {
    let mut b = [0u8; 1];
    // SAFETY: recv on a valid fd into a 1-byte stack buffer; never blocks.
    let n = unsafe {
        libc::recv(
            fd,
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Peek::Closed,
        n if n > 0 => Peek::Data,
        _ if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock => Peek::Nothing,
        _ => Peek::Closed,
    }
}

/// The peer closed (FIN or RST). Bytes waiting (a pipelined request) mean it is still there.
fn peer_closed(fd: RawFd) -> bool {
    matches!(peek(fd), Peek::Closed)
}

pub async fn write_vec(stream: &mut TcpStream, out: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
    if out.is_empty() {
        return (Ok(()), out);
    }
    let (res, mut out) = stream.write_all(out).await;
    out.clear();
    (res.map(|_| ()), out)
}

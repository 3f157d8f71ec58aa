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
    /// Set on a TLS listener's connections and on connections to TLS
    /// backends: `fill` decrypts into `buf`, `write_all` encrypts;
    /// everything above sees plaintext.
    tls: Option<Box<TlsIo>>,
}

/// A rustls session (server or client side) and its ciphertext buffers
/// (owned, for monoio).
struct TlsIo {
    session: rustls::Connection,
    /// Ciphertext read from the socket; `rbuf[rpos..]` is not yet given to rustls.
    rbuf: Vec<u8>,
    rpos: usize,
    /// Ciphertext waiting to be written.
    wbuf: Vec<u8>,
    /// Plaintext staging: rustls' reader wants an initialised slice.
    plain: Vec<u8>,
}

/// TLS records are at most 16 KiB of plaintext plus overhead.
const TLS_RECORD: usize = 16 * 1024 + 256;

/// Why a TLS handshake did not complete.
#[derive(Debug)]
pub enum HandshakeError {
    Timeout,
    /// The client went away (EOF or reset) mid-handshake.
    Closed,
    Tls(rustls::Error),
    Io(io::Error),
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
            tls: None,
        }
    }

    /// A connection whose bytes are TLS records of `session`; call
    /// [`handshake`](Self::handshake) before anything else.
    pub fn new_tls(stream: TcpStream, cap: usize, session: rustls::ServerConnection) -> Conn {
        Conn::with_session(stream, cap, rustls::Connection::Server(session))
    }

    /// A connection to a TLS backend; call [`handshake`](Self::handshake) first.
    pub fn new_client_tls(
        stream: TcpStream,
        cap: usize,
        session: rustls::ClientConnection,
    ) -> Conn {
        Conn::with_session(stream, cap, rustls::Connection::Client(session))
    }

    fn with_session(stream: TcpStream, cap: usize, mut session: rustls::Connection) -> Conn {
        // Bound what rustls buffers on our behalf to what a plain connection may hold.
        session.set_buffer_limit(Some(cap.max(TLS_RECORD)));
        Conn {
            tls: Some(Box::new(TlsIo {
                session,
                rbuf: Vec::with_capacity(TLS_RECORD),
                rpos: 0,
                wbuf: Vec::with_capacity(TLS_RECORD),
                plain: vec![0; TLS_RECORD],
            })),
            ..Conn::new(stream, cap)
        }
    }

    /// The socket and the bytes read off it not consumed yet (a plaintext
    /// connection handed to another protocol's driver).
    pub fn into_parts(mut self) -> (TcpStream, Vec<u8>) {
        let read = self.pending().to_vec();
        self.buf = Vec::new();
        (self.stream, read)
    }

    /// The TLS session, on a TLS connection (SNI, ALPN, client certificate).
    pub fn tls_session(&self) -> Option<&rustls::ServerConnection> {
        match &self.tls.as_ref()?.session {
            rustls::Connection::Server(s) => Some(s),
            rustls::Connection::Client(_) => None,
        }
    }

    /// The protocol chosen by ALPN in the TLS handshake (either side).
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        match &self.tls.as_ref()?.session {
            rustls::Connection::Server(s) => s.alpn_protocol(),
            rustls::Connection::Client(c) => c.alpn_protocol(),
        }
    }

    /// This connection speaks TLS (either side).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Run the TLS handshake to completion within `d`.
    pub async fn handshake(&mut self, d: Duration) -> Result<(), HandshakeError> {
        let stream = &mut self.stream;
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        let work = async {
            while tls.session.is_handshaking() {
                tls.flush(stream).await.map_err(HandshakeError::Io)?;
                if !tls.session.is_handshaking() {
                    break;
                }
                match tls.read_records(stream).await {
                    Ok(0) => return Err(HandshakeError::Closed),
                    Ok(_) => {}
                    Err(e) => {
                        // Send the alert rustls queued, then give up.
                        let _ = tls.flush(stream).await;
                        return Err(
                            match e
                                .into_inner()
                                .and_then(|i| i.downcast::<rustls::Error>().ok())
                            {
                                Some(t) => HandshakeError::Tls(*t),
                                None => HandshakeError::Closed,
                            },
                        );
                    }
                }
            }
            tls.flush(stream).await.map_err(HandshakeError::Io)
        };
        match monoio::time::timeout(d, work).await {
            Ok(r) => r,
            Err(_) => Err(HandshakeError::Timeout),
        }
    }

    /// Best effort: tell a TLS client we are done (close_notify).
    pub async fn close_notify(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.session.send_close_notify();
            let _ = monoio::time::timeout(Duration::from_millis(500), tls.flush(&mut self.stream))
                .await;
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
        if let Some(tls) = self.tls.as_mut() {
            return tls.fill(&mut self.stream, &mut self.buf, self.cap).await;
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
        watching(self.fill(), d, watch)
            .await?
            .map_err(ReadError::Io)
    }

    /// Write the first `n` pending bytes to `dst` and consume them, giving up
    /// after `d` without progress (a peer that stopped reading). After a
    /// timeout the read buffer is gone: close the connection.
    pub async fn forward(
        &mut self,
        n: usize,
        dst: &mut Conn,
        d: Duration,
    ) -> Result<(), WriteError> {
        if dst.tls.is_some() {
            // Encrypted on the way: a copy for rustls.
            let data = self.pending()[..n].to_vec();
            dst.write_all(data, d).await.0?;
            self.consume(n);
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let (res, slice) =
            match monoio::time::timeout(d, dst.stream.write_all(buf.slice(self.pos..self.pos + n)))
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
        mut out: Vec<u8>,
        d: Duration,
    ) -> (Result<(), WriteError>, Vec<u8>) {
        if let Some(tls) = self.tls.as_mut() {
            let r = monoio::time::timeout(d, tls.write_plain(&mut self.stream, &out)).await;
            out.clear();
            return match r {
                Ok(r) => (r.map_err(WriteError::Io), out),
                Err(_) => (Err(WriteError::Timeout), out),
            };
        }
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

impl TlsIo {
    /// Read one batch of ciphertext and hand it to rustls. `Ok(0)`: EOF.
    ///
    /// rustls holds at most 16 KiB of decrypted, unread plaintext: feeding it
    /// a read that completes two records would fail ("plaintext buffer
    /// full"). So ciphertext is fed only until a record yields plaintext;
    /// the rest waits in `rbuf[rpos..]` and is fed before the next socket read.
    async fn read_records(&mut self, stream: &mut TcpStream) -> io::Result<usize> {
        if self.rpos >= self.rbuf.len() {
            let mut rbuf = std::mem::take(&mut self.rbuf);
            rbuf.clear();
            self.rpos = 0;
            if rbuf.capacity() < TLS_RECORD {
                // A cancelled read (timeout) took the buffer with it.
                rbuf = Vec::with_capacity(TLS_RECORD);
            }
            let (res, slice) = stream.read(rbuf.slice_mut(0..TLS_RECORD)).await;
            self.rbuf = slice.into_inner();
            if res? == 0 {
                return Ok(0);
            }
        }
        let mut data = &self.rbuf[self.rpos..];
        let before = data.len();
        while !data.is_empty() {
            if self.session.read_tls(&mut data)? == 0 {
                break;
            }
            let state = self
                .session
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if state.plaintext_bytes_to_read() > 0 {
                break;
            }
        }
        let fed = before - data.len();
        self.rpos += fed;
        if fed == 0 {
            // Only reached with no plaintext pending (callers drain it first):
            // rustls took nothing, and looping would spin.
            return Err(io::Error::other("TLS session accepted no data"));
        }
        Ok(fed)
    }

    /// Write what rustls has queued (handshake, alerts, records).
    async fn flush(&mut self, stream: &mut TcpStream) -> io::Result<()> {
        while self.session.wants_write() {
            let mut w = std::mem::take(&mut self.wbuf);
            w.clear();
            self.session.write_tls(&mut w)?;
            let (res, w) = write_vec(stream, w).await;
            self.wbuf = w;
            res?;
        }
        Ok(())
    }

    /// Decrypt into `buf` (up to `cap` bytes held); `Ok(0)` at the end of
    /// the stream (close_notify or EOF).
    async fn fill(
        &mut self,
        stream: &mut TcpStream,
        buf: &mut Vec<u8>,
        cap: usize,
    ) -> io::Result<usize> {
        use std::io::Read;
        loop {
            let room = (cap - buf.len()).min(self.plain.len());
            match self.session.reader().read(&mut self.plain[..room]) {
                Ok(n) => {
                    buf.extend_from_slice(&self.plain[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // EOF without close_notify: a truncation attack or a plain
                // hangup; either way the stream ends here.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            self.flush(stream).await?;
            match self.read_records(stream).await {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(e) => {
                    let _ = self.flush(stream).await;
                    return Err(e);
                }
            }
            // Key updates and the like may want an answer.
            self.flush(stream).await?;
        }
    }

    /// Encrypt `data` and write it all.
    async fn write_plain(&mut self, stream: &mut TcpStream, mut data: &[u8]) -> io::Result<()> {
        use std::io::Write;
        while !data.is_empty() {
            let n = self.session.writer().write(data)?;
            data = &data[n..];
            if n == 0 && !self.session.wants_write() {
                return Err(io::Error::other("TLS session refused data"));
            }
            self.flush(stream).await?;
        }
        self.flush(stream).await
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
/// The peer on `fd` has closed its side (EOF; never blocks).
/// `fut` within `d`, given up early (`WatchedClosed`) when the peer on
/// `watch` hangs up — checked by a non-blocking peek once per second of
/// waiting, so a quick answer costs nothing extra. Never `ReadError::Io`.
pub async fn watching<F: std::future::Future>(
    fut: F,
    d: Duration,
    watch: RawFd,
) -> Result<F::Output, ReadError> {
    let deadline = std::time::Instant::now() + d;
    let mut fut = std::pin::pin!(fut);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(ReadError::Timeout);
        }
        match monoio::time::timeout(left.min(WATCH_EVERY), fut.as_mut()).await {
            Ok(v) => return Ok(v),
            Err(_) if peer_closed(watch) => return Err(ReadError::WatchedClosed),
            Err(_) => {}
        }
    }
}

pub fn peer_closed(fd: RawFd) -> bool {
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

/// A TLS connection (the gateway's own TLS, `io::Conn`, either side) as
/// monoio's owned-buffer I/O, for monoio-compat's tokio-IO wrapper under `h2`.
pub struct TlsStreamIo {
    pub conn: Conn,
    /// Writes give up after this long without progress.
    pub send: Duration,
}

impl monoio::io::AsyncReadRent for TlsStreamIo {
    async fn read<T: monoio::buf::IoBufMut>(&mut self, mut buf: T) -> monoio::BufResult<usize, T> {
        if self.conn.pending().is_empty() {
            match self.conn.fill().await {
                Ok(0) => return (Ok(0), buf),
                Err(e) => return (Err(e), buf),
                Ok(_) => {}
            }
        }
        let p = self.conn.pending();
        let n = p.len().min(buf.bytes_total());
        // SAFETY: `n` ≤ the buffer's capacity; the bytes are initialised by the copy.
        unsafe {
            buf.write_ptr().copy_from_nonoverlapping(p.as_ptr(), n);
            buf.set_init(n);
        }
        self.conn.consume(n);
        (Ok(n), buf)
    }

    async fn readv<T: monoio::buf::IoVecBufMut>(
        &mut self,
        mut buf: T,
    ) -> monoio::BufResult<usize, T> {
        // SAFETY: the iovec stays alive with `buf` for the call.
        let Some(raw) = (unsafe { monoio::buf::RawBuf::new_from_iovec_mut(&mut buf) }) else {
            return (Ok(0), buf);
        };
        let (r, _) = self.read(raw).await;
        let n = r.as_ref().copied().unwrap_or(0);
        // SAFETY: `read` initialised `n` bytes of the first iovec.
        unsafe { buf.set_init(n) };
        (r, buf)
    }
}

impl monoio::io::AsyncWriteRent for TlsStreamIo {
    async fn write<T: monoio::buf::IoBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        // SAFETY: `read_ptr` is valid for `bytes_init` bytes while `buf` lives.
        let data = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) }.to_vec();
        let n = data.len();
        match self.conn.write_all(data, self.send).await.0 {
            Ok(()) => (Ok(n), buf),
            Err(WriteError::Timeout) => (Err(std::io::ErrorKind::TimedOut.into()), buf),
            Err(WriteError::Io(e)) => (Err(e), buf),
        }
    }

    async fn writev<T: monoio::buf::IoVecBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        let mut data = Vec::new();
        // SAFETY: the iovecs are valid while `buf` lives.
        unsafe {
            let iov = std::slice::from_raw_parts(buf.read_iovec_ptr(), buf.read_iovec_len());
            for v in iov {
                data.extend_from_slice(std::slice::from_raw_parts(
                    v.iov_base as *const u8,
                    v.iov_len,
                ));
            }
        }
        let n = data.len();
        match self.conn.write_all(data, self.send).await.0 {
            Ok(()) => (Ok(n), buf),
            Err(WriteError::Timeout) => (Err(std::io::ErrorKind::TimedOut.into()), buf),
            Err(WriteError::Io(e)) => (Err(e), buf),
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        self.conn.close_notify().await;
        Ok(())
    }
}

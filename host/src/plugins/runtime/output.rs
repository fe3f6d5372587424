//! A guest's stdout and stderr: kept in memory during the call, capped,
//! then logged under the plugin's name.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Output kept per stream per call; the rest is dropped (and said so).
const OUTPUT_CAP: usize = 64 << 10;

/// A guest's stdout or stderr: kept in memory during the call (up to
/// [`OUTPUT_CAP`]), then logged line by line under the plugin's name. Writes
/// past the cap are dropped, never refused, so a chatty policy cannot fail
/// because of its logging.
#[derive(Clone, Default)]
pub(super) struct LogPipe {
    buffer: Arc<Mutex<LogBuffer>>,
}

#[derive(Default)]
struct LogBuffer {
    bytes: Vec<u8>,
    dropped: usize,
}

impl LogPipe {
    fn append(&self, bytes: &[u8]) {
        let mut buffer = self.buffer.lock().unwrap_or_else(|poison| poison.into_inner());
        let room = OUTPUT_CAP.saturating_sub(buffer.bytes.len());
        let kept = bytes.len().min(room);
        buffer.bytes.extend_from_slice(&bytes[..kept]);
        buffer.dropped += bytes.len() - kept;
    }

    pub(super) fn log(&self, plugin: &str, stream: &str) {
        let buffer = std::mem::take(&mut *self.buffer.lock().unwrap_or_else(|poison| poison.into_inner()));
        for line in String::from_utf8_lossy(&buffer.bytes).lines().filter(|line| !line.trim().is_empty()) {
            tracing::info!(target: "modelcache::plugin", plugin = %plugin, stream = %stream, "{line}");
        }
        if buffer.dropped > 0 {
            tracing::warn!(target: "modelcache::plugin", plugin = %plugin, stream = %stream, dropped = buffer.dropped, "output past {OUTPUT_CAP} bytes dropped");
        }
    }
}

impl IsTerminal for LogPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for LogPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(OUTPUT_CAP)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogPipe {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.append(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

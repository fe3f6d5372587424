//! `wasi:io/poll` and `wasi:io/streams` under the call's deadline.
//!
//! Epoch interruption stops running wasm only: a guest blocked in a WASI
//! call that waits (`poll`, `pollable.block`, which `std::thread::sleep`
//! becomes, the blocking stream calls) would keep the host thread, and any
//! lock its caller holds, for as long as it likes. These host functions are
//! wasmtime-wasi's own on the call's resource table, except that each one
//! that can wait gives up at the call's deadline with a trap.

use std::future::Future;
use std::time::Instant;

use wasmtime::component::{HasData, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::io::poll as async_poll;
use wasmtime_wasi::p2::bindings::io::streams as async_streams;
use wasmtime_wasi::p2::bindings::sync::io::poll;
use wasmtime_wasi::p2::bindings::sync::io::streams::{self, InputStream, OutputStream};
use wasmtime_wasi::p2::{DynPollable, StreamError, StreamResult};

/// A WASI wait reached the call's deadline. Returned from the host call as a
/// trap, so the guest never resumes; `runtime::call::classify` reports it as a timeout.
#[derive(Debug, thiserror::Error)]
#[error("the call's deadline passed while the plugin waited in WASI")]
pub(super) struct DeadlinePassed;

/// Runs a WASI wait (on wasmtime-wasi's tokio runtime, as its sync bindings
/// do), giving up at `deadline`. A wait that is ready at once succeeds even
/// past the deadline; the epoch stops the guest soon after.
fn wait_until<T>(deadline: Instant, wait: impl Future<Output = T>) -> Result<T, DeadlinePassed> {
    wasmtime_wasi::runtime::in_tokio(async { tokio::time::timeout_at(deadline.into(), wait).await.map_err(|_| DeadlinePassed) })
}

/// A blocking stream call, given up at `deadline` as a trap.
fn stream_wait_until<T>(deadline: Instant, wait: impl Future<Output = StreamResult<T>>) -> StreamResult<T> {
    wait_until(deadline, wait).map_err(|passed| StreamError::Trap(passed.into()))?
}

/// `wasi:io/poll` and `wasi:io/streams` for one call: wasmtime-wasi's own
/// implementation on the call's resource table, except that every call that
/// can wait gives up at the call's deadline. The only streams a policy can
/// reach are its stdio (stdin empty, stdout and stderr `LogPipe`s), which
/// are always ready; the deadline holds regardless of what they are.
pub(super) struct DeadlineIo<'a> {
    pub(super) table: &'a mut ResourceTable,
    pub(super) deadline: Instant,
}

pub(super) struct HasDeadlineIo;

impl HasData for HasDeadlineIo {
    type Data<'a> = DeadlineIo<'a>;
}

impl poll::Host for DeadlineIo<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        wait_until(self.deadline, async_poll::Host::poll(&mut *self.table, pollables))?
    }
}

impl poll::HostPollable for DeadlineIo<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        poll::HostPollable::ready(&mut *self.table, pollable)
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        wait_until(self.deadline, async_poll::HostPollable::block(&mut *self.table, pollable))?
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        poll::HostPollable::drop(&mut *self.table, pollable)
    }
}

impl streams::Host for DeadlineIo<'_> {
    fn convert_stream_error(&mut self, error: StreamError) -> wasmtime::Result<streams::StreamError> {
        streams::Host::convert_stream_error(&mut *self.table, error)
    }
}

impl streams::HostInputStream for DeadlineIo<'_> {
    fn drop(&mut self, stream: Resource<InputStream>) -> wasmtime::Result<()> {
        wait_until(self.deadline, async_streams::HostInputStream::drop(&mut *self.table, stream))?
    }

    fn read(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        streams::HostInputStream::read(&mut *self.table, stream, len)
    }

    fn blocking_read(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        stream_wait_until(self.deadline, async_streams::HostInputStream::blocking_read(&mut *self.table, stream, len))
    }

    fn skip(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        streams::HostInputStream::skip(&mut *self.table, stream, len)
    }

    fn blocking_skip(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        stream_wait_until(self.deadline, async_streams::HostInputStream::blocking_skip(&mut *self.table, stream, len))
    }

    fn subscribe(&mut self, stream: Resource<InputStream>) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostInputStream::subscribe(&mut *self.table, stream)
    }
}

impl streams::HostOutputStream for DeadlineIo<'_> {
    fn drop(&mut self, stream: Resource<OutputStream>) -> wasmtime::Result<()> {
        wait_until(self.deadline, async_streams::HostOutputStream::drop(&mut *self.table, stream))?
    }

    fn check_write(&mut self, stream: Resource<OutputStream>) -> StreamResult<u64> {
        streams::HostOutputStream::check_write(&mut *self.table, stream)
    }

    fn write(&mut self, stream: Resource<OutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        streams::HostOutputStream::write(&mut *self.table, stream, bytes)
    }

    fn blocking_write_and_flush(&mut self, stream: Resource<OutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        let table = &mut *self.table;
        stream_wait_until(self.deadline, async_streams::HostOutputStream::blocking_write_and_flush(table, stream, bytes))
    }

    fn subscribe(&mut self, stream: Resource<OutputStream>) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostOutputStream::subscribe(&mut *self.table, stream)
    }

    fn write_zeroes(&mut self, stream: Resource<OutputStream>, len: u64) -> StreamResult<()> {
        streams::HostOutputStream::write_zeroes(&mut *self.table, stream, len)
    }

    fn blocking_write_zeroes_and_flush(&mut self, stream: Resource<OutputStream>, len: u64) -> StreamResult<()> {
        let table = &mut *self.table;
        stream_wait_until(self.deadline, async_streams::HostOutputStream::blocking_write_zeroes_and_flush(table, stream, len))
    }

    fn flush(&mut self, stream: Resource<OutputStream>) -> StreamResult<()> {
        streams::HostOutputStream::flush(&mut *self.table, stream)
    }

    fn blocking_flush(&mut self, stream: Resource<OutputStream>) -> StreamResult<()> {
        stream_wait_until(self.deadline, async_streams::HostOutputStream::blocking_flush(&mut *self.table, stream))
    }

    fn splice(&mut self, dst: Resource<OutputStream>, src: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        streams::HostOutputStream::splice(&mut *self.table, dst, src, len)
    }

    fn blocking_splice(&mut self, dst: Resource<OutputStream>, src: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        stream_wait_until(self.deadline, async_streams::HostOutputStream::blocking_splice(&mut *self.table, dst, src, len))
    }
}

//! One open watch (of a service, or of the catalog): waits for relevant store changes,
//! recomputes, and yields a value when it differs from the last one yielded.

use std::sync::Arc;

use tokio::sync::broadcast::{self, error::RecvError};
use trellis_discovery::DiscoveryError;

use crate::Shared;
use crate::reflectors::{Change, Signal};

pub(crate) type Relevant = Box<dyn Fn(&Change) -> bool + Send + Sync>;
pub(crate) type Compute<T> = Box<dyn Fn(&Shared) -> T + Send + Sync>;
pub(crate) type Stamp<T> = fn(T) -> T;

pub(crate) struct Follower<T> {
    shared: Arc<Shared>,
    signals: broadcast::Receiver<Signal>,
    ready: bool,
    dirty: bool,
    last: Option<T>,
    /// An error was yielded since the last value: the next value is yielded even if unchanged,
    /// so the consumer learns the view is current again.
    failed: bool,
    relevant: Relevant,
    compute: Compute<T>,
    stamp: Stamp<T>,
}

impl<T: PartialEq + Clone + Send + 'static> Follower<T> {
    /// Subscribes before anything is computed, so no change between the first computation and
    /// the first wait is missed.
    pub(crate) fn new(
        shared: Arc<Shared>,
        relevant: Relevant,
        compute: Compute<T>,
        stamp: Stamp<T>,
    ) -> Self {
        let signals = shared.signals.subscribe();
        Self {
            shared,
            signals,
            ready: false,
            dirty: true,
            last: None,
            failed: false,
            relevant,
            compute,
            stamp,
        }
    }

    pub(crate) fn into_stream(
        self,
    ) -> futures::stream::BoxStream<'static, Result<T, DiscoveryError>> {
        use futures::StreamExt;
        futures::stream::unfold(self, |mut f| async move {
            let item = f.next().await;
            Some((item, f))
        })
        .boxed()
    }

    async fn next(&mut self) -> Result<T, DiscoveryError> {
        loop {
            if !self.ready {
                // Until every store has listed once there is nothing true to say; failures
                // (e.g. RBAC) are reported meanwhile.
                tokio::select! {
                    () = self.shared.stores.ready() => self.ready = true,
                    signal = self.signals.recv() => self.on_signal(signal)?,
                }
                continue;
            }
            if self.dirty {
                self.dirty = false;
                let value = (self.compute)(&self.shared);
                if self.failed || self.last.as_ref() != Some(&value) {
                    self.failed = false;
                    self.last = Some(value.clone());
                    return Ok((self.stamp)(value));
                }
            }
            let signal = self.signals.recv().await;
            self.on_signal(signal)?;
        }
    }

    fn on_signal(&mut self, signal: Result<Signal, RecvError>) -> Result<(), DiscoveryError> {
        match signal {
            Ok(Signal::Changed(change)) => {
                if (self.relevant)(&change) {
                    self.dirty = true;
                }
            }
            Ok(Signal::Failed(failure)) => {
                self.failed = true;
                return Err(failure.to_error(&self.shared.source));
            }
            // Missed signals: recompute to be sure.
            Err(RecvError::Lagged(_)) => self.dirty = true,
            // The sender lives in `Shared`, which this follower keeps alive.
            Err(RecvError::Closed) => {}
        }
        Ok(())
    }
}

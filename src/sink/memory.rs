//! An in-memory sink for the pipeline's unit tests: it records every batch it is
//! given, and a test can hold it (slow sink), make it fail, and see it closed. Never
//! the proof that the product works: the integration tests use Redis and a broker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::sink::{Batch, Sink, SinkError};

#[derive(Default)]
struct Shared {
    applied: Mutex<Vec<Batch>>,
    fail: Mutex<Option<SinkError>>,
    closed: Mutex<bool>,
}

/// The sink, handed to the pipeline.
pub struct MemorySink {
    name: &'static str,
    shared: Arc<Shared>,
    gate: Option<Arc<Semaphore>>,
}

/// The test's side of a [`MemorySink`].
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
    gate: Option<Arc<Semaphore>>,
}

impl MemorySink {
    /// A sink that applies at once.
    pub fn new(name: &'static str) -> (MemorySink, Handle) {
        Self::build(name, None)
    }

    /// A sink whose every `apply` waits for a [`Handle::release`].
    pub fn held(name: &'static str) -> (MemorySink, Handle) {
        Self::build(name, Some(Arc::new(Semaphore::new(0))))
    }

    fn build(name: &'static str, gate: Option<Arc<Semaphore>>) -> (MemorySink, Handle) {
        let shared = Arc::new(Shared::default());
        (
            MemorySink {
                name,
                shared: shared.clone(),
                gate: gate.clone(),
            },
            Handle { shared, gate },
        )
    }
}

impl Handle {
    /// Lets `n` more applications through a held sink.
    pub fn release(&self, n: usize) {
        self.gate.as_ref().expect("a held sink").add_permits(n);
    }

    /// The next application fails with `error`.
    pub fn fail_next(&self, error: SinkError) {
        *self.shared.fail.lock().unwrap() = Some(error);
    }

    /// Every batch applied so far, as the sink was given it.
    pub fn applied(&self) -> Vec<Batch> {
        self.shared.applied.lock().unwrap().clone()
    }

    /// The number of items of each application.
    pub fn sizes(&self) -> Vec<usize> {
        self.applied().iter().map(|b| b.items.len()).collect()
    }

    pub fn closed(&self) -> bool {
        *self.shared.closed.lock().unwrap()
    }
}

impl Sink for MemorySink {
    fn name(&self) -> &'static str {
        self.name
    }

    fn describe(&self) -> String {
        format!("the memory sink {:?}", self.name)
    }

    async fn apply(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("never closed").forget();
        }
        if let Some(e) = self.shared.fail.lock().unwrap().take() {
            return Err(e);
        }
        self.shared.applied.lock().unwrap().push(batch.clone());
        Ok(())
    }

    fn set_error_after(&mut self, _bound: Duration) {}

    async fn close(self) {
        *self.shared.closed.lock().unwrap() = true;
    }
}

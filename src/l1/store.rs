//! The cache itself: moka holds the values, a tag index says which keys were cached
//! under each tag, and the flight registry keeps a load that began before an
//! invalidation from storing its result. Everything here is local: the subscriber
//! calls `invalidate_*`, `flush` and `set_healthy`/`set_unhealthy`.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::future::Cache;
use tokio::sync::watch;

use super::flight::{Begin, Outcome, Registry};
use super::metrics::{add, bump, Counters, Metrics};
use super::Notice;

/// What moka holds for a key: the value, the tags it was cached under, and the id
/// of the guard that stored it (so the tag index forgets only this very entry).
pub(crate) struct Stored<V> {
    pub value: V,
    tags: Arc<[Arc<str>]>,
    id: u64,
}

pub(crate) type NoticeFn = Arc<dyn Fn(&Notice<'_>) + Send + Sync>;

/// Tag -> the keys cached under it, each with the id of the entry that put it there.
#[derive(Default)]
struct TagIndex {
    map: HashMap<Arc<str>, HashMap<Arc<str>, u64>>,
}

impl TagIndex {
    fn add(&mut self, key: &Arc<str>, tags: &[Arc<str>], id: u64) {
        for t in tags {
            self.map
                .entry(t.clone())
                .or_default()
                .insert(key.clone(), id);
        }
    }

    fn forget(&mut self, key: &str, tags: &[Arc<str>], id: u64) {
        for t in tags {
            if let Some(keys) = self.map.get_mut(t) {
                if keys.get(key) == Some(&id) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.map.remove(t);
                    }
                }
            }
        }
    }

    fn take(&mut self, tag: &str) -> Vec<Arc<str>> {
        self.map
            .remove(tag)
            .map(|keys| keys.into_keys().collect())
            .unwrap_or_default()
    }
}

pub(crate) struct Core<V> {
    cache: Cache<Arc<str>, Arc<Stored<V>>>,
    tags: Arc<Mutex<TagIndex>>,
    registry: Registry<V>,
    pub counters: Counters,
    health: watch::Sender<bool>,
    reason: Mutex<Option<String>>,
    notice: Option<NoticeFn>,
}

pub(crate) fn tag_list<T: AsRef<str>>(tags: &[T]) -> Arc<[Arc<str>]> {
    tags.iter().map(|t| Arc::from(t.as_ref())).collect()
}

impl<V: Clone + Send + Sync + 'static> Core<V> {
    pub fn new(capacity: u64, ttl: Duration, notice: Option<NoticeFn>) -> Core<V> {
        let tags = Arc::new(Mutex::new(TagIndex::default()));
        let index = tags.clone();
        let cache = Cache::builder()
            .max_capacity(capacity)
            .time_to_live(ttl)
            .eviction_listener(move |key: Arc<Arc<str>>, stored: Arc<Stored<V>>, _cause| {
                index.lock().unwrap().forget(&key, &stored.tags, stored.id);
            })
            .build();
        Core {
            cache,
            tags,
            registry: Registry::new(),
            counters: Counters::new(),
            health: watch::channel(false).0,
            reason: Mutex::new(Some(
                "starting: waiting for a heartbeat on every partition".into(),
            )),
            notice,
        }
    }

    pub async fn get(&self, key: &str) -> Option<V> {
        match self.cache.get(key).await {
            Some(s) => {
                bump(&self.counters.hits);
                Some(s.value.clone())
            }
            None => {
                bump(&self.counters.misses);
                None
            }
        }
    }

    /// A miss: joins the load of `key` in flight or runs `loader`, storing its value
    /// only if nothing invalidated it meanwhile.
    pub async fn load<T, F, Fut, E>(&self, key: &str, tags: &[T], loader: F) -> Result<V, Arc<E>>
    where
        T: AsRef<str>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Send + Sync + 'static,
    {
        let key: Arc<str> = Arc::from(key);
        let tags = tag_list(tags);
        let mut loader = Some(loader);
        loop {
            let (id, tx) = match self.registry.begin(&key, &tags) {
                Begin::Join(mut rx) => {
                    let outcome = match rx.wait_for(|o| o.is_some()).await {
                        Ok(o) => o.clone().expect("waited for some"),
                        // The leader went away (cancelled, or its loader panicked).
                        Err(_) => continue,
                    };
                    match outcome {
                        Ok(v) => return Ok(v),
                        Err(e) => match e.downcast::<E>() {
                            Ok(e) => return Err(e),
                            // Another caller's error type: load with our own loader.
                            Err(_) => continue,
                        },
                    }
                }
                Begin::Lead { id, tx } => (id, tx),
            };
            let mut lead = Lead::new(self, id, key.clone(), tags.clone(), Some(tx));
            // A load that ended between our miss and now may have stored the value.
            if let Some(s) = self.cache.get(&*key).await {
                lead.finish(Some(Ok(s.value.clone())));
                return Ok(s.value.clone());
            }
            bump(&self.counters.loads);
            let loader = loader.take().expect("a caller leads at most once");
            return match loader().await {
                Ok(v) => {
                    lead.store(v.clone()).await;
                    Ok(v)
                }
                Err(e) => {
                    bump(&self.counters.load_errors);
                    let e = Arc::new(e);
                    let shared: Arc<dyn Any + Send + Sync> = e.clone();
                    lead.finish(Some(Err(shared)));
                    Err(e)
                }
            };
        }
    }

    pub async fn insert<T: AsRef<str>>(&self, key: &str, value: V, tags: &[T]) -> bool {
        let key: Arc<str> = Arc::from(key);
        let tags = tag_list(tags);
        let id = self.registry.begin_insert(&key, &tags);
        Lead::new(self, id, key, tags, None).store(value).await
    }

    /// Evicts `keys`; the number of entries removed.
    pub async fn invalidate_keys<K: AsRef<str>>(&self, keys: &[K]) -> usize {
        let mut evicted = 0;
        for k in keys {
            let k = k.as_ref();
            self.registry.poison_key(k);
            if self.cache.remove(k).await.is_some() {
                evicted += 1;
            }
        }
        add(&self.counters.evictions_by_invalidation, evicted as u64);
        evicted
    }

    /// Evicts every key cached under `tags`; the number of entries removed.
    pub async fn invalidate_tags<T: AsRef<str>>(&self, tags: &[T]) -> usize {
        let mut evicted = 0;
        for t in tags {
            let t = t.as_ref();
            self.registry.poison_tag(t);
            let keys = self.tags.lock().unwrap().take(t);
            for k in keys {
                // A load of the key declared without this tag began before the purge too.
                self.registry.poison_key(&k);
                if self.cache.remove(&*k).await.is_some() {
                    evicted += 1;
                }
            }
        }
        add(&self.counters.evictions_by_invalidation, evicted as u64);
        evicted
    }

    /// Empties the cache; loads in flight will not store.
    pub async fn flush(&self) -> u64 {
        self.registry.poison_all();
        self.empty().await
    }

    async fn empty(&self) -> u64 {
        let before = self.cache.entry_count();
        self.tags.lock().unwrap().map.clear();
        self.cache.invalidate_all();
        self.cache.run_pending_tasks().await;
        before
    }

    /// The stream became unsafe: empty the cache and store nothing until healthy.
    pub async fn set_unhealthy(&self, reason: &str) {
        let was = self.registry.set_healthy(false);
        *self.reason.lock().unwrap() = Some(reason.to_string());
        self.empty().await;
        if was {
            bump(&self.counters.resets);
            self.health.send_replace(false);
            tracing::warn!(reason, "wal2cache L1: the invalidation stream is unsafe; emptied the cache, serving through loaders until it is healthy again");
            self.notify(&Notice::Unhealthy { reason });
        } else {
            tracing::debug!(reason, "wal2cache L1: still unhealthy");
        }
    }

    pub fn set_healthy(&self) {
        if !self.registry.set_healthy(true) {
            *self.reason.lock().unwrap() = None;
            self.health.send_replace(true);
            tracing::info!("wal2cache L1: the invalidation stream is healthy; caching");
            self.notify(&Notice::Healthy);
        }
    }

    pub fn is_healthy(&self) -> bool {
        *self.health.borrow()
    }

    pub fn health(&self) -> watch::Receiver<bool> {
        self.health.subscribe()
    }

    pub fn notify(&self, notice: &Notice<'_>) {
        if let Some(f) = &self.notice {
            f(notice);
        }
    }

    pub fn metrics(&self) -> Metrics {
        let mut m = self.counters.snapshot();
        m.healthy = self.is_healthy();
        m.unhealthy_reason = self.reason.lock().unwrap().clone();
        m.entries = self.cache.entry_count();
        m
    }

    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }
}

/// A load's (or an insert's) hold on its guard. Dropped without `finish` (the caller
/// was cancelled, the loader panicked), it ends the guard, and the waiters retry.
struct Lead<'a, V: Clone + Send + Sync + 'static> {
    core: &'a Core<V>,
    id: u64,
    key: Arc<str>,
    tags: Arc<[Arc<str>]>,
    tx: Option<watch::Sender<Option<Outcome<V>>>>,
    finished: bool,
    /// A value is in moka that may have to come out again: set from the insert until
    /// the check after it (and the removal it may call for) is done.
    cleanup: bool,
}

impl<'a, V: Clone + Send + Sync + 'static> Lead<'a, V> {
    fn new(
        core: &'a Core<V>,
        id: u64,
        key: Arc<str>,
        tags: Arc<[Arc<str>]>,
        tx: Option<watch::Sender<Option<Outcome<V>>>>,
    ) -> Self {
        Lead {
            core,
            id,
            key,
            tags,
            tx,
            finished: false,
            cleanup: false,
        }
    }

    /// Stores `value` unless the guard was poisoned; whether it stayed stored.
    ///
    /// The guard is checked before the insert and again after it: an invalidation
    /// that lands in between (its eviction may have run before our insert) poisons
    /// the guard, and the second check removes what we stored.
    async fn store(mut self, value: V) -> bool {
        let c = self.core;
        if !c.registry.is_clean(self.id) {
            bump(&c.counters.not_stored);
            self.finish(Some(Ok(value)));
            return false;
        }
        let stored = Arc::new(Stored {
            value: value.clone(),
            tags: self.tags.clone(),
            id: self.id,
        });
        c.tags.lock().unwrap().add(&self.key, &self.tags, self.id);
        self.cleanup = true;
        c.cache.insert(self.key.clone(), stored).await;
        if self.finish(Some(Ok(value))) {
            self.cleanup = false;
            bump(&c.counters.stored);
            true
        } else {
            c.cache.remove(&*self.key).await;
            self.cleanup = false;
            bump(&c.counters.not_stored);
            false
        }
    }

    /// Ends the guard and hands `outcome` to the waiters; whether the guard was clean.
    fn finish(&mut self, outcome: Option<Outcome<V>>) -> bool {
        let clean = self.core.registry.finish(self.id);
        self.finished = true;
        if let (Some(tx), Some(o)) = (self.tx.take(), outcome) {
            tx.send_replace(Some(o));
        }
        clean
    }
}

impl<V: Clone + Send + Sync + 'static> Drop for Lead<'_, V> {
    fn drop(&mut self) {
        if !self.finished {
            self.core.registry.finish(self.id);
        }
        if self.cleanup {
            // Cancelled between the insert and its check: take the value out again.
            let cache = self.core.cache.clone();
            let key = self.key.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { cache.invalidate(&*key).await });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn core() -> Arc<Core<String>> {
        let c = Arc::new(Core::new(1000, Duration::from_secs(60), None));
        c.set_healthy();
        c
    }

    #[tokio::test]
    async fn a_cancelled_load_lets_its_waiters_load_again() {
        let core = core();
        let c = core.clone();
        let leader = tokio::spawn(async move {
            c.load("k", &["t"], || async {
                std::future::pending::<()>().await;
                Ok::<_, Infallible>("never".to_string())
            })
            .await
        });
        while core.registry.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let c = core.clone();
        let waiter = tokio::spawn(async move {
            c.load("k", &["t"], || async {
                Ok::<_, Infallible>("second".to_string())
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        assert_eq!(waiter.await.unwrap().unwrap(), "second");
        assert_eq!(core.get("k").await.as_deref(), Some("second"));
        assert_eq!(core.registry.in_flight(), 0);
    }

    #[tokio::test]
    async fn the_tag_index_follows_the_entry_that_is_cached() {
        let core = core();
        assert!(core.insert("a", "1".into(), &["t"]).await);
        // Replaced under another tag: t no longer names it.
        assert!(core.insert("a", "2".into(), &["u"]).await);
        core.run_pending_tasks().await;
        assert_eq!(core.invalidate_tags(&["t"]).await, 0);
        assert_eq!(core.get("a").await.as_deref(), Some("2"));
        assert_eq!(core.invalidate_tags(&["u"]).await, 1);
        assert_eq!(core.get("a").await, None);
        assert!(core.tags.lock().unwrap().map.is_empty());
        // Evicted by key: its tags forget it.
        assert!(core.insert("b", "1".into(), &["t", "u"]).await);
        assert_eq!(core.invalidate_keys(&["b"]).await, 1);
        core.run_pending_tasks().await;
        assert!(core.tags.lock().unwrap().map.is_empty());
    }

    #[tokio::test]
    async fn unhealthy_stores_nothing_and_loads_after_it_are_clean() {
        let core = core();
        assert!(core.insert("a", "1".into(), NO_TAGS).await);
        core.set_unhealthy("test").await;
        assert_eq!(core.get("a").await, None);
        assert!(!core.insert("a", "1".into(), NO_TAGS).await);
        let v = core
            .load("a", NO_TAGS, || async {
                Ok::<_, Infallible>("x".to_string())
            })
            .await
            .unwrap();
        assert_eq!(v, "x");
        assert_eq!(core.get("a").await, None);
        core.set_healthy();
        assert!(core.insert("a", "1".into(), NO_TAGS).await);
        let m = core.metrics();
        assert_eq!((m.resets, m.stored, m.not_stored), (1, 2, 2), "{m:?}");
    }

    const NO_TAGS: &[&str] = &[];
}

//! Loads in flight. Each load (and each `insert`) holds a guard from the moment it
//! begins; an invalidation of its key or of one of its tags, a flush, or a change of
//! health poisons the guard, and a poisoned load does not store its result. One load
//! per key runs at a time (singleflight): later callers wait for its outcome, unless an
//! invalidation detached it, in which case they start a fresh load.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// A load's outcome as its waiters see it: the error is type-erased (an `Arc<E>`) so
/// that `get_with` and `try_get_with` callers can share one flight.
pub(crate) type Outcome<V> = Result<V, Arc<dyn Any + Send + Sync>>;

pub(crate) type Waiter<V> = watch::Receiver<Option<Outcome<V>>>;

pub(crate) struct Registry<V> {
    state: Mutex<State<V>>,
}

struct State<V> {
    healthy: bool,
    next_id: u64,
    guards: HashMap<u64, Guard>,
    by_key: HashMap<Arc<str>, Vec<u64>>,
    by_tag: HashMap<Arc<str>, Vec<u64>>,
    /// The one load of a key that new callers join, with its guard id.
    flights: HashMap<Arc<str>, (u64, Waiter<V>)>,
}

struct Guard {
    key: Arc<str>,
    tags: Arc<[Arc<str>]>,
    poisoned: bool,
}

/// What a caller does after a miss.
pub(crate) enum Begin<V> {
    /// Run the loader: the caller owns guard `id`; `tx` reaches the waiters.
    Lead {
        id: u64,
        tx: watch::Sender<Option<Outcome<V>>>,
    },
    /// Wait for the load already running.
    Join(Waiter<V>),
}

impl<V> State<V> {
    fn add_guard(&mut self, key: &Arc<str>, tags: &Arc<[Arc<str>]>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.guards.insert(
            id,
            Guard {
                key: key.clone(),
                tags: tags.clone(),
                // Nothing loaded while the stream is unsafe may be stored, even if
                // the stream recovers before the load ends: events may have been lost.
                poisoned: !self.healthy,
            },
        );
        self.by_key.entry(key.clone()).or_default().push(id);
        for t in tags.iter() {
            self.by_tag.entry(t.clone()).or_default().push(id);
        }
        id
    }

    fn poison(&mut self, id: u64) {
        let Some(g) = self.guards.get_mut(&id) else {
            return;
        };
        g.poisoned = true;
        if self.flights.get(&g.key).is_some_and(|(f, _)| *f == id) {
            self.flights.remove(&g.key);
        }
    }

    fn poison_ids(&mut self, ids: Option<Vec<u64>>) {
        for id in ids.into_iter().flatten() {
            self.poison(id);
        }
    }

    /// Removes guard `id`; whether it was still clean.
    fn remove_guard(&mut self, id: u64) -> bool {
        let Some(g) = self.guards.remove(&id) else {
            return false;
        };
        if self.flights.get(&g.key).is_some_and(|(f, _)| *f == id) {
            self.flights.remove(&g.key);
        }
        unindex(&mut self.by_key, &g.key, id);
        for t in g.tags.iter() {
            unindex(&mut self.by_tag, t, id);
        }
        !g.poisoned
    }
}

fn unindex(map: &mut HashMap<Arc<str>, Vec<u64>>, name: &Arc<str>, id: u64) {
    if let Some(ids) = map.get_mut(name) {
        ids.retain(|i| *i != id);
        if ids.is_empty() {
            map.remove(name);
        }
    }
}

impl<V: Clone> Registry<V> {
    pub fn new() -> Registry<V> {
        Registry {
            state: Mutex::new(State {
                healthy: false,
                next_id: 1,
                guards: HashMap::new(),
                by_key: HashMap::new(),
                by_tag: HashMap::new(),
                flights: HashMap::new(),
            }),
        }
    }

    /// Joins the load of `key` in flight, or starts one (the caller leads it).
    pub fn begin(&self, key: &Arc<str>, tags: &Arc<[Arc<str>]>) -> Begin<V> {
        let mut s = self.state.lock().unwrap();
        if let Some((_, rx)) = s.flights.get(key) {
            return Begin::Join(rx.clone());
        }
        let id = s.add_guard(key, tags);
        let (tx, rx) = watch::channel(None);
        s.flights.insert(key.clone(), (id, rx));
        Begin::Lead { id, tx }
    }

    /// A guard for an explicit insert. The insert is newer than any load of the key
    /// in flight: those are poisoned so they cannot overwrite it.
    pub fn begin_insert(&self, key: &Arc<str>, tags: &Arc<[Arc<str>]>) -> u64 {
        let mut s = self.state.lock().unwrap();
        let ids = s.by_key.get(key).cloned();
        s.poison_ids(ids);
        s.add_guard(key, tags)
    }

    /// Whether guard `id` is still clean (its result may be stored).
    pub fn is_clean(&self, id: u64) -> bool {
        let s = self.state.lock().unwrap();
        s.guards.get(&id).is_some_and(|g| !g.poisoned)
    }

    /// Ends guard `id` (and its flight); whether it was still clean.
    pub fn finish(&self, id: u64) -> bool {
        self.state.lock().unwrap().remove_guard(id)
    }

    pub fn poison_key(&self, key: &str) {
        let mut s = self.state.lock().unwrap();
        let ids = s.by_key.get(key).cloned();
        s.poison_ids(ids);
    }

    pub fn poison_tag(&self, tag: &str) {
        let mut s = self.state.lock().unwrap();
        let ids = s.by_tag.get(tag).cloned();
        s.poison_ids(ids);
    }

    pub fn poison_all(&self) {
        let mut s = self.state.lock().unwrap();
        let ids: Vec<u64> = s.guards.keys().copied().collect();
        s.poison_ids(Some(ids));
    }

    /// Sets the health; every load in flight is poisoned on a change. Returns the
    /// previous value.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let mut s = self.state.lock().unwrap();
        let was = s.healthy;
        s.healthy = healthy;
        if was != healthy {
            let ids: Vec<u64> = s.guards.keys().copied().collect();
            s.poison_ids(Some(ids));
        }
        was
    }

    /// Loads in flight (guards held), for tests.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap().guards.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Arc<str> {
        Arc::from(k)
    }

    fn tags(t: &[&str]) -> Arc<[Arc<str>]> {
        t.iter().map(|t| Arc::from(*t)).collect()
    }

    fn lead(r: &Registry<u32>, k: &str, t: &[&str]) -> u64 {
        match r.begin(&key(k), &tags(t)) {
            Begin::Lead { id, tx } => {
                std::mem::forget(tx);
                id
            }
            Begin::Join(_) => panic!("expected to lead"),
        }
    }

    #[test]
    fn one_flight_per_key_until_it_is_poisoned() {
        let r = Registry::<u32>::new();
        r.set_healthy(true);
        let a = lead(&r, "k", &[]);
        assert!(matches!(r.begin(&key("k"), &tags(&[])), Begin::Join(_)));
        r.poison_key("k");
        assert!(!r.is_clean(a));
        // The poisoned flight is detached: a new caller starts a fresh load.
        let b = lead(&r, "k", &[]);
        assert!(r.is_clean(b));
        assert!(!r.finish(a));
        assert!(r.finish(b));
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn tags_flushes_and_health_poison() {
        let r = Registry::<u32>::new();
        let born_unhealthy = lead(&r, "x", &[]);
        assert!(!r.is_clean(born_unhealthy));
        r.finish(born_unhealthy);
        r.set_healthy(true);
        let a = lead(&r, "a", &["t1", "t2"]);
        let b = lead(&r, "b", &["t2"]);
        let c = lead(&r, "c", &["t3"]);
        r.poison_tag("t1");
        assert!(!r.is_clean(a) && r.is_clean(b) && r.is_clean(c));
        r.poison_tag("t2");
        assert!(!r.is_clean(b) && r.is_clean(c));
        r.poison_all();
        assert!(!r.is_clean(c));
        for id in [a, b, c] {
            assert!(!r.finish(id));
        }
        let d = lead(&r, "d", &[]);
        r.set_healthy(false);
        assert!(!r.finish(d));
        let e = r.begin_insert(&key("e"), &tags(&[]));
        assert!(!r.is_clean(e), "nothing is stored while unhealthy");
    }

    #[test]
    fn an_insert_poisons_the_loads_of_its_key() {
        let r = Registry::<u32>::new();
        r.set_healthy(true);
        let load = lead(&r, "k", &[]);
        let insert = r.begin_insert(&key("k"), &tags(&[]));
        assert!(!r.is_clean(load));
        assert!(r.finish(insert));
    }
}

//! A short per-replica cache of GetProfile answers (`PROFILE_CACHE_TTL_MS`, off at 0).
//!
//! **How stale can an answer be?** Every committed change to what a profile shows makes
//! Postgres notify `refsys_profiles` with the id of each user whose profile changed (triggers
//! on `users` and `user_counters`, migration `profile_invalidation`), whatever wrote it: any
//! replica, the admin CLI, a future job. This replica's one LISTEN connection
//! ([`crate::events::Notifier`]) turns each notification into [`ProfileCache::invalidate`]. So
//! an answer is stale at most for the time a notification takes to arrive (about a millisecond
//! on one network), and never longer than the TTL:
//! - while the LISTEN connection is down nothing is cached, and everything cached before is
//!   dropped when it goes down and again when it is back ([`ProfileCache::set_listening`]);
//! - a read that started before an invalidation of its user cannot store what it read
//!   ([`Ticket`]): it may hold the old state;
//! - a read that took longer than the TTL stores nothing, so invalidation marks need to live
//!   only that long.
//!
//! A caller's own change on this replica is invalidated by the handler before it answers, so a
//! user always reads their own writes here; other users (an inviter after an activation) and
//! other replicas see it once the notification arrives.
//!
//! Pure data structure: time comes in as arguments, so the tests drive it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use refsys_proto::referral::v1 as pb;
use uuid::Uuid;

/// Shards, so concurrent readers of different users rarely wait on one lock.
const SHARDS: usize = 16;

enum Slot {
    // Boxed: a profile is large next to a mark, and many slots of a busy cache are marks.
    Cached {
        profile: Box<pb::Profile>,
        at: Instant,
    },
    /// The user's profile changed at `generation`; reads that started earlier must not store.
    Invalidated { generation: u64, at: Instant },
}

/// Handed out by a miss; [`ProfileCache::store`] takes it back to tell whether the user's
/// profile may have changed since the read began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
    started: Instant,
}

pub struct ProfileCache {
    ttl: Duration,
    per_shard: usize,
    shards: Vec<Mutex<HashMap<Uuid, Slot>>>,
    /// Bumped by every invalidation and every clear.
    generation: AtomicU64,
    /// Generation of the last [`Self::clear`]: tickets older than that store nothing.
    cleared: AtomicU64,
    listening: AtomicBool,
}

impl ProfileCache {
    /// Holds up to about `capacity` users for `ttl` each. Nothing is stored until
    /// [`Self::set_listening`] says invalidations arrive.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            per_shard: capacity.div_ceil(SHARDS).max(1),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            generation: AtomicU64::new(0),
            cleared: AtomicU64::new(0),
            listening: AtomicBool::new(false),
        }
    }

    fn shard(&self, id: &Uuid) -> std::sync::MutexGuard<'_, HashMap<Uuid, Slot>> {
        let index = (id.as_u128() % SHARDS as u128) as usize;
        // A panic while holding the lock cannot leave a map half-updated in a way that matters
        // here (each operation is one insert or remove), so a poisoned lock is still usable.
        self.shards[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached profile of `id`, or the ticket to store one read now.
    pub fn get(&self, id: Uuid, now: Instant) -> Result<pb::Profile, Ticket> {
        let ticket = Ticket {
            generation: self.generation.load(Ordering::Acquire),
            started: now,
        };
        match self.shard(&id).get(&id) {
            Some(Slot::Cached { profile, at }) if now.duration_since(*at) < self.ttl => {
                Ok(pb::Profile::clone(profile))
            }
            _ => Err(ticket),
        }
    }

    /// Stores `profile`, read under `ticket`, unless it may already be out of date: the user's
    /// profile changed since the read began, the cache was cleared, invalidations are not
    /// arriving, or the read took longer than the TTL. Says whether it stored.
    pub fn store(&self, id: Uuid, profile: pb::Profile, ticket: Ticket, now: Instant) -> bool {
        if !self.listening.load(Ordering::Acquire)
            || self.cleared.load(Ordering::Acquire) > ticket.generation
            || now.duration_since(ticket.started) >= self.ttl
        {
            return false;
        }
        let mut shard = self.shard(&id);
        if let Some(Slot::Invalidated { generation, .. }) = shard.get(&id)
            && *generation > ticket.generation
        {
            return false;
        }
        if shard.len() >= self.per_shard && !shard.contains_key(&id) {
            self.drop_expired(&mut shard, now);
            if shard.len() >= self.per_shard {
                return false;
            }
        }
        shard.insert(
            id,
            Slot::Cached {
                profile: Box::new(profile),
                at: now,
            },
        );
        true
    }

    /// `id`'s profile changed: drop it, and keep reads already under way from storing it.
    pub fn invalidate(&self, id: Uuid, now: Instant) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let mut shard = self.shard(&id);
        // Marks outlive no read that could still store (see `store`), so the old ones go:
        // what stays is bounded by the write rate times the TTL.
        if shard.len() >= self.per_shard {
            self.drop_expired(&mut shard, now);
        }
        shard.insert(
            id,
            Slot::Invalidated {
                generation,
                at: now,
            },
        );
    }

    fn drop_expired(&self, shard: &mut HashMap<Uuid, Slot>, now: Instant) {
        shard.retain(|_, slot| match slot {
            Slot::Cached { at, .. } | Slot::Invalidated { at, .. } => {
                now.duration_since(*at) < self.ttl
            }
        });
    }

    /// Whether invalidations arrive, so answers are stored.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Whether invalidations arrive. Either way everything cached so far is dropped: while
    /// they did not arrive, changes may have been missed.
    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Release);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.cleared.store(generation, Ordering::Release);
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(1);

    fn profile(points: i64) -> pb::Profile {
        pb::Profile {
            bonus_points: points,
            ..pb::Profile::default()
        }
    }

    fn listening_cache(capacity: usize) -> ProfileCache {
        let cache = ProfileCache::new(TTL, capacity);
        cache.set_listening(true);
        cache
    }

    #[test]
    fn a_stored_profile_is_served_until_the_ttl_ends() {
        let cache = listening_cache(100);
        let (id, t0) = (Uuid::now_v7(), Instant::now());
        let ticket = cache.get(id, t0).unwrap_err();
        assert!(cache.store(id, profile(1), ticket, t0));
        assert_eq!(
            cache.get(id, t0 + TTL - Duration::from_millis(1)),
            Ok(profile(1))
        );
        assert!(cache.get(id, t0 + TTL).is_err());
    }

    #[test]
    fn an_invalidation_drops_the_profile() {
        let cache = listening_cache(100);
        let (id, t0) = (Uuid::now_v7(), Instant::now());
        let ticket = cache.get(id, t0).unwrap_err();
        assert!(cache.store(id, profile(1), ticket, t0));
        cache.invalidate(id, t0);
        let ticket = cache.get(id, t0).unwrap_err();
        // A read that starts after the change may store what it read.
        assert!(cache.store(id, profile(2), ticket, t0));
        assert_eq!(cache.get(id, t0), Ok(profile(2)));
    }

    #[test]
    fn a_read_under_way_when_its_user_changes_stores_nothing() {
        let cache = listening_cache(100);
        let (id, other, t0) = (Uuid::now_v7(), Uuid::now_v7(), Instant::now());
        let ticket = cache.get(id, t0).unwrap_err();
        let other_ticket = cache.get(other, t0).unwrap_err();
        cache.invalidate(id, t0);
        assert!(!cache.store(id, profile(1), ticket, t0));
        assert!(cache.get(id, t0).is_err());
        // Another user's change does not keep this one from storing.
        assert!(cache.store(other, profile(3), other_ticket, t0));
    }

    #[test]
    fn nothing_is_stored_while_invalidations_do_not_arrive() {
        let cache = ProfileCache::new(TTL, 100);
        let (id, t0) = (Uuid::now_v7(), Instant::now());
        assert!(!cache.store(id, profile(1), cache.get(id, t0).unwrap_err(), t0));
        cache.set_listening(true);
        assert!(cache.store(id, profile(1), cache.get(id, t0).unwrap_err(), t0));
        cache.set_listening(false);
        assert!(cache.get(id, t0).is_err(), "losing the listener drops all");
        assert!(!cache.store(id, profile(1), cache.get(id, t0).unwrap_err(), t0));
    }

    #[test]
    fn a_read_from_before_a_clear_or_longer_than_the_ttl_stores_nothing() {
        let cache = listening_cache(100);
        let (id, t0) = (Uuid::now_v7(), Instant::now());
        let ticket = cache.get(id, t0).unwrap_err();
        cache.set_listening(true);
        assert!(!cache.store(id, profile(1), ticket, t0));
        let ticket = cache.get(id, t0).unwrap_err();
        assert!(!cache.store(id, profile(1), ticket, t0 + TTL));
    }

    #[test]
    fn capacity_is_kept_and_expired_entries_make_room() {
        let cache = listening_cache(SHARDS);
        let t0 = Instant::now();
        // Ids that land in one shard (the shard is the id modulo SHARDS).
        let ids: Vec<Uuid> = (0..3u128)
            .map(|n| Uuid::from_u128(n * SHARDS as u128))
            .collect();
        let store = |id, at| cache.store(id, profile(1), cache.get(id, at).unwrap_err(), at);
        assert!(store(ids[0], t0));
        assert!(!store(ids[1], t0), "the shard holds one");
        assert!(store(ids[1], t0 + TTL), "the expired one made room");
        assert!(!store(ids[2], t0 + TTL));
    }
}

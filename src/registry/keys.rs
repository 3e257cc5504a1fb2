//! Where a shard keeps its live keys: the first few in slots inside the shard itself, the
//! rest in a hash table.
//!
//! A shard holds few keys at a time under most loads (keys spread over 32 shards per
//! core, and a key's entry exists only while a request holds or waits for it). Those
//! live in [`INLINE_KEYS`] slots beside the shard's lock, so that an uncontended request
//! touches no memory outside the shard: no table's control bytes, no bucket elsewhere. A
//! key that finds every slot taken goes to the table, which is allocated only then.
//!
//! An entry stays where it was put until it is removed: a slot's entry never moves, and
//! a table entry moves only when the table is resized. A claim remembers where its
//! entry was (a *hint*: a slot, or a table bucket) and finds it again without hashing or
//! comparing keys; a hint that went stale (the table was resized) costs a lookup by
//! hash and id. A hint is trusted only once the entry it names carries the claim's id,
//! which no other entry of the shard ever has: a stale hint may name another key's
//! entry, or none, and is then never taken for the claim's own.
//!
//! Lookups by key check every slot and then, if it holds anything, the table. Each key is
//! in exactly one place, so the order does not matter for correctness.

use hashbrown::{HashTable, hash_table};

/// Keys a shard keeps in slots of its own before it uses its table.
pub(super) const INLINE_KEYS: usize = 4;

/// Marks a hint as a slot index rather than a table bucket.
const SLOT: u32 = 1 << 31;

/// What the shard's entries tell this module about themselves.
pub(super) trait Entry {
    /// The stirred hash of the entry's key.
    fn hash(&self) -> u64;
    /// The entry's id, never reused within its shard.
    fn id(&self) -> u64;
}

/// The live keys of one shard; the slots first (see `Shard`'s layout).
#[repr(C)]
pub(super) struct Keys<T> {
    slots: [Option<T>; INLINE_KEYS],
    table: HashTable<T>,
}

impl<T: Entry> Keys<T> {
    pub(super) fn new() -> Self {
        Keys {
            slots: std::array::from_fn(|_| None),
            table: HashTable::new(),
        }
    }

    /// The entry with `hash` for which `is` holds, and its hint.
    // PERF: layer_sync_new_key. Inlined into the claim with `insert`: left to the compiler,
    // the two measured 18 instructions more per new key (and 8 fewer on live keys).
    #[inline(always)]
    pub(super) fn find(
        &mut self,
        hash: u64,
        mut is: impl FnMut(&T) -> bool,
    ) -> Option<(&mut T, u32)> {
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let Some(entry) = slot {
                if entry.hash() == hash && is(entry) {
                    return Some((entry, SLOT | index as u32));
                }
            }
        }
        if self.table.is_empty() {
            return None;
        }
        let found = self.table.find_entry(hash, |entry| is(entry)).ok()?;
        let hint = bucket_hint(found.bucket_index());
        Some((found.into_mut(), hint))
    }

    /// Adds `entry`, in a free slot if there is one; returns it and its hint.
    // PERF: layer_sync_new_key (see `find`).
    #[inline(always)]
    pub(super) fn insert(&mut self, entry: T) -> (&mut T, u32) {
        if let Some(index) = self.slots.iter().position(Option::is_none) {
            return (self.slots[index].insert(entry), SLOT | index as u32);
        }
        self.insert_in_table(entry)
    }

    // Rare under most loads: a shard with more live keys than slots.
    #[inline(never)]
    fn insert_in_table(&mut self, entry: T) -> (&mut T, u32) {
        let inserted = self.table.insert_unique(entry.hash(), entry, T::hash);
        let hint = bucket_hint(inserted.bucket_index());
        (inserted.into_mut(), hint)
    }

    /// Removes the entry `hint` names, if that is entry `id` and `done` holds for it.
    /// `None` otherwise: another entry, or none, is there (the hint went stale), or the
    /// entry is not done.
    // PERF: layer_sync_new_key (registry Performance: the uncontended release).
    #[inline(always)]
    pub(super) fn take_if(
        &mut self,
        hint: u32,
        id: u64,
        done: impl FnOnce(&T) -> bool,
    ) -> Option<T> {
        if hint & SLOT != 0 {
            let slot = self.slots.get_mut((hint ^ SLOT) as usize)?;
            if slot
                .as_ref()
                .is_some_and(|entry| entry.id() == id && done(entry))
            {
                return slot.take();
            }
            return None;
        }
        let found = self.table.get_bucket_entry(hint as usize).ok()?;
        if found.get().id() == id && done(found.get()) {
            return Some(found.remove().0);
        }
        None
    }

    /// The live entry `(hash, id)`: where `hint` says, or found by its hash, and then
    /// `hint` is updated.
    // PERF: layer_sync_live_key, hand_off_layer (registry Performance: a claim's hint is
    // the entry's address).
    #[inline]
    pub(super) fn get_mut(&mut self, hash: u64, id: u64, hint: &mut u32) -> &mut T {
        if !self.holds(*hint, id) {
            self.search(hash, id, hint);
        }
        self.at(*hint)
    }

    /// Removes the entry at `hint`, which [`get_mut`](Self::get_mut) has just checked.
    #[inline]
    pub(super) fn remove(&mut self, hint: u32) -> T {
        if hint & SLOT != 0 {
            return self.slots[(hint ^ SLOT) as usize]
                .take()
                .expect("a live claim's key entry is present");
        }
        self.table
            .get_bucket_entry(hint as usize)
            .map(|occupied| occupied.remove().0)
            .ok()
            .expect("a live claim's key entry is present")
    }

    /// Whether entry `id` is where `hint` says.
    #[inline]
    fn holds(&self, hint: u32, id: u64) -> bool {
        if hint & SLOT != 0 {
            return self
                .slots
                .get((hint ^ SLOT) as usize)
                .and_then(Option::as_ref)
                .is_some_and(|entry| entry.id() == id);
        }
        self.table
            .get_bucket(hint as usize)
            .is_some_and(|entry| entry.id() == id)
    }

    /// The entry at `hint`, which names a live entry.
    #[inline]
    fn at(&mut self, hint: u32) -> &mut T {
        if hint & SLOT != 0 {
            return self.slots[(hint ^ SLOT) as usize]
                .as_mut()
                .expect("a live claim's key entry is present");
        }
        self.table
            .get_bucket_entry(hint as usize)
            .map(hash_table::OccupiedEntry::into_mut)
            .ok()
            .expect("a live claim's key entry is present")
    }

    /// Points `hint` at the live entry `(hash, id)`, which is not where it said.
    #[inline(never)]
    fn search(&mut self, hash: u64, id: u64, hint: &mut u32) {
        if let Some(index) = self
            .slots
            .iter()
            .position(|slot| slot.as_ref().is_some_and(|entry| entry.id() == id))
        {
            *hint = SLOT | index as u32;
            return;
        }
        let bucket = self
            .table
            .find_bucket_index(hash, |entry| entry.id() == id)
            .expect("a live claim's key entry is present");
        *hint = bucket_hint(bucket);
    }

    /// Live entries.
    pub(super) fn len(&self) -> usize {
        self.slots.iter().filter(|slot| slot.is_some()).count() + self.table.len()
    }

    /// Every live entry.
    pub(super) fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten().chain(self.table.iter())
    }

    /// Entries the shard can hold without allocating: its slots and its table's room.
    pub(super) fn room(&self) -> usize {
        INLINE_KEYS + self.table.capacity()
    }

    /// The table, for the shard's hysteresis.
    pub(super) fn table(&mut self) -> &mut HashTable<T> {
        &mut self.table
    }
}

/// A bucket index as a claim keeps it. A table of 2^31 buckets or more would only make
/// the hint miss (it would read as a slot that does not exist), and the entry is then
/// found by its hash.
fn bucket_hint(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX)
}

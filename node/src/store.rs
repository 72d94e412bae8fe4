//! Local state in sled: state values and durable delayed messages.
//!
//! One sled tree, keys prefixed by kind and key group so a key group's data is one range
//! (the unit a later checkpoint or move reads):
//!
//! ```text
//! 's' ‖ kg:u16be ‖ len:u32be ‖ "ns/type/id" ‖ state name  → 1 ‖ expires_at_ms:u64le ‖ tn_len:u16le ‖ typename ‖ value
//! 't' ‖ kg:u16be ‖ epoch:u64be ‖ n:u64be                → a delayed message (see `StoredTimer`)
//! 'e' ‖ kg:u16be ‖ epoch:u64be ‖ n:u64be                → an unread egress record
//! 'i' ‖ kg:u16be ‖ scope                                 → an idempotency record
//! 'p' ‖ kg:u16be ‖ epoch:u64be ‖ n:u64be                → a pending message (see below)
//! 'm' ‖ "key_groups"                                     → u32le
//! ```
//!
//! A timer lives in the key group of its *sender*, because cancellation tokens are scoped
//! to the sender. Writes are batched by the shards (one `apply_batch` per flush).
//!
//! Delayed messages and egress records are numbered by a [`Seq`]: the epoch that wrote them
//! and a number the writing process had not given before in that epoch. A key group's epoch
//! is committed by one owner, and epoch numbers are not reused, so a record's key names it
//! alone in the cluster for ever: an egress record's id stays the same across crashes, moves
//! and restarts, and no other record ever gets it. (Keys written before this scheme,
//! `tag ‖ kg ‖ seq:u64be`, read as epoch 0.)
//!
//! A *pending message record* is a message queued for an address of the key group that stayed
//! unprocessed across two cuts (a backlog): its owner shard writes it once, in the delta of the
//! epoch whose cut found it the second time, and deletes it in the epoch that processes it. So
//! a backlog is written once and not in full at every cut (`checkpoint/OVERVIEW.md`). Its key
//! orders an address's records as they were queued; its value is the encoded
//! `checkpoint::format::PendingMessage`.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use statemesh_sdk::{Address, StateSlot, TypedValue, ValueSpecDescriptor};

/// A local storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("sled at {path}: {source}")]
    Sled {
        /// The directory.
        path: String,
        /// Why.
        source: sled::Error,
    },
    /// The data directory was made with another key-group count.
    #[error("data directory {path} was created with key_groups = {found}, but the configuration says {expected}; key_groups cannot change for existing data")]
    KeyGroupsChanged {
        /// The directory.
        path: String,
        /// Configured.
        expected: u32,
        /// Stored.
        found: u32,
    },
    /// A stored record does not decode.
    #[error("corrupt record in local state: {0}")]
    Corrupt(String),
}

/// A delayed message as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTimer {
    /// When it fires, ms since the Unix epoch.
    pub due_ms: u64,
    /// The sending address (owner of the cancellation token).
    pub sender: Address,
    /// The cancellation token, if any.
    pub token: Option<String>,
    /// The target.
    pub target: Address,
    /// The message.
    pub message: TypedValue,
}

/// The sled database of a node. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    path: Arc<str>,
}

fn state_prefix(kg: u32, addr: &Address) -> Vec<u8> {
    state_prefix_with_room(kg, addr, 16)
}

/// [`state_prefix`] with room for `extra` more bytes (a state's name).
fn state_prefix_with_room(kg: u32, addr: &Address, extra: usize) -> Vec<u8> {
    // The address as `Address::to_text` writes it, without an intermediate string.
    let (typ, id) = (addr.typ.as_str(), addr.id.as_bytes());
    let len = typ.len() + 1 + id.len();
    let mut k = Vec::with_capacity(7 + len + extra);
    k.push(b's');
    k.extend_from_slice(&(kg as u16).to_be_bytes());
    k.extend_from_slice(&(len as u32).to_be_bytes());
    k.extend_from_slice(typ.as_bytes());
    k.push(b'/');
    k.extend_from_slice(id);
    k
}

/// The number of a delayed message or an egress record: the epoch that wrote it, then a
/// number its writer had not given before (see the module documentation). Ordered as written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq {
    /// The epoch whose delta holds the record.
    pub epoch: u64,
    /// Unique per epoch and writer, increasing as records are written.
    pub n: u64,
}

/// `tag ‖ kg:u16be ‖ epoch:u64be ‖ n:u64be`.
fn seq_key(tag: u8, kg: u32, seq: Seq) -> Vec<u8> {
    let mut k = Vec::with_capacity(19);
    k.push(tag);
    k.extend_from_slice(&(kg as u16).to_be_bytes());
    k.extend_from_slice(&seq.epoch.to_be_bytes());
    k.extend_from_slice(&seq.n.to_be_bytes());
    k
}

/// The sequence of a `seq_key` (or of an older `tag ‖ kg ‖ seq:u64be` key: epoch 0).
fn key_seq(k: &[u8]) -> Option<Seq> {
    let word = |r: std::ops::Range<usize>| u64::from_be_bytes(k[r].try_into().expect("8 bytes"));
    match k.len() {
        19 => Some(Seq {
            epoch: word(3..11),
            n: word(11..19),
        }),
        11 => Some(Seq {
            epoch: 0,
            n: word(3..11),
        }),
        _ => None,
    }
}

fn timer_key(kg: u32, seq: Seq) -> Vec<u8> {
    seq_key(b't', kg, seq)
}

/// The key of a pending message record: `'p' ‖ kg:u16be ‖ epoch:u64be ‖ n:u64be`.
pub fn pending_key(kg: u32, seq: Seq) -> Vec<u8> {
    seq_key(b'p', kg, seq)
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(StoreError::Corrupt(format!(
                "expected {n} more bytes, found {}",
                self.0.len()
            )));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<&'a str, StoreError> {
        std::str::from_utf8(self.bytes()?).map_err(|e| StoreError::Corrupt(e.to_string()))
    }
    fn address(&mut self) -> Result<Address, StoreError> {
        Address::parse(self.string()?).map_err(|e| StoreError::Corrupt(e.to_string()))
    }
}

fn encode_value(slot: &StateSlot, value: &[u8]) -> Vec<u8> {
    let tn = slot.typename.as_bytes();
    let mut v = Vec::with_capacity(11 + tn.len() + value.len());
    v.push(1);
    v.extend_from_slice(&slot.expires_at_ms.to_le_bytes());
    v.extend_from_slice(&(tn.len() as u16).to_le_bytes());
    v.extend_from_slice(tn);
    v.extend_from_slice(value);
    v
}

/// Decodes a stored state value: (typename, expires_at_ms, value).
fn decode_value(raw: &[u8]) -> Result<(&str, u64, &[u8]), StoreError> {
    if raw.len() < 11 || raw[0] != 1 {
        return Err(StoreError::Corrupt(format!(
            "state value: expected version 1 and ≥ 11 bytes, found {} bytes",
            raw.len()
        )));
    }
    let expires = u64::from_le_bytes(raw[1..9].try_into().expect("8 bytes"));
    let tn_len = u16::from_le_bytes(raw[9..11].try_into().expect("2 bytes")) as usize;
    if raw.len() < 11 + tn_len {
        return Err(StoreError::Corrupt(
            "state value: typename runs past the end".into(),
        ));
    }
    let tn = std::str::from_utf8(&raw[11..11 + tn_len])
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok((tn, expires, &raw[11 + tn_len..]))
}

impl StoredTimer {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.message.value().len());
        v.extend_from_slice(&self.due_ms.to_le_bytes());
        put_str(&mut v, self.sender.to_string().as_bytes());
        put_str(&mut v, self.token.as_deref().unwrap_or("").as_bytes());
        v.push(u8::from(self.token.is_some()));
        put_str(&mut v, self.target.to_string().as_bytes());
        put_str(&mut v, self.message.typename().as_bytes());
        v.push(u8::from(self.message.has_value()));
        put_str(&mut v, self.message.value());
        v
    }

    fn decode(raw: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader(raw);
        let due_ms = r.u64()?;
        let sender = r.address()?;
        let token = r.string()?.to_string();
        let has_token = r.take(1)?[0] != 0;
        let target = r.address()?;
        let typename = r.string()?.to_string();
        let has_value = r.take(1)?[0] != 0;
        let value = Bytes::copy_from_slice(r.bytes()?);
        let message = if has_value {
            TypedValue::new(typename, value)
        } else {
            TypedValue::empty(typename)
        };
        Ok(StoredTimer {
            due_ms,
            sender,
            token: has_token.then_some(token),
            target,
            message,
        })
    }
}

/// Operations per sled batch. sled 0.34 keeps several KiB of memory per operation of a
/// large batch long after applying it (measured: ~4.5 KiB/op at 100k ops per batch, ~0.5 KiB
/// at ≤ 128), so writes are applied in small atomic chunks.
const CHUNK: usize = 64;

/// One write to the local store.
#[derive(Debug, Clone)]
pub enum Change {
    /// An encoded key and value (`None`: delete).
    Raw(Vec<u8>, Option<Vec<u8>>),
    /// A state slot, encoded later (off the shard: the epoch driver encodes it), so an epoch
    /// cut only clones reference-counted values.
    State(u32, Address, StateSlot),
}

impl Change {
    /// The encoded key and value.
    pub fn encode(self) -> (Vec<u8>, Option<Vec<u8>>) {
        match self {
            Change::Raw(k, v) => (k, v),
            Change::State(kg, addr, slot) => state_entry(kg, &addr, &slot),
        }
    }
}

/// Writes to the local store, applied in order (a later write of a key wins): the same batch
/// is both an epoch's delta in blob storage and what is applied to sled when it commits.
#[derive(Default, Debug, Clone)]
pub struct WriteBatch {
    /// The writes, in order.
    pub ops: Vec<Change>,
}

impl WriteBatch {
    /// Writes (or deletes, if it has no value) a state slot.
    pub fn put_state(&mut self, kg: u32, addr: &Address, slot: &StateSlot) {
        self.ops.push(Change::State(kg, addr.clone(), slot.clone()));
    }

    /// Writes an encoded key and value (`None`: delete).
    pub fn put_raw(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.ops.push(Change::Raw(key, value));
    }

    /// Stores a delayed message.
    pub fn put_timer(&mut self, kg: u32, seq: Seq, t: &StoredTimer) {
        self.put_raw(timer_key(kg, seq), Some(t.encode()));
    }

    /// Deletes a delayed message.
    pub fn delete_timer(&mut self, kg: u32, seq: Seq) {
        self.put_raw(timer_key(kg, seq), None);
    }
}

/// The local-store entry of a state slot: its key and encoded value (`None`: absent).
pub fn state_entry(kg: u32, addr: &Address, slot: &StateSlot) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut key = state_prefix_with_room(kg, addr, slot.name.len());
    key.extend_from_slice(slot.name.as_bytes());
    let value = slot.value.as_ref().map(|v| encode_value(slot, v));
    (key, value)
}

/// A durable egress record: (seq, key, topic, value, placement).
pub type StoredEgress = (Seq, Vec<u8>, String, TypedValue, Option<Placement>);

/// Where an exactly-once Kafka egress is about to produce a record (issue 11): written into the
/// stored record, and committed, before the record is produced, so that after a crash the
/// egress looks for the record's id in that partition from `from` on instead of producing it
/// blindly again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The Kafka partition.
    pub partition: i32,
    /// An offset at or below the record's (the partition's end before it was produced).
    pub from: i64,
    /// When no request producing it under this placement can reach the broker any more (ms
    /// since the Unix epoch): it may be looked for from then on.
    pub settled_ms: u64,
}

/// A stored key and value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// The key of an idempotency record: `'i' ‖ kg:u16be ‖ scope`.
pub fn idempotency_key(kg: u32, scope: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + scope.len());
    k.push(b'i');
    k.extend_from_slice(&(kg as u16).to_be_bytes());
    k.extend_from_slice(scope.as_bytes());
    k
}

/// The key group of an egress record's key (`None`: not one).
pub(crate) fn egress_key_group(k: &[u8]) -> Option<u32> {
    (k.len() >= 3 && k[0] == b'e').then(|| u16::from_be_bytes([k[1], k[2]]) as u32)
}

/// The key of a durable egress record: `'e' ‖ kg:u16be ‖ epoch:u64be ‖ n:u64be`.
pub fn egress_key(kg: u32, seq: Seq) -> Vec<u8> {
    seq_key(b'e', kg, seq)
}

/// The id readers see of the durable egress record stored under `key`:
/// `"<key group>-<epoch>-<n>"`, the same at every read of the record and never another's.
pub fn egress_record_id(key: &[u8]) -> Option<String> {
    let kg = egress_key_group(key)?;
    let seq = key_seq(key)?;
    Some(format!("{kg}-{}-{}", seq.epoch, seq.n))
}

/// The stored form of an egress record.
pub fn encode_egress(topic: &str, v: &TypedValue) -> Vec<u8> {
    encode_placed_egress(topic, v, None)
}

/// The stored form of an egress record with its placement (a trailer after the value:
/// `1 ‖ partition:i32be ‖ from:i64be ‖ settled_ms:u64be`).
pub fn encode_placed_egress(topic: &str, v: &TypedValue, placement: Option<&Placement>) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + topic.len() + v.value().len());
    put_str(&mut out, topic.as_bytes());
    put_str(&mut out, v.typename().as_bytes());
    out.push(u8::from(v.has_value()));
    put_str(&mut out, v.value());
    if let Some(p) = placement {
        out.push(1);
        out.extend_from_slice(&p.partition.to_be_bytes());
        out.extend_from_slice(&p.from.to_be_bytes());
        out.extend_from_slice(&p.settled_ms.to_be_bytes());
    }
    out
}

fn decode_egress(raw: &[u8]) -> Result<(String, TypedValue, Option<Placement>), StoreError> {
    let mut r = Reader(raw);
    let topic = r.string()?.to_string();
    let typename = r.string()?.to_string();
    let has_value = r.take(1)?[0] != 0;
    let value = Bytes::copy_from_slice(r.bytes()?);
    let v = if has_value {
        TypedValue::new(typename, value)
    } else {
        TypedValue::empty(typename)
    };
    let placement = match r.0 {
        [] => None,
        [1, rest @ ..] if rest.len() == 20 => Some(Placement {
            partition: i32::from_be_bytes(rest[0..4].try_into().expect("4 bytes")),
            from: i64::from_be_bytes(rest[4..12].try_into().expect("8 bytes")),
            settled_ms: u64::from_be_bytes(rest[12..20].try_into().expect("8 bytes")),
        }),
        other => {
            return Err(StoreError::Corrupt(format!(
                "egress record: {} unexpected bytes after the value",
                other.len()
            )))
        }
    };
    Ok((topic, v, placement))
}

/// Entry tags that belong to a key group.
const KG_TAGS: [u8; 5] = [b'e', b'i', b'p', b's', b't'];

/// The key group of a local-store entry key (`'s'`, `'t'`, `'i'`, `'p'` and `'e'` keys all
/// start with `tag ‖ kg:u16be`).
pub fn key_group_of(key: &[u8]) -> Option<u32> {
    (key.len() >= 3 && KG_TAGS.contains(&key[0]))
        .then(|| u32::from(u16::from_be_bytes([key[1], key[2]])))
}

/// Meta key: the newest epoch applied to sled.
const APPLIED_KEY: &[u8] = b"mapplied/0";

/// Meta key: key groups whose entries in sled do not follow the applied marker (being
/// loaded from blob storage, or given up), as big-endian `u16`s. A start reads them whole
/// from blob storage if the node owns them.
const STALE_KEY: &[u8] = b"mstale";

impl Store {
    /// How many handles of this store exist (this one included): sled's lock on the directory
    /// is released once the last is dropped.
    pub(crate) fn handles(&self) -> usize {
        Arc::strong_count(&self.path)
    }

    /// Opens (or creates) the store under `dir`, checking the key-group count.
    pub fn open(dir: &Path, key_groups: u32) -> Result<Self, StoreError> {
        let path: Arc<str> = dir.display().to_string().into();
        let sled_err = |source| StoreError::Sled {
            path: path.to_string(),
            source,
        };
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(32 << 20)
            .open()
            .map_err(sled_err)?;
        match db.get(b"mkey_groups").map_err(sled_err)? {
            Some(v) if v.len() == 4 => {
                let found = u32::from_le_bytes(v[..4].try_into().expect("4 bytes"));
                if found != key_groups {
                    return Err(StoreError::KeyGroupsChanged {
                        path: path.to_string(),
                        expected: key_groups,
                        found,
                    });
                }
            }
            Some(_) => {
                return Err(StoreError::Corrupt(
                    "meta key_groups: expected 4 bytes".into(),
                ))
            }
            None => {
                db.insert(b"mkey_groups", &key_groups.to_le_bytes())
                    .map_err(sled_err)?;
                db.flush().map_err(sled_err)?;
            }
        }
        Ok(Store { db, path })
    }

    fn err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.to_string(),
            source,
        }
    }

    /// Loads the declared states of an address (absent slots for missing values).
    pub fn load_state(
        &self,
        kg: u32,
        addr: &Address,
        specs: &[ValueSpecDescriptor],
    ) -> Result<Vec<StateSlot>, StoreError> {
        let prefix = state_prefix(kg, addr);
        let mut slots: Vec<StateSlot> = specs.iter().map(StateSlot::empty).collect();
        let mut key = prefix;
        let base = key.len();
        for slot in slots.iter_mut() {
            key.truncate(base);
            key.extend_from_slice(slot.name.as_bytes());
            if let Some(raw) = self.db.get(&key).map_err(|e| self.err(e))? {
                let (tn, expires, value) = decode_value(&raw)?;
                if tn == &*slot.typename {
                    slot.value = Some(Bytes::copy_from_slice(value));
                    slot.expires_at_ms = expires;
                } else {
                    tracing::warn!(address = %addr, state = %slot.name, stored = tn, declared = %slot.typename,
                        "stored state has another typename than declared; treating it as absent");
                }
            }
        }
        Ok(slots)
    }

    /// All stored states of an address: (name, value, expires_at_ms).
    pub fn scan_state(
        &self,
        kg: u32,
        addr: &Address,
    ) -> Result<Vec<(String, TypedValue, u64)>, StoreError> {
        let prefix = state_prefix(kg, addr);
        let mut out = Vec::new();
        for item in self.db.scan_prefix(&prefix) {
            let (k, raw) = item.map_err(|e| self.err(e))?;
            let name = String::from_utf8_lossy(&k[prefix.len()..]).to_string();
            let (tn, expires, value) = decode_value(&raw)?;
            out.push((
                name,
                TypedValue::new(tn.to_string(), Bytes::copy_from_slice(value)),
                expires,
            ));
        }
        Ok(out)
    }

    /// The records of kind `tag` (`seq_key`s) stored for a key group, in key order: (seq,
    /// value); `what` names them in an error.
    fn scan_seq(&self, tag: u8, kg: u32, what: &str) -> Result<Vec<(Seq, sled::IVec)>, StoreError> {
        let mut prefix = vec![tag];
        prefix.extend_from_slice(&(kg as u16).to_be_bytes());
        let mut out = Vec::new();
        for item in self.db.scan_prefix(&prefix) {
            let (k, raw) = item.map_err(|e| self.err(e))?;
            let seq = key_seq(&k).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "{what} key: expected 11 or 19 bytes, found {}",
                    k.len()
                ))
            })?;
            out.push((seq, raw));
        }
        Ok(out)
    }

    /// The delayed messages stored for a key group: (seq, timer).
    pub fn load_timers(&self, kg: u32) -> Result<Vec<(Seq, StoredTimer)>, StoreError> {
        self.scan_seq(b't', kg, "timer")?
            .into_iter()
            .map(|(seq, raw)| Ok((seq, StoredTimer::decode(&raw)?)))
            .collect()
    }

    /// Applies a batch (in order, chunk by chunk: sled keeps far less memory per operation
    /// for small batches).
    #[cfg(test)]
    pub fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let ops: Vec<_> = batch.ops.into_iter().map(Change::encode).collect();
        self.write_ops(ops.iter().map(|(k, v)| (k.as_slice(), v.as_deref())))
    }

    /// Applies key/value operations in order, in chunks.
    pub fn write_ops<'a>(
        &self,
        ops: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        let mut n = 0;
        for (k, v) in ops {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
            n += 1;
            if n == CHUNK {
                self.db
                    .apply_batch(std::mem::take(&mut b))
                    .map_err(|e| self.err(e))?;
                n = 0;
            }
        }
        if n > 0 {
            self.db.apply_batch(b).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Records that every epoch up to `epoch` is applied.
    pub fn set_applied(&self, epoch: u64) -> Result<(), StoreError> {
        self.db
            .insert(APPLIED_KEY, &epoch.to_le_bytes())
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The newest epoch applied (`None`: none recorded, a fresh or pre-checkpoint store);
    /// the oldest if several markers exist.
    pub fn applied(&self) -> Result<Option<u64>, StoreError> {
        let mut min: Option<u64> = None;
        for item in self.db.scan_prefix(b"mapplied/") {
            let (_, v) = item.map_err(|e| self.err(e))?;
            let e = u64::from_le_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("meta applied: expected 8 bytes".into()))?,
            );
            min = Some(min.map_or(e, |m| m.min(e)));
        }
        Ok(min)
    }

    /// After a recovery: the store holds `epoch` (older or other markers go).
    pub fn reset_applied(&self, epoch: u64) -> Result<(), StoreError> {
        let old: Vec<sled::IVec> = self
            .db
            .scan_prefix(b"mapplied/")
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))?;
        for k in old {
            self.db.remove(k).map_err(|e| self.err(e))?;
        }
        self.set_applied(epoch)?;
        self.flush()
    }

    /// Key groups whose local entries are not to be trusted (see [`set_stale`](Self::set_stale)).
    pub fn stale_key_groups(&self) -> Result<std::collections::BTreeSet<u32>, StoreError> {
        Ok(match self.db.get(STALE_KEY).map_err(|e| self.err(e))? {
            Some(v) => v
                .chunks_exact(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .collect(),
            None => Default::default(),
        })
    }

    /// Marks key groups as stale (their entries may be partial or old: before they are
    /// cleared and rebuilt from blob storage, or when the node gives them up) or as held
    /// again (after they are rebuilt); durable on return (sled is flushed first, so the
    /// rebuilt entries are durable before the mark goes).
    pub fn set_stale(
        &self,
        kgs: impl IntoIterator<Item = u32>,
        stale: bool,
    ) -> Result<(), StoreError> {
        let mut set = self.stale_key_groups()?;
        let mut changed = false;
        for kg in kgs {
            changed |= if stale {
                set.insert(kg)
            } else {
                set.remove(&kg)
            };
        }
        if !changed {
            return Ok(());
        }
        if !stale {
            self.flush()?;
        }
        let v: Vec<u8> = set
            .iter()
            .flat_map(|&kg| (kg as u16).to_be_bytes())
            .collect();
        self.db.insert(STALE_KEY, v).map_err(|e| self.err(e))?;
        self.flush()
    }

    /// Deletes every entry (state, timers, idempotency records, egress and pending message
    /// records) of the key groups.
    pub fn clear_key_groups(&self, kgs: impl Iterator<Item = u32>) -> Result<(), StoreError> {
        for kg in kgs {
            for tag in KG_TAGS {
                let mut prefix = vec![tag];
                prefix.extend_from_slice(&(kg as u16).to_be_bytes());
                let keys: Vec<sled::IVec> = self
                    .db
                    .scan_prefix(&prefix)
                    .keys()
                    .collect::<Result<_, _>>()
                    .map_err(|e| self.err(e))?;
                self.write_ops(keys.iter().map(|k| (k.as_ref(), None)))?;
            }
        }
        Ok(())
    }

    /// Whether any entry of a key group (state, timer, idempotency, egress or pending message
    /// record) is stored.
    pub fn has_entries(&self) -> Result<bool, StoreError> {
        for tag in KG_TAGS {
            if let Some(item) = self.db.scan_prefix([tag]).next() {
                item.map_err(|e| self.err(e))?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Every entry (state, timers, idempotency, egress and pending message records) of a key
    /// group, key-ordered.
    pub fn scan_key_group(&self, kg: u32) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        for tag in KG_TAGS {
            let mut prefix = vec![tag];
            prefix.extend_from_slice(&(kg as u16).to_be_bytes());
            for item in self.db.scan_prefix(&prefix) {
                let (k, v) = item.map_err(|e| self.err(e))?;
                out.push((k.to_vec(), v.to_vec()));
            }
        }
        Ok(out)
    }

    /// Every durable egress record: (seq, key, topic, value), in production order.
    pub fn load_egress(&self) -> Result<Vec<StoredEgress>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(b"e") {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let seq = key_seq(&k).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "egress key: expected 11 or 19 bytes, found {}",
                    k.len()
                ))
            })?;
            let (topic, value, placement) = decode_egress(&v)?;
            out.push((seq, k.to_vec(), topic, value, placement));
        }
        out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        Ok(out)
    }

    /// The pending message records of a key group, in key order (as queued): (seq, encoded
    /// `PendingMessage`).
    pub fn load_pending(&self, kg: u32) -> Result<Vec<(Seq, Vec<u8>)>, StoreError> {
        Ok(self
            .scan_seq(b'p', kg, "pending message")?
            .into_iter()
            .map(|(seq, raw)| (seq, raw.to_vec()))
            .collect())
    }

    /// The idempotency records of a key group: (scope, encoded record).
    pub fn load_idempotency(&self, kg: u32) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = idempotency_key(kg, "");
        let mut out = Vec::new();
        for item in self.db.scan_prefix(&prefix) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let scope = String::from_utf8_lossy(&k[3..]).to_string();
            out.push((scope, v.to_vec()));
        }
        Ok(out)
    }

    /// Flushes sled's buffers to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use statemesh_sdk::ValueSpec;

    /// The key layout stays `'s' ‖ kg:u16be ‖ len:u32be ‖ "type/id"` (then the state's name):
    /// stores written before keep their meaning.
    #[test]
    fn state_keys_keep_their_layout() {
        let addr = Address::parse("example/counter/ä 1").unwrap();
        let a = addr.to_string();
        let mut want = vec![b's'];
        want.extend_from_slice(&7u16.to_be_bytes());
        want.extend_from_slice(&(a.len() as u32).to_be_bytes());
        want.extend_from_slice(a.as_bytes());
        assert_eq!(state_prefix(7, &addr), want);
        let spec = ValueSpec::<i64>::new("a_rather_long_state_name");
        let slot = StateSlot::empty(spec.descriptor());
        let (key, value) = state_entry(7, &addr, &slot);
        want.extend_from_slice(b"a_rather_long_state_name");
        assert_eq!((key.len(), key.capacity()), (want.len(), want.len()));
        assert_eq!((key, value), (want, None));
    }

    #[test]
    fn state_and_timers_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 16).unwrap();
        let addr = Address::parse("example/counter/a").unwrap();
        let spec = ValueSpec::<i64>::new("total");
        let mut slot = StateSlot::empty(spec.descriptor());
        slot.value = Some(TypedValue::of(&7i64).value().clone());
        slot.expires_at_ms = 99;
        let timer = StoredTimer {
            due_ms: 5,
            sender: addr.clone(),
            token: Some("tok".into()),
            target: Address::parse("example/greeter/b").unwrap(),
            message: TypedValue::of(&"hi".to_string()),
        };
        let mut b = WriteBatch::default();
        b.put_state(3, &addr, &slot);
        let seq = Seq { epoch: 7, n: 42 };
        b.put_timer(3, seq, &timer);
        store.write(b).unwrap();
        let loaded = store
            .load_state(3, &addr, &[spec.descriptor().clone()])
            .unwrap();
        assert_eq!(loaded[0].value, slot.value);
        assert_eq!(loaded[0].expires_at_ms, 99);
        assert_eq!(store.load_timers(3).unwrap(), vec![(seq, timer)]);
        assert!(store.load_timers(4).unwrap().is_empty());
        let mut b = WriteBatch::default();
        b.delete_timer(3, seq);
        slot.value = None;
        b.put_state(3, &addr, &slot);
        store.write(b).unwrap();
        assert!(store.load_timers(3).unwrap().is_empty());
        assert!(store.scan_state(3, &addr).unwrap().is_empty());
        drop(store);
        // sled's flusher thread releases the file lock a moment after the last handle goes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let e = loop {
            let e = Store::open(dir.path(), 32).err().unwrap().to_string();
            if !e.contains("could not acquire lock") || std::time::Instant::now() > deadline {
                break e;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(e.contains("key_groups = 16"), "{e}");
    }

    #[test]
    fn an_egress_record_keeps_its_placement() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 16).unwrap();
        let value = TypedValue::of(&7i64);
        let placement = Placement {
            partition: 3,
            from: 1 << 40,
            settled_ms: 1_780_000_000_123,
        };
        let (a, b) = (
            egress_key(2, Seq { epoch: 4, n: 1 }),
            egress_key(2, Seq { epoch: 4, n: 2 }),
        );
        let mut w = WriteBatch::default();
        w.put_raw(a.clone(), Some(encode_egress("k", &value)));
        w.put_raw(
            b.clone(),
            Some(encode_placed_egress("k", &value, Some(&placement))),
        );
        store.write(w).unwrap();
        let loaded = store.load_egress().unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(
            (&loaded[0].1, &loaded[0].3, loaded[0].4),
            (&a, &value, None)
        );
        assert_eq!(
            (&loaded[1].1, &loaded[1].3, loaded[1].4),
            (&b, &value, Some(placement))
        );
        let mut w = WriteBatch::default();
        let mut bad = encode_placed_egress("k", &value, Some(&placement));
        bad.pop();
        w.put_raw(b, Some(bad));
        store.write(w).unwrap();
        let e = store.load_egress().unwrap_err().to_string();
        assert!(e.contains("20 unexpected bytes after the value"), "{e}");
    }

    #[test]
    fn records_keyed_before_epochs_numbered_them_read_as_epoch_zero() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 16).unwrap();
        let timer = StoredTimer {
            due_ms: 5,
            sender: Address::parse("example/counter/a").unwrap(),
            token: None,
            target: Address::parse("example/greeter/b").unwrap(),
            message: TypedValue::of(&"hi".to_string()),
        };
        let old = |tag: u8, n: u64| {
            let mut k = vec![tag, 0, 3];
            k.extend_from_slice(&n.to_be_bytes());
            k
        };
        let mut b = WriteBatch::default();
        b.put_raw(old(b't', 9), Some(timer.encode()));
        let value = TypedValue::of(&1i64);
        b.put_raw(old(b'e', 9), Some(encode_egress("t", &value)));
        let new = egress_key(3, Seq { epoch: 1, n: 1 });
        b.put_raw(new.clone(), Some(encode_egress("t", &value)));
        b.put_raw(vec![b't', 0, 3, 1], Some(timer.encode()));
        store.write(b).unwrap();
        let e = store.load_timers(3).unwrap_err().to_string();
        assert!(
            e.contains("timer key: expected 11 or 19 bytes, found 4"),
            "{e}"
        );
        let mut b = WriteBatch::default();
        b.put_raw(vec![b't', 0, 3, 1], None);
        store.write(b).unwrap();
        assert_eq!(
            store.load_timers(3).unwrap(),
            vec![(Seq { epoch: 0, n: 9 }, timer)]
        );
        // In production order: the old record first.
        let egress = store.load_egress().unwrap();
        let ids: Vec<_> = egress
            .iter()
            .map(|r| egress_record_id(&r.1).unwrap())
            .collect();
        assert_eq!(ids, ["3-0-9", "3-1-1"]);
        assert_eq!(egress[1].1, new);
    }
}

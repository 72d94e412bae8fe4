//! What an epoch writes (pure; no I/O).
//!
//! - One [`NodeEpoch`] object per node per epoch (protobuf via prost): a section per key group
//!   the node checkpoints in that epoch — a full snapshot or a delta — with the key group's
//!   pending messages and timers as of the epoch's cut.
//! - One [`Manifest`] per epoch (JSON), written last and create-only: the epoch's objects, which
//!   key groups each holds (and which in full), and the previous committed epoch, so a reader
//!   walks back from the newest manifest to each key group's last full snapshot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A key/value entry (state entries: the local store's key; timers: the sequence number).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// A message not yet processed at the epoch's cut (inbox, in-flight batch inputs, or late
/// messages of an earlier epoch logged into this one).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PendingMessage {
    /// Target address `ns/type/id`.
    #[prost(string, tag = "1")]
    pub target: String,
    /// Caller address, if any.
    #[prost(string, tag = "2")]
    pub caller: String,
    /// Message typename.
    #[prost(string, tag = "3")]
    pub typename: String,
    /// Message value.
    #[prost(bytes = "vec", tag = "4")]
    pub value: Vec<u8>,
    /// Whether the value is present.
    #[prost(bool, tag = "5")]
    pub has_value: bool,
    /// The ingress request's idempotency key (empty: none), for a message listed before its
    /// key was checked (in flight between nodes or shards, kept for a move, parked for an
    /// absent owner): whoever replays it checks the key then. A message queued at its address
    /// was checked when it was queued, its record in the same epoch, and has none here.
    #[prost(string, tag = "6")]
    pub idempotency_key: String,
}

/// One key group's part of an epoch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyGroupSection {
    /// The key group.
    #[prost(uint32, tag = "1")]
    pub key_group: u32,
    /// A full snapshot (replaces everything before) rather than a delta.
    #[prost(bool, tag = "2")]
    pub full: bool,
    /// State entries written (full: all of them).
    #[prost(message, repeated, tag = "3")]
    pub puts: Vec<Entry>,
    /// State keys deleted (deltas only).
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub deletes: Vec<Vec<u8>>,
    /// Pending messages at the cut (always complete for the key group).
    #[prost(message, repeated, tag = "5")]
    pub pending: Vec<PendingMessage>,
    /// Unused: timers are local-store entries (`'t' ‖ kg ‖ seq`) in `puts`/`deletes`.
    #[prost(message, repeated, tag = "6")]
    pub timers: Vec<Entry>,
    /// Unused: idempotency records are local-store entries (`'i' ‖ kg ‖ scope`) in
    /// `puts`/`deletes`.
    #[prost(message, repeated, tag = "7")]
    pub idempotency: Vec<Entry>,
    /// The writer's ownership version of the key group (the control group's table), on a
    /// section with an owner's changes (states, delayed messages, idempotency records); 0:
    /// none (only pending messages, egress deletions or full snapshots), or not known (a node
    /// alone). The cluster's leader refuses a part whose versions are not the owners'.
    #[prost(uint64, tag = "8")]
    pub version: u64,
}

/// Everything one node writes for one epoch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeEpoch {
    /// The epoch.
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    /// The writing node.
    #[prost(string, tag = "2")]
    pub node: String,
    /// Its key groups' sections.
    #[prost(message, repeated, tag = "3")]
    pub key_groups: Vec<KeyGroupSection>,
}

/// A [`KeyGroupSection`] read without its pending messages (tag 5, like the unused 6 and 7,
/// is skipped unread): what an upload merges of every epoch but the newest.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyGroupChanges {
    /// [`KeyGroupSection::key_group`].
    #[prost(uint32, tag = "1")]
    pub key_group: u32,
    /// [`KeyGroupSection::full`].
    #[prost(bool, tag = "2")]
    pub full: bool,
    /// [`KeyGroupSection::puts`].
    #[prost(message, repeated, tag = "3")]
    pub puts: Vec<Entry>,
    /// [`KeyGroupSection::deletes`].
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub deletes: Vec<Vec<u8>>,
    /// [`KeyGroupSection::version`].
    #[prost(uint64, tag = "8")]
    pub version: u64,
}

/// A [`NodeEpoch`] read as [`KeyGroupChanges`] (its pending messages skipped).
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeEpochChanges {
    /// [`NodeEpoch::epoch`].
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    /// [`NodeEpoch::node`].
    #[prost(string, tag = "2")]
    pub node: String,
    /// [`NodeEpoch::key_groups`], without pending messages.
    #[prost(message, repeated, tag = "3")]
    pub key_groups: Vec<KeyGroupChanges>,
}

impl From<NodeEpochChanges> for NodeEpoch {
    fn from(e: NodeEpochChanges) -> Self {
        NodeEpoch {
            epoch: e.epoch,
            node: e.node,
            key_groups: e
                .key_groups
                .into_iter()
                .map(|s| KeyGroupSection {
                    key_group: s.key_group,
                    full: s.full,
                    puts: s.puts,
                    deletes: s.deletes,
                    version: s.version,
                    ..Default::default()
                })
                .collect(),
        }
    }
}

/// One node object of an epoch, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// The writing node.
    pub node: String,
    /// The object's path below the store's prefix.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// Key groups with a section in it.
    pub key_groups: Vec<u32>,
    /// Of those, the ones written in full.
    pub full_key_groups: Vec<u32>,
    /// A small object is kept in the manifest itself (base64 of the `NodeEpoch`), saving a
    /// put per epoch; then nothing is stored at `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
    /// An object merged from several epochs' parts (the cluster's epoch log, uploaded): the
    /// paths of those parts that removed egress records. A participant asks whether an epoch
    /// in which it read egress records committed by looking for its part's path (see the
    /// driver's `lists`); after a merge the path is here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<String>,
}

/// A committed epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The epoch.
    pub epoch: u64,
    /// The previous committed epoch (`None` for the first).
    pub previous: Option<u64>,
    /// When the manifest was written, ms since the Unix epoch.
    pub created_ms: u64,
    /// The epoch's node objects.
    pub objects: Vec<ObjectRef>,
    /// Who wrote it: the node id and a nonce of the writing process (`node/nonce`). After an
    /// ambiguous put (the server stored it, the client saw an error) the writer reads the
    /// manifest back and recognises its own by this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

impl NodeEpoch {
    /// The manifest entry of this object stored at `path` with `size` bytes.
    pub fn object_ref(&self, path: String, size: u64) -> ObjectRef {
        ObjectRef {
            node: self.node.clone(),
            path,
            size,
            key_groups: self.key_groups.iter().map(|k| k.key_group).collect(),
            full_key_groups: self
                .key_groups
                .iter()
                .filter(|k| k.full)
                .map(|k| k.key_group)
                .collect(),
            inline: None,
            merged: Vec::new(),
        }
    }
}

/// A key group's state, pending messages and timers, rebuilt from a chain of sections (oldest
/// first: a full snapshot, then deltas).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct KeyGroupState {
    /// State entries.
    pub state: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Keys deleted by the deltas applied (and not written again since): a store being
    /// caught up with deltas must delete them too.
    pub deleted: std::collections::BTreeSet<Vec<u8>>,
    /// Pending messages at the newest cut.
    pub pending: Vec<PendingMessage>,
    /// Timers at the newest cut.
    pub timers: Vec<Entry>,
    /// Idempotency records at the newest cut.
    pub idempotency: Vec<Entry>,
}

impl KeyGroupState {
    /// Applies the next section of the chain.
    pub fn apply(&mut self, s: KeyGroupSection) {
        if s.full {
            self.state.clear();
            self.deleted.clear();
        }
        for k in s.deletes {
            self.state.remove(&k);
            self.deleted.insert(k);
        }
        for e in s.puts {
            self.deleted.remove(&e.key);
            self.state.insert(e.key, e.value);
        }
        self.pending = s.pending;
        self.timers = s.timers;
        self.idempotency = s.idempotency;
    }
}

/// The object path of a node's epoch object.
pub fn epoch_object_path(epoch: u64, node: &str, nonce: u64) -> String {
    format!("epochs/{epoch:020}/{node}-{nonce:016x}.bin")
}

/// The path of an epoch's manifest.
pub fn manifest_path(epoch: u64) -> String {
    format!("manifests/{epoch:020}.json")
}

/// The epoch of a manifest or epoch-object path, if it is one.
pub fn epoch_of(path: &str) -> Option<u64> {
    let rest = path
        .strip_prefix("manifests/")
        .or_else(|| path.strip_prefix("epochs/"))?;
    rest.get(..20)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_application() {
        let e = |k: &str, v: &str| Entry {
            key: k.into(),
            value: v.into(),
        };
        let mut s = KeyGroupState::default();
        s.apply(KeyGroupSection {
            key_group: 1,
            full: true,
            puts: vec![e("a", "1"), e("b", "2")],
            ..Default::default()
        });
        s.apply(KeyGroupSection {
            key_group: 1,
            full: false,
            puts: vec![e("a", "3")],
            deletes: vec![b"b".to_vec()],
            ..Default::default()
        });
        assert_eq!(s.state.len(), 1);
        assert_eq!(s.state[b"a".as_slice()], b"3");
        s.apply(KeyGroupSection {
            key_group: 1,
            full: true,
            puts: vec![e("c", "4")],
            ..Default::default()
        });
        assert_eq!(s.state.keys().collect::<Vec<_>>(), vec![&b"c".to_vec()]);
    }

    #[test]
    fn paths() {
        assert_eq!(epoch_of(&manifest_path(42)), Some(42));
        assert_eq!(epoch_of(&epoch_object_path(7, "n1", 9)), Some(7));
        assert_eq!(epoch_of("other/x"), None);
        assert!(
            manifest_path(2) < manifest_path(10),
            "lexicographic order is epoch order"
        );
    }
}

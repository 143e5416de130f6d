//! The durable outbox: store-and-forward for everything the agent sends.
//!
//! Every message is appended to a log file and synced to disk **before** [`Outbox::push`]
//! returns; it leaves the outbox only through [`Outbox::ack`] (after the server's PUBACK) or
//! the documented full-outbox policy. After a crash or restart, [`Outbox::open`] replays the
//! log and [`Outbox::pending`] yields the unacknowledged messages in the order they were
//! pushed, each once.
//!
//! The outbox does its I/O through a [`Storage`]: the plain file system in production, and in
//! tests [`SimStorage`](crate::storage::sim::SimStorage), which simulates power loss by
//! throwing away what was not synced. The randomized crash test in
//! `tests/outbox_power_loss.rs` runs pushes, acknowledgements, compactions, injected I/O
//! failures and crashes at every step over it, and fails if any sync below is removed.
//!
//! # On disk
//!
//! One append-only file, `outbox.log`, of records
//! `[magic: u32][len: u32][body crc32: u32][header crc32: u32][body]` (little endian). The
//! header CRC covers the record's file offset and the first 12 bytes, so a record is only
//! recognized where it was written. A body is a push (sequence number, message id, priority,
//! topic, payload), an ack or a drop (a sequence number), or an acked id remembered across a
//! compaction.
//!
//! Recovery keeps every intact record. A damaged region (a bad sector, a flipped bit) is
//! skipped, logged, and counted in [`OutboxStats::damaged_regions`]; scanning resumes at the
//! next record header, so nothing after the damage is lost. Only damage that runs to the end
//! of the file, a torn tail as a crash mid-write leaves, is cut off
//! ([`OutboxStats::torn_tail_bytes`]).
//!
//! Acks are appended without a sync: a crash can forget an ack, so the message is sent again
//! after restart. That is at-least-once delivery; the server stores each message id once.
//! The ids of the last [`ACKED_MEMORY`] acknowledged messages are remembered (across restarts
//! and compactions), so pushing one of them again stores nothing.
//!
//! When more than half of the file is dead records, it is compacted: the live records are
//! written to a new file, synced, renamed over the old one, and the directory is synced.
//!
//! # When an I/O operation fails
//!
//! A failed write or sync may leave bytes of unknown durability in the file (Linux may even
//! drop unsynced pages after a failed `fsync`). The call returns the error and the outbox
//! stops trusting its in-memory state: the next call first recovers by replaying the file and
//! rewriting it whole (a compaction, synced), then proceeds. A push that returned an error may
//! or may not be kept; pushing the same message again never stores it twice.
//!
//! # When it is full
//!
//! Limits are a byte total and a message count ([`Limits`]). To make room for a new message
//! the outbox drops, oldest first: [`Priority::Routine`] messages (periodic snapshots and
//! collections), then, only for an incoming event or order result, [`Priority::Event`]
//! messages. [`Priority::Critical`] messages (order results) are never dropped: when only
//! they (or, for routine input, only higher-priority messages) fill it, `push` fails with
//! [`OutboxError::Full`] and the caller keeps the message. Every drop is counted in
//! [`OutboxStats`] and logged.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::storage::{OsStorage, Storage, StorageFile};
use crate::{MessageId, OutboundMessage, Priority};

const FILE: &str = "outbox.log";
const TMP: &str = "outbox.log.compact";
const MAGIC: [u8; 4] = *b"EOB1";
const HEADER: usize = 16;
const REC_PUSH: u8 = 1;
const REC_ACK: u8 = 2;
const REC_DROP: u8 = 3;
const REC_ACKED_ID: u8 = 4;
/// Largest record body accepted (a payload plus its topic and fields).
const MAX_RECORD: usize = 16 * 1024 * 1024;
/// Longest topic (MQTT's limit; the record stores its length in 16 bits).
pub const MAX_TOPIC: usize = u16::MAX as usize;
/// How many acknowledged message ids are remembered, so that pushing one again stores
/// nothing.
pub const ACKED_MEMORY: usize = 4096;
/// Size of a remembered-acked-id record on disk.
const ACKED_RECORD: u64 = (HEADER + 1 + 8 + 16) as u64;

/// Size limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most payload + topic bytes held.
    pub max_bytes: u64,
    /// Most messages held.
    pub max_messages: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 256 * 1024 * 1024,
            max_messages: 1_000_000,
        }
    }
}

/// Outbox errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// Reading or writing the log failed. After a failed write or sync, the next call
    /// recovers from the file first (see the module docs).
    #[error("outbox i/o error: {0}")]
    Io(#[from] io::Error),
    /// No room, and nothing the policy may drop (see the module docs).
    #[error("outbox full: {held_messages} messages, {held_bytes} bytes held")]
    Full {
        /// Messages held.
        held_messages: usize,
        /// Bytes held.
        held_bytes: u64,
    },
    /// The message alone is larger than the byte limit or the record limit.
    #[error("message of {0} bytes can never fit")]
    TooLarge(u64),
    /// The message cannot be stored as it is (e.g. a topic longer than [`MAX_TOPIC`]).
    #[error("message refused: {0}")]
    BadMessage(String),
}

/// A message held in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// Its position in push order.
    pub seq: u64,
    /// The message.
    pub message: OutboundMessage,
}

/// What the outbox holds, what it had to drop, and what recovery found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Messages held.
    pub messages: usize,
    /// Topic + payload bytes held.
    pub bytes: u64,
    /// Messages held per priority: routine, event, critical.
    pub per_priority: [usize; 3],
    /// Messages dropped by the full-outbox policy, per priority (since open).
    pub dropped: [u64; 3],
    /// Time the oldest held message was pushed (this process's clock; after a restart, the
    /// time of the restart for replayed messages).
    pub oldest_pushed_at: Option<SystemTime>,
    /// Size of the log file.
    pub file_bytes: u64,
    /// Damaged regions skipped by the last recovery (records after them were kept).
    pub damaged_regions: u64,
    /// Bytes in those regions.
    pub damaged_bytes: u64,
    /// Records with valid checksums that could not be read (e.g. from a newer version),
    /// skipped by the last recovery.
    pub unreadable_records: u64,
    /// Bytes of a torn tail cut off by the last recovery.
    pub torn_tail_bytes: u64,
    /// Recoveries after a failed write or sync (since open).
    pub io_recoveries: u64,
}

struct Entry {
    message: OutboundMessage,
    pushed_at: SystemTime,
}

impl Entry {
    fn size(&self) -> u64 {
        (self.message.topic.len() + self.message.payload.len()) as u64
    }
}

/// The durable outbox. See the [module docs](self).
pub struct Outbox {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    file: Box<dyn StorageFile>,
    limits: Limits,
    entries: BTreeMap<u64, Entry>,
    by_id: HashMap<MessageId, u64>,
    acked: VecDeque<(MessageId, u64)>,
    acked_ids: HashMap<MessageId, u64>,
    next_seq: u64,
    bytes: u64,
    per_priority: [usize; 3],
    dropped: [u64; 3],
    file_len: u64,
    live_record_bytes: u64,
    recovery: Recovery,
    io_recoveries: u64,
    /// A write or sync failed: the file's state is unknown until recovered.
    poisoned: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Recovery {
    damaged_regions: u64,
    damaged_bytes: u64,
    unreadable_records: u64,
    torn_tail_bytes: u64,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("dir", &self.dir)
            .field("messages", &self.entries.len())
            .finish()
    }
}

fn prio_index(p: Priority) -> usize {
    match p {
        Priority::Routine => 0,
        Priority::Event => 1,
        Priority::Critical => 2,
    }
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir` on the file system, replaying its log.
    pub fn open(dir: impl AsRef<Path>, limits: Limits) -> Result<Outbox, OutboxError> {
        Outbox::open_in(Arc::new(OsStorage), dir, limits)
    }

    /// Opens (or creates) the outbox in `dir` of `storage`, replaying its log.
    pub fn open_in(
        storage: Arc<dyn Storage>,
        dir: impl AsRef<Path>,
        limits: Limits,
    ) -> Result<Outbox, OutboxError> {
        let dir = dir.as_ref().to_path_buf();
        storage.create_dir_all(&dir)?;
        // A compaction interrupted before its rename leaves a temporary file: discard it.
        storage.remove_file(&dir.join(TMP))?;
        let path = dir.join(FILE);
        let raw = storage.read(&path)?.unwrap_or_default();
        let (mut file, created) = storage.open_append(&path)?;
        if created {
            // The new file's name, and the names of the directories above it (which
            // `create_dir_all` may just have made), must be durable before anything synced
            // into the file counts.
            for d in dir.ancestors() {
                storage.sync_dir(if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                })?;
            }
        }
        let mut outbox = Outbox {
            storage,
            dir,
            file: Box::new(ClosedFile),
            limits,
            entries: BTreeMap::new(),
            by_id: HashMap::new(),
            acked: VecDeque::new(),
            acked_ids: HashMap::new(),
            next_seq: 0,
            bytes: 0,
            per_priority: [0; 3],
            dropped: [0; 3],
            file_len: 0,
            live_record_bytes: 0,
            recovery: Recovery::default(),
            io_recoveries: 0,
            poisoned: false,
        };
        let good = outbox.replay(&raw);
        if good < raw.len() {
            // The torn tail is cut before anything is appended after it. The cut need not be
            // synced: until the next push's sync makes it durable, a crash brings back the
            // same torn tail, which the next open cuts again.
            file.truncate(good as u64)?;
        }
        outbox.file = file;
        outbox.file_len = good as u64;
        Ok(outbox)
    }

    /// Replays the records of `raw`; returns the length to keep (all but a torn tail).
    fn replay(&mut self, raw: &[u8]) -> usize {
        let mut pos = 0;
        let mut damage: Option<usize> = None;
        let now = SystemTime::now();
        while pos < raw.len() {
            let Some((body, total)) = read_record(raw, pos) else {
                damage.get_or_insert(pos);
                pos = next_header(raw, pos + 1);
                continue;
            };
            if let Some(start) = damage.take() {
                self.recovery.damaged_regions += 1;
                self.recovery.damaged_bytes += (pos - start) as u64;
                tracing::error!(
                    offset = start,
                    bytes = pos - start,
                    "outbox log: damaged region skipped; the records after it are kept"
                );
            }
            match decode_body(body) {
                Some(Record::Push(seq, message)) => {
                    if self.entries.contains_key(&seq) || self.by_id.contains_key(&message.id) {
                        self.recovery.unreadable_records += 1;
                        tracing::error!(seq, "outbox log: repeated push record skipped");
                    } else {
                        self.next_seq = self.next_seq.max(seq + 1);
                        self.live_record_bytes += total as u64;
                        self.insert(seq, message, now);
                    }
                }
                Some(Record::Ack(seq)) => {
                    if let Some(entry) = self.remove(seq) {
                        self.remember_acked(entry.message.id, seq);
                    }
                }
                Some(Record::Drop(seq)) => {
                    self.remove(seq);
                }
                Some(Record::AckedId(seq, id)) => {
                    self.next_seq = self.next_seq.max(seq + 1);
                    self.remember_acked(id, seq);
                }
                None => {
                    self.recovery.unreadable_records += 1;
                    tracing::error!(offset = pos, "outbox log: unreadable record skipped");
                }
            }
            pos += total;
        }
        match damage {
            Some(start) => {
                self.recovery.torn_tail_bytes = (raw.len() - start) as u64;
                tracing::warn!(
                    kept = start,
                    discarded = raw.len() - start,
                    "outbox log had a torn or corrupt tail; cut it off"
                );
                start
            }
            None => raw.len(),
        }
    }

    fn insert(&mut self, seq: u64, message: OutboundMessage, pushed_at: SystemTime) {
        let entry = Entry { message, pushed_at };
        self.bytes += entry.size();
        self.per_priority[prio_index(entry.message.priority)] += 1;
        self.by_id.insert(entry.message.id, seq);
        self.entries.insert(seq, entry);
    }

    fn remove(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.entries.remove(&seq)?;
        self.bytes -= entry.size();
        self.per_priority[prio_index(entry.message.priority)] -= 1;
        self.by_id.remove(&entry.message.id);
        self.live_record_bytes = self
            .live_record_bytes
            .saturating_sub(push_record_len(&entry.message) as u64);
        Some(entry)
    }

    fn remember_acked(&mut self, id: MessageId, seq: u64) {
        if self.acked_ids.insert(id, seq).is_none() {
            self.acked.push_back((id, seq));
        }
        while self.acked.len() > ACKED_MEMORY {
            if let Some((old, _)) = self.acked.pop_front() {
                self.acked_ids.remove(&old);
            }
        }
    }

    /// After a failed write or sync: rebuild the state from the file and rewrite it whole.
    fn heal(&mut self) -> Result<(), OutboxError> {
        if !self.poisoned {
            return Ok(());
        }
        let mut fresh = Outbox::open_in(self.storage.clone(), &self.dir, self.limits)?;
        fresh.compact_now()?;
        fresh.dropped = self.dropped;
        fresh.io_recoveries = self.io_recoveries + 1;
        tracing::warn!(
            messages = fresh.entries.len(),
            "outbox recovered from its log after an i/o failure"
        );
        *self = fresh;
        Ok(())
    }

    fn write(&mut self, record: &[u8]) -> Result<(), OutboxError> {
        match self.file.append(record) {
            Ok(()) => {
                self.file_len += record.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.poisoned = true;
                tracing::error!(error = %e, "outbox write failed");
                Err(e.into())
            }
        }
    }

    /// Stores a message durably. Returns its sequence number. Pushing a message whose id is
    /// already held, or was acknowledged recently (see [`ACKED_MEMORY`]), returns that
    /// message's sequence number and stores nothing.
    pub fn push(&mut self, message: OutboundMessage) -> Result<u64, OutboxError> {
        self.heal()?;
        if let Some(&seq) = self.by_id.get(&message.id) {
            return Ok(seq);
        }
        if let Some(&seq) = self.acked_ids.get(&message.id) {
            return Ok(seq);
        }
        if message.topic.len() > MAX_TOPIC {
            return Err(OutboxError::BadMessage(format!(
                "topic of {} bytes (at most {MAX_TOPIC})",
                message.topic.len()
            )));
        }
        let size = (message.topic.len() + message.payload.len()) as u64;
        if size > self.limits.max_bytes || push_record_len(&message) > MAX_RECORD {
            return Err(OutboxError::TooLarge(size));
        }
        self.make_room(size, message.priority)?;
        let seq = self.next_seq;
        let record = encode_record(self.file_len, &encode_push(seq, &message));
        self.write(&record)?;
        if let Err(e) = self.file.sync() {
            self.poisoned = true;
            tracing::error!(error = %e, "outbox sync failed");
            return Err(e.into());
        }
        self.next_seq += 1;
        self.live_record_bytes += record.len() as u64;
        self.insert(seq, message, SystemTime::now());
        Ok(seq)
    }

    fn make_room(&mut self, size: u64, incoming: Priority) -> Result<(), OutboxError> {
        let fits = |o: &Outbox| {
            o.bytes + size <= o.limits.max_bytes && o.entries.len() < o.limits.max_messages
        };
        if fits(self) {
            return Ok(());
        }
        let mut victims = Vec::new();
        let mut freed_bytes = 0;
        let mut freed_count = 0;
        let droppable: &[Priority] = match incoming {
            Priority::Routine => &[Priority::Routine],
            Priority::Event | Priority::Critical => &[Priority::Routine, Priority::Event],
        };
        'classes: for &class in droppable {
            for (&seq, e) in &self.entries {
                if e.message.priority != class {
                    continue;
                }
                victims.push(seq);
                freed_bytes += e.size();
                freed_count += 1;
                if self.bytes - freed_bytes + size <= self.limits.max_bytes
                    && self.entries.len() - freed_count < self.limits.max_messages
                {
                    break 'classes;
                }
            }
        }
        if self.bytes - freed_bytes + size > self.limits.max_bytes
            || self.entries.len() - freed_count >= self.limits.max_messages
        {
            return Err(OutboxError::Full {
                held_messages: self.entries.len(),
                held_bytes: self.bytes,
            });
        }
        for seq in victims {
            self.write(&encode_record(self.file_len, &encode_seq(REC_DROP, seq)))?;
            if let Some(e) = self.remove(seq) {
                self.dropped[prio_index(e.message.priority)] += 1;
                tracing::warn!(seq, priority = ?e.message.priority, topic = %e.message.topic, "outbox full: dropped");
            }
        }
        Ok(())
    }

    /// Removes a message after its PUBACK. Returns whether it was held.
    pub fn ack(&mut self, seq: u64) -> Result<bool, OutboxError> {
        self.heal()?;
        if !self.entries.contains_key(&seq) {
            return Ok(false);
        }
        self.write(&encode_record(self.file_len, &encode_seq(REC_ACK, seq)))?;
        if let Some(entry) = self.remove(seq) {
            self.remember_acked(entry.message.id, seq);
        }
        self.maybe_compact()?;
        Ok(true)
    }

    /// Removes a message by id after its PUBACK. Returns whether it was held.
    pub fn ack_id(&mut self, id: &MessageId) -> Result<bool, OutboxError> {
        self.heal()?;
        match self.by_id.get(id).copied() {
            Some(seq) => self.ack(seq),
            None => Ok(false),
        }
    }

    /// Makes every record written so far durable (acknowledgements are appended without a
    /// sync; a caller that must not forget one, such as an order journal marking an order
    /// done, syncs after it).
    pub fn sync(&mut self) -> Result<(), OutboxError> {
        self.heal()?;
        if let Err(e) = self.file.sync() {
            self.poisoned = true;
            tracing::error!(error = %e, "outbox sync failed");
            return Err(e.into());
        }
        Ok(())
    }

    /// Whether a message with this id was acknowledged recently (see [`ACKED_MEMORY`]), so
    /// that pushing it again stores nothing.
    pub fn recently_acked(&self, id: &MessageId) -> bool {
        self.acked_ids.contains_key(id)
    }

    /// The held messages in push order.
    pub fn pending(&self) -> impl Iterator<Item = Held> + '_ {
        self.entries.iter().map(|(&seq, e)| Held {
            seq,
            message: e.message.clone(),
        })
    }

    /// At most `n` held messages with a sequence number ≥ `from`, in push order.
    pub fn batch(&self, from: u64, n: usize) -> Vec<Held> {
        self.entries
            .range(from..)
            .take(n)
            .map(|(&seq, e)| Held {
                seq,
                message: e.message.clone(),
            })
            .collect()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What the outbox holds.
    pub fn stats(&self) -> OutboxStats {
        OutboxStats {
            messages: self.entries.len(),
            bytes: self.bytes,
            per_priority: self.per_priority,
            dropped: self.dropped,
            oldest_pushed_at: self.entries.values().map(|e| e.pushed_at).min(),
            file_bytes: self.file_len,
            damaged_regions: self.recovery.damaged_regions,
            damaged_bytes: self.recovery.damaged_bytes,
            unreadable_records: self.recovery.unreadable_records,
            torn_tail_bytes: self.recovery.torn_tail_bytes,
            io_recoveries: self.io_recoveries,
        }
    }

    fn maybe_compact(&mut self) -> Result<(), OutboxError> {
        let live = self.live_record_bytes + self.acked.len() as u64 * ACKED_RECORD;
        if self.file_len < 1024 * 1024 || live * 2 > self.file_len {
            return Ok(());
        }
        self.compact_now()
    }

    /// Rewrites the log with only the held messages (and the remembered acked ids).
    pub fn compact(&mut self) -> Result<(), OutboxError> {
        self.heal()?;
        self.compact_now()
    }

    fn compact_now(&mut self) -> Result<(), OutboxError> {
        let tmp = self.dir.join(TMP);
        let path = self.dir.join(FILE);
        let mut out = self.storage.create(&tmp)?;
        let mut len = 0u64;
        let mut live = 0u64;
        let mut buf = Vec::new();
        let bodies = self
            .acked
            .iter()
            .map(|(id, seq)| (false, encode_acked(*seq, id)))
            .chain(
                self.entries
                    .iter()
                    .map(|(&seq, e)| (true, encode_push(seq, &e.message))),
            );
        for (is_push, body) in bodies {
            let record = encode_record(len, &body);
            len += record.len() as u64;
            if is_push {
                live += record.len() as u64;
            }
            buf.extend_from_slice(&record);
            if buf.len() >= 1024 * 1024 {
                out.append(&buf)?;
                buf.clear();
            }
        }
        out.append(&buf)?;
        out.sync()?;
        drop(out);
        self.storage.rename(&tmp, &path)?;
        // From here the name points to the new file; the old handle writes into an unlinked
        // one, so a failure to switch leaves the outbox to recover from the file.
        match self.storage.open_append(&path) {
            Ok((file, _)) => self.file = file,
            Err(e) => {
                self.poisoned = true;
                return Err(e.into());
            }
        }
        self.file_len = len;
        self.live_record_bytes = live;
        if let Err(e) = self.storage.sync_dir(&self.dir) {
            // Until the rename is durable, a crash brings back the old file, without what
            // is synced into the new one from now on.
            self.poisoned = true;
            return Err(e.into());
        }
        Ok(())
    }
}

/// The stand-in handle while an outbox is being opened.
#[derive(Debug)]
struct ClosedFile;

impl StorageFile for ClosedFile {
    fn append(&mut self, _: &[u8]) -> io::Result<()> {
        Err(io::Error::other("outbox file not open"))
    }
    fn truncate(&mut self, _: u64) -> io::Result<()> {
        Err(io::Error::other("outbox file not open"))
    }
    fn sync(&mut self) -> io::Result<()> {
        Err(io::Error::other("outbox file not open"))
    }
}

enum Record {
    Push(u64, OutboundMessage),
    Ack(u64),
    Drop(u64),
    AckedId(u64, MessageId),
}

fn push_record_len(m: &OutboundMessage) -> usize {
    HEADER + 1 + 8 + 16 + 1 + 2 + m.topic.len() + 4 + m.payload.len()
}

/// Frames a body as a record written at file offset `offset`.
fn encode_record(offset: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(HEADER + body.len());
    r.extend_from_slice(&MAGIC);
    r.extend_from_slice(&(body.len() as u32).to_le_bytes());
    r.extend_from_slice(&crc32(body).to_le_bytes());
    let hcrc = header_crc(offset, &r[..12]);
    r.extend_from_slice(&hcrc.to_le_bytes());
    r.extend_from_slice(body);
    r
}

fn header_crc(offset: u64, first12: &[u8]) -> u32 {
    let mut h = [0u8; 20];
    h[..8].copy_from_slice(&offset.to_le_bytes());
    h[8..].copy_from_slice(first12);
    crc32(&h)
}

fn encode_push(seq: u64, m: &OutboundMessage) -> Vec<u8> {
    let mut b = Vec::with_capacity(push_record_len(m));
    b.push(REC_PUSH);
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(m.id.as_bytes());
    b.push(prio_index(m.priority) as u8);
    // `push` refuses longer topics, so this cannot truncate.
    b.extend_from_slice(&(m.topic.len() as u16).to_le_bytes());
    b.extend_from_slice(m.topic.as_bytes());
    b.extend_from_slice(&(m.payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&m.payload);
    b
}

fn encode_seq(kind: u8, seq: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(9);
    b.push(kind);
    b.extend_from_slice(&seq.to_le_bytes());
    b
}

fn encode_acked(seq: u64, id: &MessageId) -> Vec<u8> {
    let mut b = encode_seq(REC_ACKED_ID, seq);
    b.extend_from_slice(id.as_bytes());
    b
}

/// The record whose header starts at `pos`: `(body, total length)`, or `None` if there is
/// none there (torn, damaged, or not a record boundary).
fn read_record(raw: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let h = raw.get(pos..pos + HEADER)?;
    if h[..4] != MAGIC {
        return None;
    }
    let hcrc = u32::from_le_bytes(h[12..16].try_into().ok()?);
    if header_crc(pos as u64, &h[..12]) != hcrc {
        return None;
    }
    let len = u32::from_le_bytes(h[4..8].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(h[8..12].try_into().ok()?);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let body = raw.get(pos + HEADER..pos + HEADER + len)?;
    (crc32(body) == crc).then_some((body, HEADER + len))
}

/// The next position at or after `from` where a record header could start.
fn next_header(raw: &[u8], from: usize) -> usize {
    raw.get(from..)
        .and_then(|rest| rest.windows(MAGIC.len()).position(|w| w == MAGIC))
        .map_or(raw.len(), |i| from + i)
}

/// The record boundaries a recovery of `raw` would find: `(offset, total length)` of every
/// record with a valid header and body checksum, in file order. For tests and fuzzing.
#[doc(hidden)]
pub fn scan_records(raw: &[u8]) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        match read_record(raw, pos) {
            Some((_, total)) => {
                found.push((pos, total));
                pos += total;
            }
            None => pos = next_header(raw, pos + 1),
        }
    }
    found
}

fn decode_body(body: &[u8]) -> Option<Record> {
    let (&kind, rest) = body.split_first()?;
    let seq = u64::from_le_bytes(rest.get(0..8)?.try_into().ok()?);
    match kind {
        REC_ACK if rest.len() == 8 => Some(Record::Ack(seq)),
        REC_DROP if rest.len() == 8 => Some(Record::Drop(seq)),
        REC_ACKED_ID if rest.len() == 24 => Some(Record::AckedId(
            seq,
            MessageId::from_bytes(rest[8..24].try_into().ok()?),
        )),
        REC_PUSH => {
            let rest = rest.get(8..)?;
            let id: [u8; 16] = rest.get(0..16)?.try_into().ok()?;
            let priority = match rest.get(16)? {
                0 => Priority::Routine,
                1 => Priority::Event,
                2 => Priority::Critical,
                _ => return None,
            };
            let tlen = u16::from_le_bytes(rest.get(17..19)?.try_into().ok()?) as usize;
            let topic = std::str::from_utf8(rest.get(19..19 + tlen)?)
                .ok()?
                .to_owned();
            let p = 19 + tlen;
            let plen = u32::from_le_bytes(rest.get(p..p + 4)?.try_into().ok()?) as usize;
            let payload = rest.get(p + 4..p + 4 + plen)?;
            if p + 4 + plen != rest.len() {
                return None;
            }
            Some(Record::Push(
                seq,
                OutboundMessage {
                    id: MessageId::from_bytes(id),
                    topic,
                    payload: payload.to_vec().into(),
                    priority,
                },
            ))
        }
        _ => None,
    }
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320).
pub(crate) fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_answer() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }
}

//! The durable outbox: store-and-forward for everything the agent sends.
//!
//! Every message is appended to a log file and synced to disk **before** [`Outbox::push`]
//! returns; it leaves the outbox only through [`Outbox::ack`] (after the server's PUBACK) or
//! the documented full-outbox policy. After a crash or restart, [`Outbox::open`] replays the
//! log and [`Outbox::pending`] yields the unacknowledged messages in the order they were
//! pushed.
//!
//! # On disk
//!
//! One append-only file, `outbox.log`, of records `[len: u32 LE][crc32: u32 LE][body]`. A body
//! is a push (sequence number, message id, priority, topic, payload), an ack or a drop (a
//! sequence number). A torn or corrupt tail, as a crash mid-write leaves, fails its length or
//! CRC check: it is cut off on open and everything before it is kept. When more than half of
//! the file is dead records, it is compacted: the live pushes are written to a new file,
//! synced, and renamed over the old one (then the directory is synced).
//!
//! Acks are appended without a sync: a crash can forget an ack, so the message is sent again
//! after restart. That is at-least-once delivery; the server stores each message id once.
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

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::{MessageId, OutboundMessage, Priority};

const FILE: &str = "outbox.log";
const TMP: &str = "outbox.log.compact";
const REC_PUSH: u8 = 1;
const REC_ACK: u8 = 2;
const REC_DROP: u8 = 3;
/// Largest record accepted when reading (a payload plus its topic and header).
const MAX_RECORD: usize = 16 * 1024 * 1024;

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
    /// Reading or writing the log failed.
    #[error("outbox i/o error: {0}")]
    Io(#[from] std::io::Error),
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
}

/// A message held in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// Its position in push order.
    pub seq: u64,
    /// The message.
    pub message: OutboundMessage,
}

/// What the outbox holds and what it had to drop.
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
    dir: PathBuf,
    file: BufWriter<File>,
    limits: Limits,
    entries: BTreeMap<u64, Entry>,
    by_id: HashMap<MessageId, u64>,
    next_seq: u64,
    bytes: u64,
    per_priority: [usize; 3],
    dropped: [u64; 3],
    file_len: u64,
    live_record_bytes: u64,
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
    /// Opens (or creates) the outbox in `dir`, replaying its log.
    pub fn open(dir: impl AsRef<Path>, limits: Limits) -> Result<Outbox, OutboxError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)?;
        // A compaction interrupted before its rename leaves a temporary file: discard it.
        let _ = std::fs::remove_file(dir.join(TMP));
        let path = dir.join(FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut raw = Vec::new();
        file.read_to_end(&mut raw)?;
        let mut outbox = Outbox {
            dir,
            file: BufWriter::new(file.try_clone()?),
            limits,
            entries: BTreeMap::new(),
            by_id: HashMap::new(),
            next_seq: 0,
            bytes: 0,
            per_priority: [0; 3],
            dropped: [0; 3],
            file_len: 0,
            live_record_bytes: 0,
        };
        let good = outbox.replay(&raw);
        if good < raw.len() {
            tracing::warn!(
                kept = good,
                discarded = raw.len() - good,
                "outbox log had a torn or corrupt tail; cut it off"
            );
            file.set_len(good as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        outbox.file_len = good as u64;
        Ok(outbox)
    }

    /// Replays records; returns the length of the valid prefix.
    fn replay(&mut self, raw: &[u8]) -> usize {
        let mut pos = 0;
        let now = SystemTime::now();
        while let Some((body, len)) = read_record(&raw[pos..]) {
            match decode_body(body) {
                Some(Record::Push(seq, message)) => {
                    self.next_seq = self.next_seq.max(seq + 1);
                    self.live_record_bytes += len as u64;
                    self.insert(seq, message, now);
                }
                Some(Record::Ack(seq)) | Some(Record::Drop(seq)) => {
                    self.remove(seq);
                }
                None => break,
            }
            pos += len;
        }
        pos
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

    /// Stores a message durably. Returns its sequence number; pushing a message whose id is
    /// already held returns the held one's sequence number and stores nothing.
    pub fn push(&mut self, message: OutboundMessage) -> Result<u64, OutboxError> {
        if let Some(&seq) = self.by_id.get(&message.id) {
            return Ok(seq);
        }
        let size = (message.topic.len() + message.payload.len()) as u64;
        if size > self.limits.max_bytes || push_record_len(&message) > MAX_RECORD {
            return Err(OutboxError::TooLarge(size));
        }
        self.make_room(size, message.priority)?;
        let seq = self.next_seq;
        let body = encode_push(seq, &message);
        self.append(&body)?;
        self.file.flush()?;
        self.file.get_ref().sync_data()?;
        self.next_seq += 1;
        self.live_record_bytes += (body.len() + 8) as u64;
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
            self.append(&encode_seq(REC_DROP, seq))?;
            if let Some(e) = self.remove(seq) {
                self.dropped[prio_index(e.message.priority)] += 1;
                tracing::warn!(seq, priority = ?e.message.priority, topic = %e.message.topic, "outbox full: dropped");
            }
        }
        Ok(())
    }

    /// Removes a message after its PUBACK. Returns whether it was held.
    pub fn ack(&mut self, seq: u64) -> Result<bool, OutboxError> {
        if !self.entries.contains_key(&seq) {
            return Ok(false);
        }
        self.append(&encode_seq(REC_ACK, seq))?;
        self.file.flush()?;
        self.remove(seq);
        self.maybe_compact()?;
        Ok(true)
    }

    /// Removes a message by id after its PUBACK. Returns whether it was held.
    pub fn ack_id(&mut self, id: &MessageId) -> Result<bool, OutboxError> {
        match self.by_id.get(id).copied() {
            Some(seq) => self.ack(seq),
            None => Ok(false),
        }
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
        }
    }

    fn append(&mut self, body: &[u8]) -> Result<(), OutboxError> {
        let len =
            u32::try_from(body.len()).map_err(|_| OutboxError::TooLarge(body.len() as u64))?;
        self.file.write_all(&len.to_le_bytes())?;
        self.file.write_all(&crc32(body).to_le_bytes())?;
        self.file.write_all(body)?;
        self.file_len += body.len() as u64 + 8;
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), OutboxError> {
        if self.file_len < 1024 * 1024 || self.live_record_bytes * 2 > self.file_len {
            return Ok(());
        }
        self.compact()
    }

    /// Rewrites the log with only the held messages.
    pub fn compact(&mut self) -> Result<(), OutboxError> {
        self.file.flush()?;
        let tmp = self.dir.join(TMP);
        let mut out = BufWriter::new(File::create(&tmp)?);
        let mut len = 0u64;
        for (&seq, e) in &self.entries {
            let body = encode_push(seq, &e.message);
            out.write_all(&(body.len() as u32).to_le_bytes())?;
            out.write_all(&crc32(&body).to_le_bytes())?;
            out.write_all(&body)?;
            len += body.len() as u64 + 8;
        }
        out.flush()?;
        out.get_ref().sync_all()?;
        drop(out);
        std::fs::rename(&tmp, self.dir.join(FILE))?;
        File::open(&self.dir)?.sync_all()?;
        let file = OpenOptions::new().append(true).open(self.dir.join(FILE))?;
        self.file = BufWriter::new(file);
        self.file_len = len;
        self.live_record_bytes = len;
        Ok(())
    }
}

enum Record {
    Push(u64, OutboundMessage),
    Ack(u64),
    Drop(u64),
}

fn push_record_len(m: &OutboundMessage) -> usize {
    8 + 1 + 8 + 16 + 1 + 2 + m.topic.len() + 4 + m.payload.len()
}

fn encode_push(seq: u64, m: &OutboundMessage) -> Vec<u8> {
    let mut b = Vec::with_capacity(push_record_len(m));
    b.push(REC_PUSH);
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(m.id.as_bytes());
    b.push(prio_index(m.priority) as u8);
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

/// One record at the start of `raw`: `(body, total length)`, or `None` if it is torn/corrupt.
fn read_record(raw: &[u8]) -> Option<(&[u8], usize)> {
    let len = u32::from_le_bytes(raw.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(raw.get(4..8)?.try_into().ok()?);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let body = raw.get(8..8 + len)?;
    (crc32(body) == crc).then_some((body, 8 + len))
}

fn decode_body(body: &[u8]) -> Option<Record> {
    let (&kind, rest) = body.split_first()?;
    let seq = u64::from_le_bytes(rest.get(0..8)?.try_into().ok()?);
    match kind {
        REC_ACK if rest.len() == 8 => Some(Record::Ack(seq)),
        REC_DROP if rest.len() == 8 => Some(Record::Drop(seq)),
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

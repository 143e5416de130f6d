//! A simulated file system that loses what was not synced: the test double for [`Storage`].
//!
//! Every file keeps two views: what is *written* (what reads return) and what is *durable*
//! (what survives a power loss), plus the list of writes and truncations made since its last
//! [`StorageFile::sync`]. Directory entries likewise: creations, renames and removals are
//! visible at once but durable only after [`Storage::sync_dir`] of their directory.
//!
//! [`SimStorage::crash`] simulates a power loss. Depending on the [`CrashMode`], each file keeps
//! only its durable content, a random prefix of its unsynced writes (the last one possibly torn,
//! its bytes real or zeros), or everything but a torn last write; the names likewise keep only
//! their durable state or a random prefix of the unsynced changes. Every handle opened before
//! the crash is dead afterwards (its operations fail), as a process's would be.
//!
//! [`SimStorage::inject`] makes the next matching operation fail ([`Fault`]): a write that stops
//! part-way, a failed `fsync`, a failed directory sync or rename. [`SimStorage::flip`] damages
//! stored bytes, as a bad sector does.
//!
//! Directories are names too: a directory made by [`Storage::create_dir_all`] survives a power
//! loss only once its parent was synced, and the files in it only while it does.
//!
//! Simplification: a failed `fsync`
//! leaves the unsynced writes unsynced (Linux may instead drop them from the page cache, so a
//! user of this layer should not trust data whose sync failed, and the outbox does not).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Storage, StorageFile};

/// What a simulated power loss keeps of what was not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Everything written survives (a process crash: the kernel keeps the page cache).
    KeepWritten,
    /// Only what was synced survives.
    LoseUnsynced,
    /// Per file, a random prefix of the unsynced writes survives, the next one possibly torn
    /// (a prefix of its bytes, or zeros in their place); for names, a random prefix of the
    /// unsynced changes. Deterministic for a given seed.
    RandomPrefix {
        /// The seed of the choices.
        seed: u64,
    },
    /// Everything survives except the very last write, which is torn. Deterministic for a seed.
    TearLastWrite {
        /// The seed of the choices.
        seed: u64,
    },
}

/// An operation made to fail once; see [`SimStorage::inject`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next append writes only this many bytes (at most its length), then fails.
    Append {
        /// Bytes written before the failure.
        written: usize,
    },
    /// The next file sync fails and makes nothing durable.
    Sync,
    /// The next directory sync fails.
    SyncDir,
    /// The next rename fails and changes nothing.
    Rename,
    /// The next truncation fails and changes nothing.
    Truncate,
    /// The next file creation or open fails.
    Open,
}

/// Counters of what the simulated storage was asked to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Appends.
    pub appends: u64,
    /// File syncs that succeeded.
    pub syncs: u64,
    /// Directory syncs that succeeded.
    pub dir_syncs: u64,
    /// Simulated power losses.
    pub crashes: u64,
    /// Injected faults that fired.
    pub faults_fired: u64,
}

#[derive(Clone, Debug)]
enum FileOp {
    Append(Vec<u8>),
    Truncate(u64),
}

fn apply(content: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Append(data) => content.extend_from_slice(data),
        FileOp::Truncate(len) => content.resize(*len as usize, 0),
    }
}

#[derive(Clone, Debug, Default)]
struct Inode {
    durable: Vec<u8>,
    written: Vec<u8>,
    unsynced: Vec<FileOp>,
}

#[derive(Clone, Debug)]
enum NameOp {
    Link(PathBuf, u64),
    Unlink(PathBuf),
    Rename(PathBuf, PathBuf),
    MkDir(PathBuf),
}

/// The names of a file system: files (to inodes) and directories.
#[derive(Clone, Debug, Default)]
struct Names {
    files: BTreeMap<PathBuf, u64>,
    dirs: BTreeSet<PathBuf>,
}

/// Whether `path` is the root (of an absolute or a relative path).
fn is_root(path: &Path) -> bool {
    path.parent().is_none() || path.as_os_str().is_empty()
}

impl Names {
    fn dir_exists(&self, dir: &Path) -> bool {
        is_root(dir) || self.dirs.contains(dir)
    }

    /// Drops the names whose directory did not survive.
    fn prune(&mut self) {
        let dirs = self.dirs.clone();
        let reachable = |p: &Path| {
            p.ancestors()
                .skip(1)
                .all(|a| is_root(a) || dirs.contains(a))
        };
        self.dirs.retain(|d| reachable(d));
        let dirs = self.dirs.clone();
        self.files.retain(|p, _| {
            p.ancestors()
                .skip(1)
                .all(|a| is_root(a) || dirs.contains(a))
        });
    }
}

impl NameOp {
    fn dir(&self) -> Option<&Path> {
        match self {
            NameOp::Link(p, _) | NameOp::Unlink(p) | NameOp::Rename(p, _) | NameOp::MkDir(p) => {
                p.parent()
            }
        }
    }

    fn apply(&self, names: &mut Names) {
        match self {
            NameOp::Link(p, ino) => {
                names.files.insert(p.clone(), *ino);
            }
            NameOp::Unlink(p) => {
                names.files.remove(p);
            }
            NameOp::Rename(from, to) => {
                if let Some(ino) = names.files.remove(from) {
                    names.files.insert(to.clone(), ino);
                }
            }
            NameOp::MkDir(p) => {
                names.dirs.insert(p.clone());
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    names: Names,
    durable_names: Names,
    unsynced_names: Vec<NameOp>,
    /// The file written to last, for [`CrashMode::TearLastWrite`].
    last_written: Option<u64>,
    generation: u64,
    faults: VecDeque<Fault>,
    stats: SimStats,
}

impl State {
    fn take_fault(&mut self, matches: impl Fn(&Fault) -> bool) -> Option<Fault> {
        let i = self.faults.iter().position(matches)?;
        self.stats.faults_fired += 1;
        self.faults.remove(i)
    }

    fn link_new(&mut self, path: &Path) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, Inode::default());
        self.names.files.insert(path.to_path_buf(), ino);
        self.unsynced_names
            .push(NameOp::Link(path.to_path_buf(), ino));
        ino
    }
}

/// Deterministic choices (SplitMix64), so a failing seed replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=max`.
    fn upto(&mut self, max: usize) -> usize {
        (self.next() % (max as u64 + 1)) as usize
    }
}

/// Applies a torn version of `op`: a prefix of an append's bytes, real or zeros.
fn tear(content: &mut Vec<u8>, op: &FileOp, rng: &mut Rng) {
    if let FileOp::Append(data) = op {
        let n = rng.upto(data.len().saturating_sub(1));
        if rng.next().is_multiple_of(2) {
            content.extend_from_slice(&data[..n]);
        } else {
            content.resize(content.len() + n, 0);
        }
    }
}

/// The simulated storage; cheap to clone (clones share one file system). See the
/// [module docs](self).
#[derive(Clone, Default)]
pub struct SimStorage {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for SimStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("SimStorage")
            .field("files", &s.names.files.keys().collect::<Vec<_>>())
            .field("stats", &s.stats)
            .finish()
    }
}

fn dead_handle() -> io::Error {
    io::Error::other("simulated storage: handle opened before a simulated power loss")
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("simulated storage: injected {what} failure"))
}

impl SimStorage {
    /// An empty file system.
    pub fn new() -> SimStorage {
        SimStorage::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Simulates a power loss (see [`CrashMode`]). Handles opened before it stop working.
    pub fn crash(&self, mode: CrashMode) {
        let mut s = self.lock();
        let s = &mut *s;
        s.generation += 1;
        s.stats.crashes += 1;
        let mut rng = Rng(match mode {
            CrashMode::RandomPrefix { seed } | CrashMode::TearLastWrite { seed } => seed,
            _ => 0,
        });
        // Names first: which files are reachable after the crash.
        let mut names = match mode {
            CrashMode::KeepWritten | CrashMode::TearLastWrite { .. } => s.names.clone(),
            CrashMode::LoseUnsynced => s.durable_names.clone(),
            CrashMode::RandomPrefix { .. } => {
                let mut names = s.durable_names.clone();
                let k = rng.upto(s.unsynced_names.len());
                for op in &s.unsynced_names[..k] {
                    op.apply(&mut names);
                }
                names
            }
        };
        names.prune();
        let reachable: std::collections::HashSet<u64> = names.files.values().copied().collect();
        s.inodes.retain(|ino, _| reachable.contains(ino));
        let last = s.last_written;
        for (ino, inode) in s.inodes.iter_mut() {
            let mut content = inode.durable.clone();
            match mode {
                CrashMode::KeepWritten => content = inode.written.clone(),
                CrashMode::LoseUnsynced => {}
                CrashMode::RandomPrefix { .. } => {
                    let k = rng.upto(inode.unsynced.len());
                    for op in &inode.unsynced[..k] {
                        apply(&mut content, op);
                    }
                    if let Some(op) = inode.unsynced.get(k)
                        && rng.next().is_multiple_of(2)
                    {
                        tear(&mut content, op, &mut rng);
                    }
                }
                CrashMode::TearLastWrite { .. } => {
                    let n = inode.unsynced.len();
                    let keep = if Some(*ino) == last {
                        n.saturating_sub(1)
                    } else {
                        n
                    };
                    for op in &inode.unsynced[..keep] {
                        apply(&mut content, op);
                    }
                    if keep < n {
                        tear(&mut content, &inode.unsynced[keep], &mut rng);
                    }
                }
            }
            inode.durable = content.clone();
            inode.written = content;
            inode.unsynced.clear();
        }
        s.durable_names = names.clone();
        s.names = names;
        s.unsynced_names.clear();
        s.last_written = None;
    }

    /// Makes the next operation of this kind fail once (faults queue up in order).
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Faults injected that have not fired yet.
    pub fn pending_faults(&self) -> usize {
        self.lock().faults.len()
    }

    /// XORs a stored byte with `mask`, in what is written and what is durable alike (a bad
    /// sector). Returns `false` if the file or the offset does not exist.
    pub fn flip(&self, path: &Path, offset: usize, mask: u8) -> bool {
        let mut s = self.lock();
        let Some(&ino) = s.names.files.get(path) else {
            return false;
        };
        let inode = s.inodes.get_mut(&ino).expect("named inode exists");
        let Some(b) = inode.written.get_mut(offset) else {
            return false;
        };
        *b ^= mask;
        if let Some(b) = inode.durable.get_mut(offset) {
            *b ^= mask;
        }
        true
    }

    /// What a read of `path` returns now.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.lock();
        let ino = s.names.files.get(path)?;
        Some(s.inodes[ino].written.clone())
    }

    /// What would survive a power loss now that loses everything unsynced (`None`: the name
    /// itself would not survive).
    pub fn durable_contents(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.lock();
        let mut names = s.durable_names.clone();
        names.prune();
        let ino = names.files.get(path)?;
        Some(s.inodes[ino].durable.clone())
    }

    /// Counters.
    pub fn stats(&self) -> SimStats {
        self.lock().stats
    }

    fn file(&self, ino: u64, generation: u64) -> Box<dyn StorageFile> {
        Box::new(SimFile {
            state: self.state.clone(),
            ino,
            generation,
        })
    }
}

impl Storage for SimStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let mut missing: Vec<PathBuf> = dir
            .ancestors()
            .filter(|a| !s.names.dir_exists(a))
            .map(Path::to_path_buf)
            .collect();
        missing.reverse();
        for d in missing {
            s.names.dirs.insert(d.clone());
            s.unsynced_names.push(NameOp::MkDir(d));
        }
        Ok(())
    }

    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        Ok(self.contents(path))
    }

    fn open_append(&self, path: &Path) -> io::Result<(Box<dyn StorageFile>, bool)> {
        let mut s = self.lock();
        if s.take_fault(|f| *f == Fault::Open).is_some() {
            return Err(injected("open"));
        }
        if !s.names.dir_exists(path.parent().unwrap_or(Path::new(""))) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let (ino, created) = match s.names.files.get(path) {
            Some(&ino) => (ino, false),
            None => (s.link_new(path), true),
        };
        let generation = s.generation;
        drop(s);
        Ok((self.file(ino, generation), created))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let mut s = self.lock();
        if s.take_fault(|f| *f == Fault::Open).is_some() {
            return Err(injected("create"));
        }
        if !s.names.dir_exists(path.parent().unwrap_or(Path::new(""))) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let ino = match s.names.files.get(path) {
            Some(&ino) => {
                let inode = s.inodes.get_mut(&ino).expect("named inode exists");
                inode.written.clear();
                inode.unsynced.push(FileOp::Truncate(0));
                ino
            }
            None => s.link_new(path),
        };
        let generation = s.generation;
        drop(s);
        Ok(self.file(ino, generation))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        if from.parent() != to.parent() {
            return Err(io::Error::other(
                "simulated storage: renames across directories are not modelled",
            ));
        }
        if s.take_fault(|f| *f == Fault::Rename).is_some() {
            return Err(injected("rename"));
        }
        let Some(ino) = s.names.files.remove(from) else {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        };
        s.names.files.insert(to.to_path_buf(), ino);
        s.unsynced_names
            .push(NameOp::Rename(from.to_path_buf(), to.to_path_buf()));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<bool> {
        let mut s = self.lock();
        if s.names.files.remove(path).is_none() {
            return Ok(false);
        }
        s.unsynced_names.push(NameOp::Unlink(path.to_path_buf()));
        Ok(true)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        if s.take_fault(|f| *f == Fault::SyncDir).is_some() {
            return Err(injected("directory sync"));
        }
        let s = &mut *s;
        let mut rest = Vec::new();
        for op in s.unsynced_names.drain(..) {
            if op.dir() == Some(dir) {
                op.apply(&mut s.durable_names);
            } else {
                rest.push(op);
            }
        }
        s.unsynced_names = rest;
        s.stats.dir_syncs += 1;
        Ok(())
    }
}

struct SimFile {
    state: Arc<Mutex<State>>,
    ino: u64,
    generation: u64,
}

impl fmt::Debug for SimFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFile").field("ino", &self.ino).finish()
    }
}

impl SimFile {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> io::Result<R>) -> io::Result<R> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.generation != self.generation {
            return Err(dead_handle());
        }
        f(&mut s)
    }
}

impl StorageFile for SimFile {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        let ino = self.ino;
        self.with(|s| {
            s.stats.appends += 1;
            s.last_written = Some(ino);
            let fault = s.take_fault(|f| matches!(f, Fault::Append { .. }));
            let inode = s.inodes.get_mut(&ino).expect("open inode exists");
            let (data, result) = match fault {
                Some(Fault::Append { written }) => {
                    (&data[..written.min(data.len())], Err(injected("write")))
                }
                _ => (data, Ok(())),
            };
            let op = FileOp::Append(data.to_vec());
            apply(&mut inode.written, &op);
            inode.unsynced.push(op);
            result
        })
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        let ino = self.ino;
        self.with(|s| {
            if s.take_fault(|f| *f == Fault::Truncate).is_some() {
                return Err(injected("truncate"));
            }
            s.last_written = Some(ino);
            let inode = s.inodes.get_mut(&ino).expect("open inode exists");
            let op = FileOp::Truncate(len);
            apply(&mut inode.written, &op);
            inode.unsynced.push(op);
            Ok(())
        })
    }

    fn sync(&mut self) -> io::Result<()> {
        let ino = self.ino;
        self.with(|s| {
            if s.take_fault(|f| *f == Fault::Sync).is_some() {
                return Err(injected("fsync"));
            }
            let inode = s.inodes.get_mut(&ino).expect("open inode exists");
            // Replaying the unsynced operations costs what they wrote, not the file's size.
            for op in inode.unsynced.drain(..) {
                apply(&mut inode.durable, &op);
            }
            debug_assert_eq!(inode.durable, inode.written);
            s.stats.syncs += 1;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    /// A file system with a durable directory `/d`.
    fn with_dir_d() -> SimStorage {
        let fs = SimStorage::new();
        fs.create_dir_all(&p("/d")).unwrap();
        fs.sync_dir(&p("/")).unwrap();
        fs
    }

    #[test]
    fn a_directory_survives_only_once_its_parent_is_synced() {
        let fs = SimStorage::new();
        assert!(fs.open_append(&p("/d/a")).is_err(), "no directory /d yet");
        fs.create_dir_all(&p("/d/e")).unwrap();
        let (mut f, _) = fs.open_append(&p("/d/e/a")).unwrap();
        f.append(b"x").unwrap();
        f.sync().unwrap();
        fs.sync_dir(&p("/d/e")).unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        // "/d" itself is not yet durable in "/": the file goes with it.
        assert_eq!(fs.durable_contents(&p("/d/e/a")), None);
        fs.sync_dir(&p("/")).unwrap();
        assert_eq!(fs.durable_contents(&p("/d/e/a")).unwrap(), b"x");
        fs.crash(CrashMode::LoseUnsynced);
        assert_eq!(fs.contents(&p("/d/e/a")).unwrap(), b"x");
    }

    #[test]
    fn unsynced_data_and_names_are_lost() {
        let fs = with_dir_d();
        let (mut f, created) = fs.open_append(&p("/d/a")).unwrap();
        assert!(created);
        f.append(b"hello").unwrap();
        f.sync().unwrap();
        f.append(b" world").unwrap();
        assert_eq!(fs.contents(&p("/d/a")).unwrap(), b"hello world");
        // The data is synced but the name is not: a power loss forgets the file.
        assert_eq!(fs.durable_contents(&p("/d/a")), None);
        fs.sync_dir(&p("/d")).unwrap();
        assert_eq!(fs.durable_contents(&p("/d/a")).unwrap(), b"hello");
        fs.crash(CrashMode::LoseUnsynced);
        assert_eq!(fs.contents(&p("/d/a")).unwrap(), b"hello");
        assert!(f.append(b"x").is_err(), "handles die with the crash");
    }

    #[test]
    fn a_file_whose_name_was_never_synced_disappears() {
        let fs = with_dir_d();
        let (mut f, _) = fs.open_append(&p("/d/a")).unwrap();
        f.append(b"data").unwrap();
        f.sync().unwrap();
        fs.crash(CrashMode::LoseUnsynced);
        assert_eq!(fs.contents(&p("/d/a")), None);
    }

    #[test]
    fn rename_is_durable_only_after_the_directory_sync() {
        let fs = with_dir_d();
        let (mut old, _) = fs.open_append(&p("/d/log")).unwrap();
        old.append(b"old").unwrap();
        old.sync().unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        let mut new = fs.create(&p("/d/log.tmp")).unwrap();
        new.append(b"new").unwrap();
        new.sync().unwrap();
        fs.rename(&p("/d/log.tmp"), &p("/d/log")).unwrap();
        assert_eq!(fs.contents(&p("/d/log")).unwrap(), b"new");
        assert_eq!(fs.durable_contents(&p("/d/log")).unwrap(), b"old");
        fs.sync_dir(&p("/d")).unwrap();
        assert_eq!(fs.durable_contents(&p("/d/log")).unwrap(), b"new");
        assert_eq!(fs.durable_contents(&p("/d/log.tmp")), None);
    }

    #[test]
    fn random_prefix_keeps_a_prefix_of_the_unsynced_writes() {
        for seed in 0..200 {
            let fs = with_dir_d();
            let (mut f, _) = fs.open_append(&p("/d/a")).unwrap();
            fs.sync_dir(&p("/d")).unwrap();
            f.append(b"AAAA").unwrap();
            f.sync().unwrap();
            f.append(b"BBBB").unwrap();
            f.append(b"CCCC").unwrap();
            fs.crash(CrashMode::RandomPrefix { seed });
            let got = fs.contents(&p("/d/a")).unwrap();
            let full = b"AAAABBBBCCCC";
            assert!(got.len() >= 4 && got.len() <= 12, "seed {seed}: {got:?}");
            assert_eq!(&got[..4], b"AAAA", "seed {seed}: synced bytes survive");
            // Every byte is the written one or, in a torn write, zero.
            for (i, &b) in got.iter().enumerate() {
                assert!(b == full[i] || b == 0, "seed {seed}: {got:?}");
            }
        }
    }

    #[test]
    fn tear_last_write_keeps_all_but_a_torn_last_write() {
        let fs = with_dir_d();
        let (mut f, _) = fs.open_append(&p("/d/a")).unwrap();
        f.append(b"AAAA").unwrap();
        f.append(b"BBBB").unwrap();
        fs.crash(CrashMode::TearLastWrite { seed: 7 });
        let got = fs.contents(&p("/d/a")).unwrap();
        assert!(got.len() >= 4 && got.len() < 8, "{got:?}");
        assert_eq!(&got[..4], b"AAAA");
    }

    #[test]
    fn injected_faults_fire_once() {
        let fs = with_dir_d();
        let (mut f, _) = fs.open_append(&p("/d/a")).unwrap();
        fs.inject(Fault::Append { written: 2 });
        fs.inject(Fault::Sync);
        assert!(f.append(b"abcd").is_err());
        assert_eq!(fs.contents(&p("/d/a")).unwrap(), b"ab", "a partial write");
        assert!(f.sync().is_err());
        f.append(b"ef").unwrap();
        f.sync().unwrap();
        assert_eq!(fs.stats().faults_fired, 2);
        assert_eq!(fs.pending_faults(), 0);
    }
}

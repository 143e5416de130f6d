//! The storage layer under everything that promises durability (the [`outbox`](crate::outbox)
//! here, the agent's order journal).
//!
//! [`Storage`] is the handful of file-system operations a write-ahead log needs: read a file,
//! append to it, truncate it, sync it, create, rename and remove names, and sync a directory.
//! In production it is [`OsStorage`], the plain file system. In tests it is [`sim::SimStorage`],
//! which records which bytes and which directory entries were synced and, at a simulated power
//! loss, throws away what was not (all of it, a random prefix of it, or all but a torn last
//! write) — the technique FoundationDB's simulator, TigerBeetle's storage fault model and
//! Jepsen's LazyFS use to find the bugs a SIGKILL test cannot: the kernel keeps a killed
//! process's writes, so a missing sync never shows there.
//!
//! The contract a user of this layer may rely on (and that [`sim::SimStorage`] enforces):
//! - data appended to a file is durable only after [`StorageFile::sync`] returns `Ok`;
//! - a file's *name* (a creation, a rename, a removal) is durable only after
//!   [`Storage::sync_dir`] of its directory returns `Ok`, even when the file's data was synced;
//! - a rename is atomic: after a crash the name points to the old or the new file, never to a
//!   mixture.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

pub mod sim;

/// File-system operations for durable logs. See the [module docs](self).
pub trait Storage: Send + Sync + fmt::Debug {
    /// Creates a directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The whole content of a file, or `None` if it does not exist.
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Opens a file for appending, creating it (empty) if it does not exist; the flag says
    /// whether it was created (its name is then durable only after [`Storage::sync_dir`]).
    fn open_append(&self, path: &Path) -> io::Result<(Box<dyn StorageFile>, bool)>;
    /// Creates a file, or empties an existing one, for writing from the start.
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;
    /// Renames `from` over `to`, atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file; `Ok(false)` if there was none.
    fn remove_file(&self, path: &Path) -> io::Result<bool>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// A file opened by a [`Storage`] for appending.
pub trait StorageFile: Send + fmt::Debug {
    /// Appends all of `data` at the end of the file. On error, a prefix of it may have been
    /// written.
    fn append(&mut self, data: &[u8]) -> io::Result<()>;
    /// Cuts the file to `len` bytes.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// Makes the file's content and length durable (`fdatasync`).
    fn sync(&mut self) -> io::Result<()>;
}

/// The plain file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsStorage;

#[derive(Debug)]
struct OsFile(File);

impl StorageFile for OsFile {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.0.write_all(data)
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl Storage for OsStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match File::open(path) {
            Ok(mut f) => {
                let mut raw = Vec::new();
                f.read_to_end(&mut raw)?;
                Ok(Some(raw))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn open_append(&self, path: &Path) -> io::Result<(Box<dyn StorageFile>, bool)> {
        match OpenOptions::new().append(true).create_new(true).open(path) {
            Ok(f) => Ok((Box::new(OsFile(f)), true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let f = OpenOptions::new().append(true).open(path)?;
                Ok((Box::new(OsFile(f)), false))
            }
            Err(e) => Err(e),
        }
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let f = OpenOptions::new()
            .append(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        f.set_len(0)?;
        Ok(Box::new(OsFile(f)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<bool> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

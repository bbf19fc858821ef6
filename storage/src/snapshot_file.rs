//! Where snapshots live: one file each in the store's `raft-snapshots` directory, never a
//! buffer of the whole state in memory.
//!
//! A snapshot is written to a `.tmp` file, fsynced, and renamed to `<id>.snap` before
//! its metadata (which names that id) is committed to sled; so the metadata always
//! names a complete file, and a crash at any point leaves at most a stray file, removed
//! at the next open. openraft reads a snapshot it sends to a follower, and writes the
//! chunks it receives, through [`SnapshotFile`]; the state machine is serialized into
//! the file and restored from it through buffered readers and writers.
//!
//! [`SnapshotFile`] does its I/O on the calling thread. The chunks openraft moves are a
//! few MiB of a local file, and doing it in place keeps a simulation that runs every
//! node on one thread deterministic (see [`crate::io`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// The directory, inside the sled directory, that holds the snapshot files. Not `snap.*`:
/// sled takes every file of its directory starting with that for one of its own.
pub(crate) const DIR: &str = "raft-snapshots";
/// A complete snapshot's file name ends with this.
const COMPLETE: &str = ".snap";
/// A snapshot being written or received.
const PARTIAL: &str = ".tmp";

/// One snapshot's bytes in a file: openraft's `SnapshotData`.
///
/// A file made by [`SnapshotDir::create`] is partial: it is removed when dropped, unless
/// [`SnapshotDir::keep`] made it a complete snapshot first (so a snapshot whose receipt
/// was abandoned leaves nothing behind).
#[derive(Debug)]
pub struct SnapshotFile {
    file: File,
    path: PathBuf,
    /// Remove the file on drop.
    partial: bool,
}

impl SnapshotFile {
    /// The file, for reading or writing it whole.
    pub(crate) fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// The size of the file, in bytes.
    pub fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if self.partial {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.get_mut().file.read(buf.initialize_unfilled())?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.get_mut().file.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().file.flush())
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        self.get_mut().file.seek(position).map(drop)
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(self.get_mut().file.stream_position())
    }
}

/// The snapshot directory of one store.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotDir {
    path: PathBuf,
}

impl SnapshotDir {
    /// The directory inside the sled directory `store`, created if missing.
    pub(crate) fn open(store: &Path) -> io::Result<Self> {
        let path = store.join(DIR);
        fs::create_dir_all(&path)?;
        Ok(SnapshotDir { path })
    }

    fn complete_path(&self, id: &str) -> PathBuf {
        self.path.join(format!("{}{COMPLETE}", file_stem(id)))
    }

    /// A new, empty partial file, open for reading and writing.
    pub(crate) fn create(&self, unique: u64) -> io::Result<SnapshotFile> {
        let path = self.path.join(format!("{unique}{PARTIAL}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        Ok(SnapshotFile {
            file,
            path,
            partial: true,
        })
    }

    /// Make `snapshot` the complete snapshot `id`: fsync it, rename it to its final name,
    /// fsync the directory. Its handle stays open (at the start of the file).
    pub(crate) fn keep(&self, snapshot: &mut SnapshotFile, id: &str) -> io::Result<()> {
        snapshot.file.sync_all()?;
        let path = self.complete_path(id);
        fs::rename(&snapshot.path, &path)?;
        File::open(&self.path)?.sync_all()?;
        snapshot.path = path;
        snapshot.partial = false;
        snapshot.file.seek(SeekFrom::Start(0))?;
        Ok(())
    }

    /// The complete snapshot `id`, open for reading from its start.
    pub(crate) fn read(&self, id: &str) -> io::Result<SnapshotFile> {
        let path = self.complete_path(id);
        Ok(SnapshotFile {
            file: File::open(&path)?,
            path,
            partial: false,
        })
    }

    /// Remove every file but the complete snapshot `keep`: older snapshots, and partial
    /// files a crash left. Only at open, while no partial file is in use.
    pub(crate) fn remove_all_but(&self, keep: Option<&str>) -> io::Result<()> {
        self.remove(keep, true)
    }

    /// Remove the complete snapshots but `keep`. Partial files are left alone: another
    /// snapshot may be being built or received into one right now (each removes its own
    /// when dropped). Open handles to removed files stay readable: a snapshot being
    /// sent to a follower is not cut short.
    pub(crate) fn remove_older_than(&self, keep: &str) -> io::Result<()> {
        self.remove(Some(keep), false)
    }

    fn remove(&self, keep: Option<&str>, partial_too: bool) -> io::Result<()> {
        let keep = keep.map(|id| self.complete_path(id));
        for entry in fs::read_dir(&self.path)? {
            let path = entry?.path();
            let complete = path.to_string_lossy().ends_with(COMPLETE);
            if Some(&path) != keep.as_ref() && (complete || partial_too) {
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove an old snapshot file");
                }
            }
        }
        Ok(())
    }
}

/// A snapshot id as a file name: openraft's ids (`<leader>-<index>-<n>`) are kept as
/// they are; any other character than an ASCII letter, digit, `-` or `_` becomes `_`.
fn file_stem(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_partial_file_is_removed_and_a_kept_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = SnapshotDir::open(dir.path()).unwrap();
        let mut kept = snapshots.create(1).unwrap();
        kept.file().write_all(b"state").unwrap();
        snapshots.keep(&mut kept, "T1-N1-7").unwrap();
        drop(snapshots.create(2).unwrap());
        drop(kept);
        let names: Vec<String> = fs::read_dir(dir.path().join(DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["T1-N1-7.snap".to_owned()]);
        let mut again = String::new();
        snapshots
            .read("T1-N1-7")
            .unwrap()
            .file()
            .read_to_string(&mut again)
            .unwrap();
        assert_eq!(again, "state");
    }

    /// A snapshot kept while another is being received (or built) removes the older
    /// complete snapshots, never the other's partial file.
    #[test]
    fn keeping_a_snapshot_leaves_a_partial_file_in_use_alone() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = SnapshotDir::open(dir.path()).unwrap();
        let mut old = snapshots.create(1).unwrap();
        snapshots.keep(&mut old, "T1-N1-5-1").unwrap();
        let mut receiving = snapshots.create(2).unwrap();
        receiving.file().write_all(b"from the leader").unwrap();
        let mut built = snapshots.create(3).unwrap();
        snapshots.keep(&mut built, "T1-N1-9-3").unwrap();
        snapshots.remove_older_than("T1-N1-9-3").unwrap();
        assert!(
            snapshots.read("T1-N1-5-1").is_err(),
            "the older snapshot is removed"
        );
        snapshots.keep(&mut receiving, "T2-N2-12-4").unwrap();
        snapshots.remove_older_than("T2-N2-12-4").unwrap();
        let mut again = String::new();
        snapshots
            .read("T2-N2-12-4")
            .unwrap()
            .file()
            .read_to_string(&mut again)
            .unwrap();
        assert_eq!(again, "from the leader");
    }

    #[test]
    fn ids_become_plain_file_names() {
        assert_eq!(file_stem("T3-N1-12-5"), "T3-N1-12-5");
        assert_eq!(file_stem("../x y"), "___x_y");
    }
}

//! Space on the metadata disk kept for the metadata itself.
//!
//! sled treats a failed write as the end of the database: the error is kept, every later
//! operation returns it, and openraft's core stops on the first one. A disk that something
//! else filled (another program, a runaway log next to the data directory) would so take the
//! node down, where the node's own writes are refused long before (`SPACE_RESERVE` in `fs`).
//!
//! So the store keeps a file of [`HEADROOM`] bytes next to the database, allocated on disk.
//! Before each write to the database it looks at the free space: below [`LOW_WATER`] it
//! deletes the file, and the metadata writes that follow (the unlinks that free space, session
//! renewals, the log itself) have that much room. While the file is gone, [`Headroom::spent`]
//! is true, and the node refuses file data; [`Headroom::restore`] takes the space back once the
//! disk has room again. A node that starts on a full disk starts without it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{error, info, warn};

/// The size of the space kept for metadata: many thousand log entries and a snapshot of a
/// large tree.
pub const HEADROOM: u64 = 64 << 20;
/// Free space below which the headroom is given back.
pub const LOW_WATER: u64 = 16 << 20;

pub struct Headroom {
    /// The file that holds the space.
    file: PathBuf,
    /// Given back: the file is gone.
    spent: AtomicBool,
}

/// Free bytes on the filesystem holding `path` (for an unprivileged user).
pub fn free_space(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

impl Headroom {
    /// The headroom of the database in `db`: the file `db.headroom` beside it, made now if it is
    /// missing and the disk has room for it.
    pub fn open(db: &Path) -> Headroom {
        let h = Headroom {
            file: db.with_extension("headroom"),
            spent: AtomicBool::new(true),
        };
        let held = std::fs::metadata(&h.file).is_ok_and(|m| m.len() >= HEADROOM);
        if held {
            h.spent.store(false, Ordering::SeqCst);
        } else {
            h.restore(0);
        }
        h
    }

    /// Whether the headroom is given back (the disk filled up) and not yet taken again.
    pub fn spent(&self) -> bool {
        self.spent.load(Ordering::SeqCst)
    }

    /// Before a write to the database: gives the headroom back if the disk is nearly full.
    pub fn before_write(&self) {
        if self.spent() {
            return;
        }
        let Ok(free) = free_space(self.dir()) else {
            return;
        };
        if free >= LOW_WATER || self.spent.swap(true, Ordering::SeqCst) {
            return;
        }
        match std::fs::remove_file(&self.file) {
            Ok(()) => error!(
                free,
                headroom = HEADROOM,
                file = %self.file.display(),
                "the metadata disk is full: gave back the space kept for metadata so that it stays writable; file data is refused until the disk has room again (free space on it)"
            ),
            Err(e) => {
                warn!(error = %e, file = %self.file.display(), "the metadata disk is full and the space kept for it could not be given back")
            }
        }
    }

    /// Takes the headroom again if it was given back and the disk has room for it and
    /// `spare` bytes more; returns whether it is held now.
    pub fn restore(&self, spare: u64) -> bool {
        if !self.spent() {
            return true;
        }
        match free_space(self.dir()) {
            Ok(free) if free >= HEADROOM + LOW_WATER + spare => {}
            _ => return false,
        }
        match allocate(&self.file) {
            Ok(()) => {
                self.spent.store(false, Ordering::SeqCst);
                info!(headroom = HEADROOM, file = %self.file.display(), "space kept for metadata is held");
                true
            }
            Err(e) => {
                let _ = std::fs::remove_file(&self.file);
                warn!(error = %e, file = %self.file.display(), "could not set space aside for metadata");
                false
            }
        }
    }

    fn dir(&self) -> &Path {
        self.file.parent().unwrap_or(Path::new("."))
    }
}

/// Makes `file` hold `HEADROOM` bytes on disk, durably.
fn allocate(file: &Path) -> io::Result<()> {
    use std::io::Write;
    let tmp = file.with_extension("headroom.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    match rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, HEADROOM) {
        Ok(()) => {}
        // A filesystem without fallocate: write it out.
        Err(rustix::io::Errno::OPNOTSUPP) => {
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..HEADROOM >> 20 {
                f.write_all(&zeros)?;
            }
        }
        Err(e) => {
            drop(f);
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    }
    f.sync_all()?;
    std::fs::rename(&tmp, file)?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

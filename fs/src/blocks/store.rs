//! The local block store: content-addressed files under `DATA/blocks/ab/abcdef…`.
//!
//! A block is written to `tmp/`, fsynced, and renamed into place; the fan-out directories are
//! fsynced once per commit by `sync_dirs`. Every read from disk is verified against its blake3
//! hash: a block whose bytes do not match is moved to `quarantine/` and reported, never served.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use shoal_raft::BlockId;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("block {0} is missing from the local store")]
    Missing(BlockId),
    #[error("block {id} is corrupt on disk (its bytes hash to {actual}); moved to {quarantined}")]
    Corrupt {
        id: BlockId,
        actual: BlockId,
        quarantined: String,
    },
    #[error("block store i/o on {path}: {source}")]
    Io { path: String, source: io::Error },
}

impl BlockError {
    fn io(path: &Path, source: io::Error) -> BlockError {
        BlockError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// The errno a reader or writer should see.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

pub struct BlockStore {
    root: PathBuf,
}

impl BlockStore {
    /// Opens the store under `root`, creating it, and removes temp files a crash left behind.
    pub fn open(root: &Path) -> Result<BlockStore, BlockError> {
        for sub in ["tmp", "quarantine"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|e| BlockError::io(&p, e))?;
        }
        let tmp = root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(|e| BlockError::io(&tmp, e))? {
            let entry = entry.map_err(|e| BlockError::io(&tmp, e))?;
            let _ = fs::remove_file(entry.path());
        }
        Ok(BlockStore {
            root: root.to_path_buf(),
        })
    }

    fn dir_of(&self, id: &BlockId) -> PathBuf {
        self.root.join(&id.to_hex()[..2])
    }

    pub fn path_of(&self, id: &BlockId) -> PathBuf {
        self.dir_of(id).join(id.to_hex())
    }

    pub fn contains(&self, id: &BlockId) -> bool {
        self.path_of(id).exists()
    }

    /// Stores a block durably (file fsynced, not yet its directory: see `sync_dirs`).
    /// Returns false if the block was already there.
    pub fn put(&self, id: &BlockId, data: &[u8]) -> Result<bool, BlockError> {
        let dest = self.path_of(id);
        if dest.exists() {
            return Ok(false);
        }
        let dir = self.dir_of(id);
        fs::create_dir_all(&dir).map_err(|e| BlockError::io(&dir, e))?;
        let tmp =
            self.root
                .join("tmp")
                .join(format!("{}.{:016x}", id.to_hex(), rand::random::<u64>()));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_data()?;
            fs::rename(&tmp, &dest)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(BlockError::io(&dest, e));
        }
        Ok(true)
    }

    /// Makes the renames of `put` durable: fsyncs each fan-out directory the blocks went into.
    pub fn sync_dirs<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a BlockId>,
    ) -> Result<(), BlockError> {
        let dirs: BTreeSet<PathBuf> = ids.into_iter().map(|id| self.dir_of(id)).collect();
        for dir in dirs {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| BlockError::io(&dir, e))?;
        }
        Ok(())
    }

    /// Reads a block and verifies it against its hash.
    pub fn get(&self, id: &BlockId) -> Result<Bytes, BlockError> {
        let path = self.path_of(id);
        let mut data = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f
                .read_to_end(&mut data)
                .map_err(|e| BlockError::io(&path, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BlockError::Missing(*id)),
            Err(e) => return Err(BlockError::io(&path, e)),
        };
        let actual = BlockId::of(&data);
        if actual != *id {
            let quarantined = self.root.join("quarantine").join(id.to_hex());
            let _ = fs::rename(&path, &quarantined);
            return Err(BlockError::Corrupt {
                id: *id,
                actual,
                quarantined: quarantined.display().to_string(),
            });
        }
        Ok(Bytes::from(data))
    }

    pub fn delete(&self, id: &BlockId) -> Result<(), BlockError> {
        let path = self.path_of(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BlockError::io(&path, e)),
        }
    }

    /// Every block on disk with its size in bytes and the age of its file in seconds.
    pub fn list(&self) -> Result<Vec<(BlockId, u64, u64)>, BlockError> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.root).map_err(|e| BlockError::io(&self.root, e))?;
        for fan in rd.flatten() {
            let name = fan.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() != 2 {
                continue;
            }
            let Ok(files) = fs::read_dir(fan.path()) else {
                continue;
            };
            for f in files.flatten() {
                let Some(id) = f.file_name().to_str().and_then(BlockId::from_hex) else {
                    continue;
                };
                let Ok(meta) = f.metadata() else { continue };
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .map_or(0, |d| d.as_secs());
                out.push((id, meta.len(), age));
            }
        }
        Ok(out)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_corruption_is_detected_and_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let data = b"hello block".to_vec();
        let id = BlockId::of(&data);
        assert!(store.put(&id, &data).unwrap());
        assert!(!store.put(&id, &data).unwrap(), "second put is a no-op");
        store.sync_dirs([&id]).unwrap();
        assert_eq!(store.get(&id).unwrap(), Bytes::from(data.clone()));

        // Flip one byte on disk: the read must fail, not return wrong bytes.
        let path = store.path_of(&id);
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let err = store.get(&id).unwrap_err();
        assert!(matches!(err, BlockError::Corrupt { .. }), "{err}");
        assert!(!path.exists(), "corrupt block is moved out of the way");
        assert!(matches!(
            store.get(&id).unwrap_err(),
            BlockError::Missing(_)
        ));
        // Writing the same content again heals it.
        assert!(store.put(&id, &data).unwrap());
        assert_eq!(store.get(&id).unwrap(), Bytes::from(data));
        assert_eq!(store.list().unwrap().len(), 1);
    }
}

//! The local block store: content-addressed files under `DATA/blocks/ab/abcdef…`.
//!
//! A block is written to `tmp/`, fsynced, and renamed into place; the fan-out directories are
//! fsynced once per commit by `sync_dirs`. Every read from disk is verified (see `format`): a
//! block whose bytes do not match is moved to `quarantine/` and reported, never served.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use shoal_raft::BlockId;

use super::format::{self, CHUNK, ChunkIndex, Damage};

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("block {0} is missing from the local store")]
    Missing(BlockId),
    #[error("block {id} is corrupt on disk ({damage}); moved to {quarantined}")]
    Corrupt {
        id: BlockId,
        damage: Damage,
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
        let trailer = format::trailer(data);
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.write_all(&trailer)?;
            shoal_raft::failpoint::hit("block-before-sync");
            f.sync_data()?;
            shoal_raft::failpoint::hit("block-after-sync");
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

    fn open_block(&self, id: &BlockId) -> Result<File, BlockError> {
        let path = self.path_of(id);
        match File::open(&path) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BlockError::Missing(*id)),
            Err(e) => Err(BlockError::io(&path, e)),
        }
    }

    fn pread(&self, id: &BlockId, f: &File, at: u64, len: usize) -> Result<Vec<u8>, BlockError> {
        let mut buf = vec![0u8; len];
        match f.read_exact_at(&mut buf, at) {
            Ok(()) => Ok(buf),
            // A block file shorter than its trailer says is damaged, not missing.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.quarantine(id, Damage::Footer))
            }
            Err(e) => Err(BlockError::io(&self.path_of(id), e)),
        }
    }

    /// Moves a damaged block out of the way so it is never served, and names the damage.
    fn quarantine(&self, id: &BlockId, damage: Damage) -> BlockError {
        let quarantined = self.root.join("quarantine").join(id.to_hex());
        let _ = fs::rename(self.path_of(id), &quarantined);
        BlockError::Corrupt {
            id: *id,
            damage,
            quarantined: quarantined.display().to_string(),
        }
    }

    /// Reads and verifies a block's chunk index; `len` is the block's length from its slice.
    pub fn index(&self, id: &BlockId, len: u32) -> Result<ChunkIndex, BlockError> {
        let f = self.open_block(id)?;
        let trailer = self.pread(id, &f, u64::from(len), format::trailer_len(len as usize))?;
        format::parse_trailer(&trailer, len).map_err(|d| self.quarantine(id, d))
    }

    /// Reads chunks `first..=last` of a block and verifies each against the index.
    pub fn read_chunks(
        &self,
        id: &BlockId,
        index: &ChunkIndex,
        first: usize,
        last: usize,
    ) -> Result<Bytes, BlockError> {
        let f = self.open_block(id)?;
        let start = first * CHUNK;
        let end = ((last + 1) * CHUNK).min(index.len as usize);
        let data = self.pread(id, &f, start as u64, end - start)?;
        format::verify_chunks(index, first, &data).map_err(|d| self.quarantine(id, d))?;
        Ok(Bytes::from(data))
    }

    /// Reads a whole block and verifies every chunk and its name.
    pub fn get(&self, id: &BlockId, len: u32) -> Result<Bytes, BlockError> {
        let index = self.index(id, len)?;
        let f = self.open_block(id)?;
        let data = self.pread(id, &f, 0, len as usize)?;
        format::verify_block(id, &index, &data).map_err(|d| self.quarantine(id, d))?;
        Ok(Bytes::from(data))
    }

    /// The data length of a stored block, from its file's size.
    pub fn len_of(&self, id: &BlockId) -> Result<u32, BlockError> {
        let path = self.path_of(id);
        let size = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BlockError::Missing(*id)),
            Err(e) => return Err(BlockError::io(&path, e)),
        };
        format::len_from_file_size(size).ok_or_else(|| self.quarantine(id, Damage::Footer))
    }

    pub fn delete(&self, id: &BlockId) -> Result<(), BlockError> {
        let path = self.path_of(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BlockError::io(&path, e)),
        }
    }

    /// Every block on disk with its file size in bytes and the age of its file in seconds.
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
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let len = data.len() as u32;
        let id = BlockId::of(&data);
        assert!(store.put(&id, &data).unwrap());
        assert!(!store.put(&id, &data).unwrap(), "second put is a no-op");
        store.sync_dirs([&id]).unwrap();
        assert_eq!(store.get(&id, len).unwrap(), Bytes::from(data.clone()));
        let index = store.index(&id, len).unwrap();
        assert_eq!(
            store.read_chunks(&id, &index, 1, 2).unwrap(),
            Bytes::copy_from_slice(&data[CHUNK..3 * CHUNK])
        );

        // Flip one byte of chunk 2 on disk: a read of chunk 0 still works, chunk 2 fails.
        let path = store.path_of(&id);
        let mut bytes = fs::read(&path).unwrap();
        bytes[2 * CHUNK + 5] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert!(store.read_chunks(&id, &index, 0, 0).is_ok());
        let err = store.read_chunks(&id, &index, 2, 3).unwrap_err();
        assert!(
            matches!(
                err,
                BlockError::Corrupt {
                    damage: Damage::Chunk(2),
                    ..
                }
            ),
            "{err}"
        );
        assert!(!path.exists(), "a corrupt block is moved out of the way");
        assert!(matches!(
            store.get(&id, len).unwrap_err(),
            BlockError::Missing(_)
        ));
        // Writing the same content again heals it.
        assert!(store.put(&id, &data).unwrap());
        assert_eq!(store.get(&id, len).unwrap(), Bytes::from(data.clone()));

        // A truncated file is damage too, not a short read.
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(1000).unwrap();
        assert!(matches!(
            store.get(&id, len).unwrap_err(),
            BlockError::Corrupt { .. }
        ));
        assert_eq!(store.list().unwrap().len(), 0);
    }
}

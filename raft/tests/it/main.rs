//! Integration tests of the sled-backed Raft storage.

mod storage_suite;

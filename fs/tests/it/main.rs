//! Integration tests of the node.

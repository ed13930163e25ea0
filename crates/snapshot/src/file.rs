//! The snapshot file (see the crate docs).

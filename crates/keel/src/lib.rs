//! Keel runtime (being written).
